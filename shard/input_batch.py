"""The shard's per-request state in rows that persist across steps, and a step's model inputs.

As in vLLM v1's InputBatch: a request gets a row when it arrives and keeps it until it is
forgotten. The row holds its tokens (prompt, then every sampled token), its block table and
counters in host arrays, and its sampling parameters on the device (SamplingTable). A step
turns rows into model inputs with a handful of vectorized numpy operations, whatever the
number of tokens: no Python loop over tokens. On CUDA the inputs go through pinned staging
buffers reused every step; on CPU the tensors are views of the numpy arrays.
"""

from dataclasses import dataclass

import numpy as np
import torch

from shard.context import CrossMeta, DecodeMeta, ExtendMeta, ForwardContext
from shard.sampler import SamplingBatch, SamplingParams
from shard.sampling_table import SamplingTable


@dataclass(frozen=True, slots=True)
class ModelInputs:
    """A step's tensors, and the host facts the runner needs after the forward."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    context: ForwardContext
    sample_rows: torch.Tensor  # [S] int64, the token row each sampling request samples from
    rows: np.ndarray  # [N] table rows in execution order: multi-token requests first
    num_scheduled: np.ndarray  # [N] tokens each computes
    produces: np.ndarray  # [N] bool: it computes its last known token, so it samples one

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


class DeviceStager:
    """Host arrays to device tensors. CPU: zero-copy views. CUDA: each named input is copied into
    a pinned buffer of its own (grown as needed) and sent with a non-blocking copy."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pin = device.type == "cuda"
        self._pinned: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, values: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(np.ascontiguousarray(values))
        if not self.pin:
            return host
        buf = self._pinned.get(name)
        if buf is None or buf.numel() < host.numel() or buf.dtype != host.dtype:
            buf = self._pinned[name] = torch.empty(max(host.numel(), 256), dtype=host.dtype).pin_memory()
        staged = buf[: host.numel()].view(host.shape)
        staged.copy_(host)
        return staged.to(self.device, non_blocking=True)


class InputBatch:
    def __init__(
        self,
        max_model_len: int,
        block_size: int,
        device: torch.device,
        capacity: int = 16,
        is_encoder_decoder: bool = False,
    ):
        self.max_model_len, self.block_size = max_model_len, block_size
        self.is_encoder_decoder = is_encoder_decoder
        self.max_blocks = -(-max_model_len // block_size)
        self.stage = DeviceStager(device)
        self.row_of: dict[int, int] = {}  # req_id -> row
        self._free: list[int] = []
        self.req_ids = np.zeros(0, dtype=np.int64)  # row -> req_id
        self.token_ids = np.zeros((0, max_model_len), dtype=np.int64)  # prompt, then sampled tokens
        self.block_table = np.zeros((0, self.max_blocks), dtype=np.int32)
        self.num_tokens = np.zeros(0, dtype=np.int64)  # tokens known (prompt + sampled)
        self.num_prompt_tokens = np.zeros(0, dtype=np.int64)
        self.num_computed = np.zeros(0, dtype=np.int64)  # tokens whose KV is in the cache
        self.num_blocks = np.zeros(0, dtype=np.int64)
        self.prompt_logprobs = np.zeros(0, dtype=bool)
        self.prompt_top_n = np.zeros(0, dtype=np.int64)  # top tokens wanted at each prompt position
        self.encoder_lens = np.zeros(0, dtype=np.int32)  # encoder-decoder models: the encoder input's length
        self.encoder_table = np.zeros((0, self.max_blocks), dtype=np.int32)  # and its cross-attention blocks
        self.sampling = SamplingTable(0, device)
        self._grow(capacity)

    def __len__(self) -> int:
        return len(self.row_of)

    def _grow(self, capacity: int) -> None:
        old = len(self.num_tokens)

        def pad(a: np.ndarray) -> np.ndarray:
            return np.concatenate([a, np.zeros((capacity - old, *a.shape[1:]), dtype=a.dtype)])

        self.token_ids, self.block_table = pad(self.token_ids), pad(self.block_table)
        self.num_tokens, self.num_prompt_tokens = pad(self.num_tokens), pad(self.num_prompt_tokens)
        self.num_computed, self.num_blocks = pad(self.num_computed), pad(self.num_blocks)
        self.prompt_logprobs, self.req_ids = pad(self.prompt_logprobs), pad(self.req_ids)
        self.prompt_top_n = pad(self.prompt_top_n)
        self.encoder_lens, self.encoder_table = pad(self.encoder_lens), pad(self.encoder_table)
        self.sampling.grow(capacity)
        self._free = list(range(capacity - 1, old - 1, -1)) + self._free

    # -- requests arrive, grow, and go ----------------------------------------------------------
    def add(
        self,
        req_id: int,
        token_ids: list[int],
        num_computed: int,
        block_ids: list[int],
        sampling: SamplingParams,
        prompt_logprobs: bool = False,
        num_prompt_tokens: int = 0,
        prompt_top_n: int = 0,
        encoder_block_ids: list[int] = (),
        encoder_len: int = 0,
    ) -> int:
        """Give a request a row; `token_ids` are all its known tokens (prompt, plus those generated
        before a preemption), `num_computed` the leading ones already in the cache, and the first
        `num_prompt_tokens` (0: all) its prompt. With `prompt_logprobs`, `prompt_top_n` most likely
        tokens are also returned at each prompt position. An encoder-decoder model's request has
        `encoder_len` encoder positions, whose cross-attention K/V are in `encoder_block_ids`."""
        if not self._free:
            self._grow(2 * len(self.num_tokens))
        row = self._free.pop()
        self.row_of[req_id] = row
        self.req_ids[row] = req_id
        n = len(token_ids)
        self.token_ids[row, :n] = token_ids
        self.num_tokens[row] = n
        self.num_prompt_tokens[row] = num_prompt_tokens or n
        self.num_computed[row] = num_computed
        self.block_table[row, : len(block_ids)] = block_ids
        self.num_blocks[row] = len(block_ids)
        self.prompt_logprobs[row] = prompt_logprobs
        self.prompt_top_n[row] = prompt_top_n if prompt_logprobs else 0
        self.encoder_lens[row] = encoder_len
        self.encoder_table[row, : len(encoder_block_ids)] = encoder_block_ids
        self.sampling.set_row(row, sampling)
        return row

    def append_blocks(self, req_id: int, block_ids: list[int]) -> None:
        row = self.row_of[req_id]
        start = self.num_blocks[row]
        self.block_table[row, start : start + len(block_ids)] = block_ids
        self.num_blocks[row] += len(block_ids)

    def remove(self, req_id: int) -> None:
        row = self.row_of.pop(req_id, None)
        if row is not None:
            self._free.append(row)

    def clear(self) -> None:
        for req_id in list(self.row_of):
            self.remove(req_id)

    # -- a step ---------------------------------------------------------------------------------
    def order(self, rows: np.ndarray, num_scheduled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows in execution order: multi-token requests first (as given), then single-token ones
        from the shortest sequence to the longest (the decode kernels group rows by length)."""
        single = num_scheduled == 1
        order = np.lexsort((np.where(single, self.num_computed[rows], 0), single))
        return rows[order], num_scheduled[order]

    def prepare(
        self, rows: np.ndarray, num_scheduled: np.ndarray, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> ModelInputs:
        """Model inputs for `rows` (in `order`'s order) computing `num_scheduled` tokens each."""
        return prepare_inputs(
            self.token_ids,
            self.block_table,
            self.num_tokens,
            self.num_computed,
            rows,
            num_scheduled,
            self.block_size,
            kv_caches,
            self.stage,
            (self.encoder_lens, self.encoder_table) if self.is_encoder_decoder else None,
        )

    def advance(self, inputs: ModelInputs, sampled: list[int]) -> None:
        """After a step: its tokens are computed and each producing row appends its sampled token."""
        self.num_computed[inputs.rows] += inputs.num_scheduled
        producing = inputs.rows[inputs.produces]
        self.token_ids[producing, self.num_tokens[producing]] = sampled
        self.num_tokens[producing] += 1

    def sampling_batch(self, rows: np.ndarray) -> SamplingBatch:
        return self.sampling.gather(rows, self.token_ids, self.num_tokens, self.num_prompt_tokens)


def prepare_inputs(
    token_ids: np.ndarray,  # [R, L] tokens of each row
    block_table: np.ndarray,  # [R, max_blocks] int32
    num_tokens: np.ndarray,  # [R] tokens known per row
    num_computed: np.ndarray,  # [R] tokens already in the cache per row
    rows: np.ndarray,  # [N] rows to compute, multi-token ones first
    num_scheduled: np.ndarray,  # [N] tokens each computes
    block_size: int,
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    stage: DeviceStager,
    encoder: tuple[np.ndarray, np.ndarray] | None = None,  # ([R] encoder lengths, [R, B] their blocks)
) -> ModelInputs:
    """Token ids, positions, KV slots and attention metadata of a step, all vectorized; with
    `encoder` (encoder-decoder models), each token's cross-attention metadata too."""
    rows, num_scheduled = np.asarray(rows, dtype=np.int64), np.asarray(num_scheduled, dtype=np.int64)
    start = num_computed[rows]
    ends = np.cumsum(num_scheduled)  # [N] end of each request's query rows
    request = np.repeat(np.arange(len(rows)), num_scheduled)  # [T] request index of each token
    positions = np.arange(ends[-1]) - (ends - num_scheduled)[request] + start[request]
    token_rows = rows[request]
    input_ids = token_ids[token_rows, positions]
    slots = block_table[token_rows, positions // block_size].astype(np.int64) * block_size + positions % block_size
    context_lens = (start + num_scheduled).astype(np.int32)
    produces = start + num_scheduled == num_tokens[rows]
    num_extend = int((num_scheduled > 1).sum())
    assert (num_scheduled[num_extend:] == 1).all(), "rows are not ordered: multi-token requests come first"

    def table(part: slice, name: str) -> torch.Tensor:  # [n, blocks the longest needs] int32
        width = int(-(-context_lens[part].max() // block_size))
        return stage(name, block_table[rows[part], :width])

    extend = decode = None
    if num_extend:
        part = slice(0, num_extend)
        extend = ExtendMeta(
            num_tokens=int(ends[num_extend - 1]),
            cu_seqlens_q=stage("cu_seqlens_q", np.concatenate([[0], ends[part]]).astype(np.int32)),
            context_lens=stage("extend_context_lens", context_lens[part]),
            block_tables=table(part, "extend_block_tables"),
        )
    if num_extend < len(rows):
        part = slice(num_extend, None)
        decode = DecodeMeta(
            context_lens=stage("decode_context_lens", context_lens[part]),
            block_tables=table(part, "decode_block_tables"),
            max_context_len=int(context_lens[part].max()),
        )
    cross = None
    if encoder is not None:
        encoder_lens, encoder_table = encoder
        lens = encoder_lens[token_rows]
        width = max(1, int(-(-lens.max() // block_size)))
        cross = CrossMeta(
            context_lens=stage("cross_context_lens", lens),
            block_tables=stage("cross_block_tables", encoder_table[token_rows, :width]),
            max_context_len=int(lens.max()),
        )
    context = ForwardContext(stage("slot_mapping", slots), extend, decode, kv_caches, cross)
    return ModelInputs(
        input_ids=stage("input_ids", input_ids),
        positions=stage("positions", positions),
        context=context,
        sample_rows=stage("sample_rows", (ends - 1)[produces]),
        rows=rows,
        num_scheduled=num_scheduled,
        produces=produces,
    )
