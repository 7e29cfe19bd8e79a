"""Every request's sampling parameters in rows kept on the device, gathered per step.

A row is written once, when its request arrives (one small host-to-device copy); each step
gathers the rows that sample with one `index_select` per parameter it needs. Host copies of
which features each row uses let a step skip the unused ones without reading the device.
A row's logit_bias is a variable-length list: it lives in a [capacity, K] pair of device
tables (token ids and biases, zero-padded) whose width K grows to the longest list seen.
"""

import numpy as np
import torch

from shard.sampler import LogitBias, Penalties, SamplingBatch, SamplingParams, signed_seed

_FLOAT = ("temperature", "top_p", "typical_p", "repetition_penalty", "frequency_penalty", "presence_penalty", "min_p")
_INT = ("top_k", "seed")
_BOOL = ("do_sample", "watermark", "raw_logprobs")
_COLUMNS = ((_FLOAT, torch.float32), (_INT, torch.int64), (_BOOL, torch.bool))
# Host flags per row, one column each: which code paths a batch containing the row must run.
SAMPLE, TOP_K_P, TYPICAL, WATERMARK, REPETITION, FREQUENCY, RAW, PRESENCE, MIN_P, BIAS = range(10)
_NUM_FLAGS = 10


class SamplingTable:
    def __init__(self, capacity: int, device: torch.device):
        self.device = device
        self.columns = {n: torch.zeros(capacity, dtype=t, device=device) for names, t in _COLUMNS for n in names}
        self.uses = np.zeros((capacity, _NUM_FLAGS), dtype=bool)
        self.top_n = np.zeros(capacity, dtype=np.int64)
        self.bias_len = np.zeros(capacity, dtype=np.int64)  # entries of each row's logit_bias
        self.bias_tokens = torch.zeros(capacity, 0, dtype=torch.int64, device=device)  # [capacity, K]
        self.bias_values = torch.zeros(capacity, 0, dtype=torch.float32, device=device)  # [capacity, K]

    def grow(self, capacity: int) -> None:
        """Keep every row and make room for rows up to `capacity`."""
        extra = capacity - len(self.top_n)
        self.columns = {n: torch.cat([c, c.new_zeros(extra)]) for n, c in self.columns.items()}
        self.uses = np.concatenate([self.uses, np.zeros((extra, self.uses.shape[1]), dtype=bool)])
        self.top_n = np.concatenate([self.top_n, np.zeros(extra, dtype=np.int64)])
        self.bias_len = np.concatenate([self.bias_len, np.zeros(extra, dtype=np.int64)])
        self.bias_tokens = torch.cat([self.bias_tokens, self.bias_tokens.new_zeros(extra, self.bias_tokens.shape[1])])
        self.bias_values = torch.cat([self.bias_values, self.bias_values.new_zeros(extra, self.bias_values.shape[1])])

    def _set_logit_bias(self, row: int, pairs: tuple[tuple[int, float], ...]) -> None:
        """Write one row's (token, bias) pairs, widening the tables (to a power of two) if needed."""
        width = self.bias_tokens.shape[1]
        if len(pairs) > width:
            extra = (1 << (len(pairs) - 1).bit_length()) - width
            self.bias_tokens = torch.cat([self.bias_tokens, self.bias_tokens.new_zeros(len(self.top_n), extra)], 1)
            self.bias_values = torch.cat([self.bias_values, self.bias_values.new_zeros(len(self.top_n), extra)], 1)
        if self.bias_len[row]:  # a reused row: clear its previous request's entries
            self.bias_tokens[row].zero_()
            self.bias_values[row].zero_()
        if pairs:
            tokens, values = zip(*pairs)
            n = len(pairs)
            self.bias_tokens[row, :n] = torch.tensor(tokens, dtype=torch.int64).to(self.device, non_blocking=True)
            self.bias_values[row, :n] = torch.tensor(values, dtype=torch.float32).to(self.device, non_blocking=True)
        self.bias_len[row] = len(pairs)

    def set_row(self, row: int, p: SamplingParams) -> None:
        """Write one request's parameters, normalized so that a disabled feature is a no-op value."""
        sample = p.do_sample
        values = {
            "temperature": p.temperature if sample and p.temperature > 0 else 1.0,
            "top_p": p.top_p if sample and 0 < p.top_p < 1 else 1.0,
            "typical_p": p.typical_p if sample and 0 < p.typical_p < 1 else 1.0,
            "repetition_penalty": p.repetition_penalty if p.repetition_penalty not in (0.0, 1.0) else 1.0,
            "frequency_penalty": p.frequency_penalty,
            "presence_penalty": p.presence_penalty,
            "min_p": p.min_p if sample and 0 < p.min_p <= 1 else 0.0,
            "top_k": p.top_k if sample else 0,
            "seed": signed_seed(p.seed % (1 << 64)),
            "do_sample": sample,
            "watermark": p.watermark,
            "raw_logprobs": p.raw_logprobs,
        }
        for names, dtype in _COLUMNS:
            row_values = torch.tensor([values[n] for n in names], dtype=dtype).to(self.device, non_blocking=True)
            for name, value in zip(names, row_values):
                self.columns[name][row] = value
        self.uses[row] = (
            sample,
            values["top_k"] > 0 or values["top_p"] < 1,
            values["typical_p"] < 1,
            p.watermark,
            values["repetition_penalty"] != 1.0,
            p.frequency_penalty != 0,
            p.raw_logprobs,
            p.presence_penalty != 0,
            values["min_p"] > 0,
            bool(p.logit_bias),
        )
        self.top_n[row] = p.top_n_tokens
        self._set_logit_bias(row, p.logit_bias)

    def gather(
        self,
        rows: np.ndarray,  # [N] table rows of the requests that sample, in batch order
        token_ids: np.ndarray,  # [R, L] each table row's tokens so far (prompt + generated), padded
        num_tokens: np.ndarray,  # [R] known tokens per table row
        num_prompt_tokens: np.ndarray,  # [R]
    ) -> SamplingBatch:
        """The step's SamplingBatch: parameters gathered on the device, histories only where used."""
        uses = self.uses[rows]
        used = uses.any(axis=0)
        index = self._to_device(rows)

        def col(name: str, flag: int) -> torch.Tensor | None:
            return self.columns[name].index_select(0, index) if used[flag] else None

        lengths = num_tokens[rows]
        penalties = None
        if used[REPETITION] or used[FREQUENCY] or used[PRESENCE]:
            penalized = np.nonzero(uses[:, REPETITION] | uses[:, FREQUENCY] | uses[:, PRESENCE])[0]  # batch rows
            width = int(lengths[penalized].max())
            seen = np.arange(width)[None, :] < lengths[penalized][:, None]  # [P, width]
            batch_rows = np.broadcast_to(penalized[:, None], seen.shape)[seen]
            positions = np.broadcast_to(np.arange(width)[None, :], seen.shape)[seen]
            generated = positions >= num_prompt_tokens[rows[batch_rows]]
            penalties = Penalties(
                repetition=col("repetition_penalty", REPETITION),
                frequency=col("frequency_penalty", FREQUENCY),
                rows=self._to_device(batch_rows),
                tokens=self._to_device(token_ids[rows[penalized], :width][seen]),
                generated=self._to_device(generated.astype(np.float32)),
                presence=col("presence_penalty", PRESENCE),
            )
        logit_bias = None
        if used[BIAS]:
            k = int(self.bias_len[rows].max())
            logit_bias = LogitBias(
                self.bias_tokens[:, :k].index_select(0, index), self.bias_values[:, :k].index_select(0, index)
            )
        return SamplingBatch(
            do_sample=col("do_sample", SAMPLE),
            temperature=col("temperature", SAMPLE),
            top_k=col("top_k", TOP_K_P),
            top_p=col("top_p", TOP_K_P),
            typical_p=col("typical_p", TYPICAL),
            seeds=col("seed", SAMPLE),
            positions=self._to_device(lengths) if used[SAMPLE] else None,
            watermark=col("watermark", WATERMARK),
            prev_tokens=self._to_device(token_ids[rows, lengths - 1]) if used[WATERMARK] else None,
            penalties=penalties,
            max_top_n=int(self.top_n[rows].max(initial=0)),
            raw_logprobs=col("raw_logprobs", RAW),
            min_p=col("min_p", MIN_P),
            logit_bias=logit_bias,
        )

    def _to_device(self, values: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(values))
        if t.dtype in (torch.int32, torch.int16, torch.uint8):
            t = t.long()
        return t.to(self.device, non_blocking=True)


def sampling_batch(
    params: list[SamplingParams],
    histories: list[list[int]],  # tokens of each sequence so far (prompt + generated)
    num_prompt_tokens: list[int],
    device: torch.device | str = "cpu",
) -> SamplingBatch:
    """The SamplingBatch of rows given as Python values (tests), through a table of their own."""
    table = SamplingTable(len(params), torch.device(device))
    for row, p in enumerate(params):
        table.set_row(row, p)
    width = max(len(h) for h in histories)
    tokens = np.array([h + [0] * (width - len(h)) for h in histories], dtype=np.int64)
    lengths = np.array([len(h) for h in histories])
    return table.gather(np.arange(len(params)), tokens, lengths, np.array(num_prompt_tokens))
