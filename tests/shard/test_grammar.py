"""Grammar-constrained decoding with real llguidance grammars, on a tiny random model whose
vocabulary is the bundled tokenizer's: outputs follow the grammar, EOS waits for it, completion is
reported, preemption replays, other rows are untouched, and failures stay with their request."""

import dataclasses
import json
import logging
import re
import shutil

import jsonschema
import llguidance
import llguidance.numpy as llg_numpy
import numpy as np
import pytest
import torch
import transformers

from shard.config import ShardConfig
from shard.grammar import GrammarCache, Grammars, load_tokenizer
from shard.runner import ModelRunner
from shard.sampler import SamplingParams, TokenBitmask, apply_token_bitmask
from shard.step import NewRequest, RunningRequest, StepInput, TokenOutput
from tests import ranks
from tests.conftest import BUNDLED_MODEL, TINY_CONFIGS
from tests.e2e.server import free_port

VOCAB, EOS = 49152, 2
REGEX = r"[0-9]{3}-[a-z]+"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
# No free whitespace between JSON tokens: a random model would otherwise emit it forever.
JSON_GRAMMAR = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
REGEX_GRAMMAR = llguidance.LLMatcher.grammar_from_regex(REGEX)
BLOCKS_PER_REQUEST = 6  # block size 16: room for the prompt and 80 tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama with the bundled tokenizer's 49152-token vocabulary and its EOS (2)."""
    out = tmp_path_factory.mktemp("tiny-vocab")
    config = transformers.LlamaConfig(
        **dict(TINY_CONFIGS["llama"], vocab_size=VOCAB), torch_dtype="float32", eos_token_id=EOS, bos_token_id=1
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUNDLED_MODEL / name, out / name)
    return out


@pytest.fixture(scope="module")
def runner(model_dir) -> ModelRunner:
    r = ModelRunner(ShardConfig(model_dir=model_dir, device="cpu", dtype="float32", enforce_eager=True))
    r.warmup(64, 8, max_num_blocks=64)
    return r


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def llg_tokenizer(model_dir) -> llguidance.LLTokenizer:
    return load_tokenizer(model_dir, VOCAB, [EOS])


@pytest.fixture(scope="module")
def prompt(tokenizer) -> list[int]:
    return tokenizer.encode("Give me a code and a person:")


def _request(req_id: int, prompt: list[int], sampling=SamplingParams(), grammar="", **kw) -> NewRequest:
    blocks = list(range(req_id * BLOCKS_PER_REQUEST, (req_id + 1) * BLOCKS_PER_REQUEST))
    return NewRequest(req_id, prompt, 0, len(prompt), blocks, sampling, grammar=grammar, **kw)


def _generate(runner: ModelRunner, requests: list[NewRequest], max_tokens: int = 60) -> dict[int, list[TokenOutput]]:
    """Run `requests` together from their first step until each ends (grammar completed, EOS or
    `max_tokens`), forgetting each as the router would; the outputs of each request."""
    runner.clear()
    outputs: dict[int, list[TokenOutput]] = {r.req_id: [] for r in requests}
    step = StepInput(0, new_requests=requests)
    for step_id in range(1, max_tokens + 2):
        for o in runner.step(step).outputs:
            outputs[o.req_id].append(o)
        ended = [i for i, outs in outputs.items() if outs and _ended(outs, max_tokens)]
        running = [i for i, outs in outputs.items() if i not in ended]
        if not running:
            break
        step = StepInput(step_id, running_requests=[RunningRequest(i, 1, []) for i in running], forget_req_ids=ended)
    return outputs


def _ended(outs: list[TokenOutput], max_tokens: int) -> bool:
    return outs[-1].grammar_completed or outs[-1].token_id == EOS or len(outs) >= max_tokens


def _tokens(outs: list[TokenOutput]) -> list[int]:
    return [o.token_id for o in outs]


def _completed_at_the_end_only(outs: list[TokenOutput]) -> bool:
    return [o.grammar_completed for o in outs] == [False] * (len(outs) - 1) + [True]


def test_regex_outputs_full_match_and_eos_waits_until_the_grammar_accepts(runner, tokenizer, prompt):
    """EOS is pushed up by +100: it is drawn at the first position the grammar accepts (after a
    letter), never before; the text before it full-matches."""
    bias = ((EOS, 100.0),)
    samplings = [SamplingParams(logit_bias=bias)] + [
        SamplingParams(do_sample=True, seed=s, temperature=1.5, logit_bias=bias) for s in range(4)
    ]
    requests = [_request(i, prompt, s, REGEX_GRAMMAR) for i, s in enumerate(samplings)]
    for outs in _generate(runner, requests).values():
        tokens = _tokens(outs)
        assert tokens[-1] == EOS and EOS not in tokens[:-1]
        assert re.fullmatch(REGEX, tokenizer.decode(tokens[:-1])), tokenizer.decode(tokens[:-1])
        assert not any(re.fullmatch(REGEX, tokenizer.decode(tokens[:k])) for k in range(len(tokens) - 1))
        assert _completed_at_the_end_only(outs)


def test_a_bounded_regex_completes_by_itself(runner, tokenizer, prompt):
    """Once the grammar admits nothing more, the last token says so: no EOS is needed. A step the
    router sent before it learnt that (overlapped steps) gets EOS, and completion again."""
    grammar = llguidance.LLMatcher.grammar_from_regex(r"[0-9]{2}-[a-z]{1,5}")
    (outs,) = _generate(runner, [_request(1, prompt, grammar=grammar)]).values()
    assert re.fullmatch(r"[0-9]{2}-[a-z]{1,5}", tokenizer.decode(_tokens(outs))) and _completed_at_the_end_only(outs)
    runner.clear()
    runner.step(StepInput(0, new_requests=[_request(1, prompt, grammar=grammar)]))
    for step_id in range(1, len(outs) + 1):
        (late,) = runner.step(StepInput(step_id, running_requests=[RunningRequest(1, 1, [])])).outputs
    assert (late.token_id, late.grammar_completed) == (EOS, True)


def test_json_outputs_parse_and_validate_and_rows_are_independent(runner, tokenizer, prompt):
    """n = 5 requests of one grammar in one batch (as best_of/n sends them): each gets its own
    matcher, a copy of one compiled template, and the tokens it gets alone (seeds included)."""
    samplings = [SamplingParams()] + [SamplingParams(do_sample=True, seed=s) for s in range(4)]
    together = _generate(runner, [_request(i, prompt, s, JSON_GRAMMAR) for i, s in enumerate(samplings)])
    for outs in together.values():
        document = json.loads(tokenizer.decode(_tokens(outs)))
        jsonschema.validate(document, SCHEMA)
        assert _completed_at_the_end_only(outs)
    assert len({tuple(_tokens(outs)) for outs in together.values()}) > 1  # the seeds do differ
    for i in (0, 3):
        (alone,) = _generate(runner, [_request(i, prompt, samplings[i], JSON_GRAMMAR)]).values()
        assert _tokens(alone) == _tokens(together[i])


def test_a_preempted_request_replays_its_tokens_and_continues_as_if_uninterrupted(runner, prompt):
    (whole,) = _generate(runner, [_request(1, prompt, grammar=JSON_GRAMMAR)]).values()
    before = _tokens(whole)[:6]
    known = prompt + before
    resumed = _request(2, known, grammar=JSON_GRAMMAR, num_prompt_tokens=len(prompt))
    (after,) = _generate(runner, [resumed]).values()
    assert before + _tokens(after) == _tokens(whole) and _completed_at_the_end_only(after)


def test_an_unconstrained_request_beside_constrained_ones_is_unaffected(runner, prompt):
    free = SamplingParams(top_n_tokens=3, presence_penalty=0.5)
    (alone,) = _generate(runner, [_request(1, prompt, free)], max_tokens=12).values()
    together = _generate(
        runner,
        [
            _request(1, prompt, free),
            _request(2, prompt, grammar=JSON_GRAMMAR),
            _request(3, prompt, grammar=REGEX_GRAMMAR),
        ],
        max_tokens=12,
    )
    assert _tokens(together[1]) == _tokens(alone)
    assert [(o.logprob, o.top_tokens, o.grammar_completed) for o in together[1]] == [
        (o.logprob, o.top_tokens, False) for o in alone
    ]


def test_chunked_prefill_and_forgetting(runner, tokenizer, prompt):
    """A prompt in two chunks produces (and needs a mask) only at its last; forgetting drops the matcher."""
    runner.clear()
    chunk = dataclasses.replace(_request(1, prompt, grammar=REGEX_GRAMMAR), num_scheduled_tokens=4)
    first = runner.step(StepInput(0, new_requests=[chunk]))
    assert first.outputs == [] and len(runner.grammars) == 1
    out = runner.step(StepInput(1, running_requests=[RunningRequest(1, len(prompt) - 4, [])]))
    assert re.fullmatch(r"[0-9]", tokenizer.decode(_tokens(out.outputs)))
    runner.step(StepInput(2, forget_req_ids=[1]))
    assert len(runner.grammars) == 0


def test_a_failing_grammar_ends_its_request_alone(runner, prompt, caplog):
    """A grammar llguidance cannot compile (the router validates, so this should not happen): that
    request gets EOS with grammar_completed at once, the step and its other requests go on."""
    bad = json.dumps({"grammars": [{"lark_grammar": "start: (("}]})
    good = _request(2, prompt, grammar=REGEX_GRAMMAR)
    (alone,) = _generate(runner, [good], max_tokens=5).values()
    with caplog.at_level(logging.ERROR, logger="shard.grammar"):
        outs = _generate(runner, [_request(1, prompt, grammar=bad), good], max_tokens=5)
    assert [(o.token_id, o.grammar_completed) for o in outs[1]] == [(EOS, True)]
    assert _tokens(outs[2]) == _tokens(alone) and len(alone) == 5
    assert any("request 1: its grammar failed" in r.getMessage() for r in caplog.records)


def test_the_parallel_mask_fill_equals_a_serial_one(model_dir, tokenizer, llg_tokenizer):
    """Matchers at different states (fresh, replayed, failed) filled at once on the grammar thread
    give the masks llguidance fills one matcher at a time."""
    grammars = Grammars(model_dir, VOCAB, [EOS], torch.device("cpu"), tokenizer=llg_tokenizer)
    cases = {
        10: (JSON_GRAMMAR, []),
        11: (JSON_GRAMMAR, tokenizer.encode('{"name":"ab', add_special_tokens=False)),
        12: (REGEX_GRAMMAR, tokenizer.encode("12", add_special_tokens=False)),
        13: (REGEX_GRAMMAR, tokenizer.encode("123-abc", add_special_tokens=False)),
        14: ("not a grammar", []),
    }
    for req_id, (grammar, replay) in cases.items():
        grammars.add(req_id, grammar, replay)
    pending = grammars.start(np.array([99, 13, 10, 14, 11, 12]))  # 99: an unconstrained row
    mask = pending.wait()
    assert mask.rows.tolist() == [1, 2, 3, 4, 5]
    expected = llg_numpy.allocate_token_bitmask(5, VOCAB)
    for g, req_id in enumerate([13, 10, 14, 11, 12]):
        grammar, replay = cases[req_id]
        if req_id == 14:
            expected[g] = 0
            expected[g, EOS // 32] = 1 << EOS
            continue
        matcher = llguidance.LLMatcher(llg_tokenizer, grammar)
        assert matcher.consume_tokens(replay)
        llg_numpy.fill_next_token_bitmask(matcher, expected, g)
    np.testing.assert_array_equal(mask.bitmask.numpy(), expected)
    c, three = (tokenizer.encode(text, add_special_tokens=False)[0] for text in ("c", "3"))
    tokens = [5, EOS, 107, EOS, c, three]
    assert pending.accept(tokens) == ([False, True, False, True, False, False], tokens)
    assert grammars.entries[11].matcher.is_accepting() is False and not grammars.entries[12].error


def test_a_refused_token_ends_its_request_with_eos(model_dir, tokenizer, llg_tokenizer, caplog):
    """Should a matcher refuse the token sampled under its mask, that request reports EOS with
    grammar_completed (and its masks allow only EOS from then on); its neighbour goes on."""
    grammars = Grammars(model_dir, VOCAB, [EOS], torch.device("cpu"), tokenizer=llg_tokenizer)
    grammars.add(1, REGEX_GRAMMAR)
    grammars.add(2, REGEX_GRAMMAR)
    letter, digit = (tokenizer.encode(text, add_special_tokens=False)[0] for text in ("a", "7"))
    pending = grammars.start(np.array([1, 2]))
    pending.wait()
    with caplog.at_level(logging.ERROR, logger="shard.grammar"):
        assert pending.accept([letter, digit]) == ([True, False], [EOS, digit])
    assert any(
        "request 1: its grammar failed" in r.getMessage() and "refused" in r.getMessage() for r in caplog.records
    )
    mask = grammars.start(np.array([1, 2])).wait().bitmask.numpy().view(np.uint32)
    assert mask[0].tolist() == [1 << EOS] + [0] * (mask.shape[1] - 1) and mask[1].any()


def test_compiled_grammars_are_cached_by_content_least_recently_used_out(llg_tokenizer):
    cache = GrammarCache(llg_tokenizer, size=2)
    digits = [llguidance.LLMatcher.grammar_from_regex(f"[0-9]{{{n}}}") for n in (1, 2, 3)]
    first, second = cache.matcher(digits[0]), cache.matcher(digits[0])
    assert len(cache) == 1 and first is not second  # one template, a copy per request
    assert first.consume_token(llg_tokenizer.tokenize_str("7")[0]) and not second.is_stopped()
    cache.matcher(digits[1])
    cache.matcher(digits[0])  # used again: digits[1] is now the oldest
    cache.matcher(digits[2])
    assert list(cache._templates) == [digits[0], digits[2]]
    with pytest.raises(ValueError, match="does not compile"):
        cache.matcher("start: ((")


@pytest.mark.parametrize("vocab, rows", [(389, [0, 2, 3]), (VOCAB, None)])
def test_the_bitmask_op_matches_llguidance(vocab, rows):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(4, vocab, generator=g)
    constrained = list(range(4)) if rows is None else rows
    bitmask = torch.randint(-(2**31), 2**31 - 1, (len(constrained), -(-vocab // 32)), generator=g, dtype=torch.int32)
    ours = apply_token_bitmask(logits, TokenBitmask(None if rows is None else torch.tensor(rows), bitmask))
    expected = logits.numpy().copy()
    sub = expected[constrained]
    llg_numpy.apply_token_bitmask_inplace(sub, bitmask.numpy())
    expected[constrained] = sub
    torch.testing.assert_close(ours, torch.from_numpy(expected), atol=0, rtol=0)


def _tp_generate(model_dir, rank: int, world_size: int, port: int, queue) -> None:
    """In a process: 30 steps of greedy JSON generation, the same on every rank as the router sends
    them (those after the grammar completed get EOS); rank 0 sends its tokens up to the completion,
    every rank whether it held matchers."""
    from shard import dist

    torch.set_num_threads(1)
    dist.init(rank, world_size, "127.0.0.1", port, torch.device("cpu"))
    config = ShardConfig(model_dir=model_dir, rank=rank, world_size=world_size, device="cpu", dtype="float32")
    r = ModelRunner(dataclasses.replace(config, enforce_eager=True))
    r.warmup(64, 4, max_num_blocks=16)
    outputs = []
    request = NewRequest(1, [5, 6, 7], 0, 3, [0, 1, 2], SamplingParams(), grammar=JSON_GRAMMAR)
    step = StepInput(0, new_requests=[request])
    for step_id in range(1, 31):
        outputs += r.step(step).outputs
        step = StepInput(step_id, running_requests=[RunningRequest(1, 1, [])])
    completed = [o.grammar_completed for o in outputs]
    end = completed.index(True) + 1 if True in completed else len(outputs)
    tokens = [o.token_id for o in outputs[:end]]
    queue.put((rank, tokens, r.grammars is not None))
    dist.shutdown()


def test_tensor_parallel_ranks_follow_rank_0s_matchers(model_dir):
    """TP=2 over gloo: rank 0 alone holds matchers, rank 1 follows the broadcast tokens, and the
    constrained output is TP=1's."""
    ctx, results = ranks.context(), {}
    for world_size in (1, 2):
        queue, port = ctx.Queue(), free_port()
        procs = [
            ctx.Process(target=_tp_generate, args=(model_dir, r, world_size, port, queue)) for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results[world_size] = [queue.get(timeout=300) for _ in procs]
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
    ((_, single, _),) = results[1]
    by_rank = {rank: (tokens, has) for rank, tokens, has in results[2]}
    assert by_rank[0] == (single, True) and by_rank[1] == ([], False)
    assert single and json.loads(transformers.AutoTokenizer.from_pretrained(BUNDLED_MODEL).decode(single))
