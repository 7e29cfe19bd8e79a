"""The persistent input batch: vectorized step inputs equal a token-by-token construction, rows
are reused and survive growth, and sampling rows gathered from the table equal rows built alone."""

import numpy as np
import pytest
import torch

from shard.input_batch import InputBatch
from shard.sampler import SamplingParams
from shard.sampling_table import SamplingTable, sampling_batch

BLOCK = 4


def _naive(batch: InputBatch, req_ids: list[int], num_scheduled: list[int]):
    """Per token, as the shard used to build them: ids, positions, slots, and the sampling token rows."""
    ids, positions, slots, sample_rows, offset = [], [], [], [], 0
    for req_id, n in zip(req_ids, num_scheduled):
        row = batch.row_of[req_id]
        start = int(batch.num_computed[row])
        for p in range(start, start + n):
            ids.append(int(batch.token_ids[row, p]))
            positions.append(p)
            slots.append(int(batch.block_table[row, p // BLOCK]) * BLOCK + p % BLOCK)
        offset += n
        if start + n == batch.num_tokens[row]:
            sample_rows.append(offset - 1)
    return ids, positions, slots, sample_rows


@pytest.mark.parametrize("seed", range(5))
def test_step_inputs_equal_a_token_by_token_construction(seed):
    rng = np.random.default_rng(seed)
    batch = InputBatch(max_model_len=200, block_size=BLOCK, device=torch.device("cpu"), capacity=2)
    next_block, plan = 0, []
    for req_id in range(12):
        known = int(rng.integers(1, 60))
        computed = int(rng.integers(0, known))  # a cached prefix or an earlier chunk
        blocks = list(range(next_block, next_block + -(-(known + 1) // BLOCK)))
        next_block += len(blocks)
        batch.add(req_id, rng.integers(0, 1000, known).tolist(), computed, blocks[:1], SamplingParams())
        batch.append_blocks(req_id, blocks[1:])
        n = 1 if req_id % 3 == 0 else int(rng.integers(1, known - computed + 1))
        plan.append((req_id, n))
    batch.remove(5)  # a freed row in the middle
    plan = [(req_id, n) for req_id, n in plan if req_id != 5]
    rows, num_scheduled = batch.order(np.array([batch.row_of[r] for r, _ in plan]), np.array([n for _, n in plan]))
    inputs = batch.prepare(rows, num_scheduled, kv_caches=[])
    req_ids = [int(batch.req_ids[r]) for r in rows]
    ids, positions, slots, sample_rows = _naive(batch, req_ids, num_scheduled.tolist())
    assert inputs.input_ids.tolist() == ids
    assert inputs.positions.tolist() == positions
    assert inputs.context.slot_mapping.tolist() == slots
    assert inputs.sample_rows.tolist() == sample_rows
    num_extend = int((num_scheduled > 1).sum())
    assert (num_scheduled[:num_extend] > 1).all() and (num_scheduled[num_extend:] == 1).all()
    context_lens = (batch.num_computed[rows] + num_scheduled).tolist()
    decode = inputs.context.decode
    if decode is not None:
        assert decode.context_lens.tolist() == context_lens[num_extend:]
        assert decode.context_lens.tolist() == sorted(decode.context_lens.tolist())  # shortest first
        for i, row in enumerate(rows[num_extend:]):
            width = -(-context_lens[num_extend + i] // BLOCK)
            assert decode.block_tables[i, :width].tolist() == batch.block_table[row, :width].tolist()
    extend = inputs.context.extend
    if extend is not None:
        assert extend.context_lens.tolist() == context_lens[:num_extend]
        assert extend.cu_seqlens_q.tolist() == [0, *np.cumsum(num_scheduled[:num_extend]).tolist()]


def test_rows_are_reused_and_keep_their_data_when_the_batch_grows():
    batch = InputBatch(max_model_len=16, block_size=BLOCK, device=torch.device("cpu"), capacity=2)
    for req_id in range(3):
        batch.add(req_id, [req_id] * 5, 0, [req_id], SamplingParams(top_n_tokens=req_id))
    assert sorted(batch.row_of.values()) == [0, 1, 2] and len(batch.num_tokens) >= 3
    batch.remove(1)
    row = batch.add(7, [7, 7], 0, [9], SamplingParams())
    assert row == 1  # the freed row
    for req_id in range(4, 9):  # grow again
        batch.add(req_id + 10, [1], 0, [1], SamplingParams())
    assert batch.token_ids[batch.row_of[2], :5].tolist() == [2] * 5
    assert batch.block_table[batch.row_of[7], 0] == 9 and batch.sampling.top_n[batch.row_of[2]] == 2


def test_sampling_rows_gathered_from_a_table_equal_rows_built_alone():
    params = [
        SamplingParams(),
        SamplingParams(do_sample=True, temperature=0.7, top_k=5, seed=3),
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, top_n_tokens=2, logit_bias=((3, 1.0),)),
        SamplingParams(do_sample=True, top_p=0.8, typical_p=0.9, watermark=True, seed=2**64 - 1),
        SamplingParams(do_sample=True, min_p=0.1, presence_penalty=0.5, logit_bias=((1, -1.0), (2, 2.0), (4, 0.5))),
    ]
    histories = [[1, 2], [3, 4, 5], [6, 6, 7, 8], [9], [2, 3]]
    table = SamplingTable(1, torch.device("cpu"))
    table.grow(8)
    tokens = np.zeros((8, 6), dtype=np.int64)
    num_tokens, num_prompt = np.zeros(8, dtype=np.int64), np.zeros(8, dtype=np.int64)
    rows = [6, 0, 3, 5, 2]  # scattered rows, in batch order
    for row, p, h in zip(rows, params, histories):
        table.set_row(row, p)
        tokens[row, : len(h)] = h
        num_tokens[row], num_prompt[row] = len(h), 1
    for subset in ([0, 1, 2, 3, 4], [2, 0], [0], [4, 1]):
        got = table.gather(np.array([rows[i] for i in subset]), tokens, num_tokens, num_prompt)
        want = sampling_batch([params[i] for i in subset], [histories[i] for i in subset], [1] * len(subset))
        for field in ("do_sample", "temperature", "top_k", "top_p", "typical_p", "seeds", "positions", "min_p"):
            a, b = getattr(got, field), getattr(want, field)
            assert (a is None) == (b is None) and (a is None or a.tolist() == b.tolist()), field
        assert got.max_top_n == want.max_top_n
        assert (got.penalties is None) == (want.penalties is None)
        if got.penalties is not None:
            for field in ("repetition", "frequency", "presence", "rows", "tokens", "generated"):
                a, b = getattr(got.penalties, field), getattr(want.penalties, field)
                assert (a is None) == (b is None) and (a is None or a.tolist() == b.tolist()), field
        assert (got.logit_bias is None) == (want.logit_bias is None)
        if got.logit_bias is not None:  # the table is wider than this subset needs: compare as sets
            for i in range(len(subset)):
                a = dict(zip(got.logit_bias.tokens[i].tolist(), got.logit_bias.values[i].tolist()))
                b = dict(zip(want.logit_bias.tokens[i].tolist(), want.logit_bias.values[i].tolist()))
                assert (
                    {k: v for k, v in a.items() if v}
                    == {k: v for k, v in b.items() if v}
                    == dict(params[subset[i]].logit_bias)
                )


def test_a_reused_row_forgets_its_previous_logit_bias():
    table = SamplingTable(2, torch.device("cpu"))
    tokens, num_tokens, num_prompt = np.zeros((2, 1), dtype=np.int64), np.ones(2, dtype=np.int64), np.ones(2)

    def bias_of_row_0():
        return table.gather(np.array([0]), tokens, num_tokens, num_prompt).logit_bias

    table.set_row(0, SamplingParams(logit_bias=((5, 2.0), (6, 1.0))))
    table.set_row(1, SamplingParams(logit_bias=tuple((t, 1.0) for t in range(10))))  # widens the table
    table.set_row(0, SamplingParams(logit_bias=((7, -1.0),)))
    assert bias_of_row_0().tokens.tolist() == [[7]] and bias_of_row_0().values.tolist() == [[-1.0]]
    table.set_row(0, SamplingParams())
    assert bias_of_row_0() is None and not table.bias_tokens[0].any() and not table.bias_values[0].any()
