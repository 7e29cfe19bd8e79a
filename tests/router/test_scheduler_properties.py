"""Property test of the scheduler and KV cache manager against a fake shard that checks its KV.

The fake shard keeps, for every KV slot, the token whose K/V was written there, and checks
that every position a request attends to holds that request's own token: any block shared
wrongly, freed early or reused while in use shows up as a wrong token. Its "model" is a
hash of the sequence, so batched outputs can be compared with unbatched ones. With a sliding
window, a step attends from the window of its first token on, and requests may be longer than
the whole pool.
"""

import hashlib
from collections import deque

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.core.kv_cache_manager import KVCacheManager, max_blocks_held
from router.core.request import Request, RequestStatus, SamplingParams
from router.core.scheduler import Scheduler, SchedulerConfig, StepPlan

VOCAB, EOS, BLOCK_SIZE = 50, 0, 4


def next_token(tokens: list[int]) -> int:
    return hashlib.blake2b(bytes(str(tokens), "ascii"), digest_size=4).digest()[0] % VOCAB


class FakeShard:
    def __init__(self, window: int = 0):
        self.window = window  # a step's queries read positions from its first one's window on; 0: all
        self.kv: dict[int, int] = {}  # slot -> token whose K/V is stored there
        self.states: dict[int, tuple[list[int], list[int], int]] = {}  # req_id -> (tokens, blocks, computed)

    def step(self, plan: StepPlan) -> dict[int, int]:
        for req_id in plan.forget_req_ids:
            self.states.pop(req_id, None)
        out = {}
        for s in plan.scheduled:
            r = s.request
            if s.is_new:
                assert r.req_id not in self.states
                tokens, blocks, computed = list(r.token_ids), list(s.new_block_ids), s.start_position
            else:
                tokens, blocks, computed = self.states[r.req_id]
                blocks = blocks + s.new_block_ids
            end = computed + s.num_scheduled_tokens
            assert end <= len(tokens) and end <= len(blocks) * BLOCK_SIZE
            for p in range(computed, end):  # store this step's K/V
                self.kv[blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE] = tokens[p]
            self.states[r.req_id] = (tokens, blocks, end)
        for s in plan.scheduled:  # then attend: every position read must hold our token
            tokens, blocks, end = self.states[s.request.req_id]
            first_read = max(0, s.start_position - self.window + 1) if self.window else 0
            for p in range(first_read, end):
                assert self.kv.get(blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE) == tokens[p]
            if end == len(tokens):
                token = next_token(tokens)
                tokens.append(token)
                out[s.request.req_id] = token
        return out


def reference_output(prompt: list[int], max_new_tokens: int) -> list[int]:
    tokens, out = list(prompt), []
    while len(out) < max_new_tokens:
        out.append(next_token(tokens))
        tokens.append(out[-1])
        if out[-1] == EOS:
            break
    return out


request_spec = st.tuples(
    st.integers(0, 6),  # arrival step
    st.integers(0, 2),  # which shared prefix (so the prefix cache is exercised)
    st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=14),  # own prompt tokens
    st.integers(1, 12),  # max_new_tokens
    st.one_of(st.none(), st.integers(1, 20)),  # cancel at this step, or never
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(request_spec, min_size=1, max_size=12),
    num_blocks=st.integers(8, 24),
    prefill_budget=st.integers(4, 40),
    max_batch_size=st.integers(1, 6),
    prefix_caching=st.booleans(),
    in_flight=st.sampled_from([1, 2]),  # 2: the next step is scheduled before the last one's result
    window=st.sampled_from([0, 0, 1, 5, 9]),  # a sliding window over every layer; 0: none
)
def test_no_leak_every_request_ends_and_outputs_match_unbatched(
    specs, num_blocks, prefill_budget, max_batch_size, prefix_caching, in_flight, window
):
    prefixes = [[], [7] * 9, [11, 12, 13, 14] * 2, list(range(1, 41))]
    kv = KVCacheManager(num_blocks, BLOCK_SIZE, prefix_caching, window)
    if window:  # a request holds its window and a chunk: it must fit the pool alone, its length need not
        prefill_budget = min(prefill_budget, num_blocks * BLOCK_SIZE - window - BLOCK_SIZE + 2)
    scheduler = Scheduler(SchedulerConfig(max_batch_size, prefill_budget), kv)
    shard = FakeShard(window)
    requests = []
    for i, (arrival, prefix, own, max_new, cancel_at) in enumerate(specs):
        prompt = prefixes[prefix] + own
        if not window:
            prompt = prompt[: num_blocks * BLOCK_SIZE - max_new]  # fits the pool alone
        requests.append((arrival, cancel_at, Request(i, prompt, max_new, SamplingParams(), frozenset({EOS}))))
    pending = deque()  # (plan, result) sent but not yet applied
    for step in range(600):
        for arrival, cancel_at, r in requests:
            if arrival == step:
                scheduler.add(r)
            if cancel_at == step and arrival <= step and not r.status.is_finished:
                scheduler.finish(r, RequestStatus.FINISHED_ABORTED)
        if step > 6 and not scheduler.has_work and not pending:
            break
        if len(pending) < in_flight:  # the shard runs plans in the order they are sent
            plan = scheduler.schedule()
            pending.append((plan, shard.step(plan)))
            for s in plan.scheduled:  # the step reads only blocks its request holds, and holds no more
                r, first_read = s.request, max(0, s.start_position - window + 1) if window else 0
                table, num_held = kv.block_ids(r), kv.num_held_blocks(r)
                assert len(table) - num_held <= first_read // BLOCK_SIZE, "a block in the window was given back"
                assert all(kv.pool._ref_counts[b] > 0 for b in table[len(table) - num_held :])
                assert num_held <= max_blocks_held(r.num_computed_tokens, prefill_budget, BLOCK_SIZE, window)
        if len(pending) == in_flight or not scheduler.has_work:
            scheduler.update(*pending.popleft())
    for _, _, r in requests:
        assert r.status.is_finished, f"request {r.req_id} never ended"
        if r.status != RequestStatus.FINISHED_ABORTED:
            assert r.output_ids == reference_output(r.prompt_ids, r.max_new_tokens)
    assert kv.num_free_blocks == num_blocks, "blocks leaked"
    assert all(c == 0 for c in kv.pool._ref_counts)
    assert not kv._requests, "the KV cache manager still holds finished requests"
