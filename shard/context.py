"""Per-step attention metadata, set by the runner around each forward.

Model code takes only `(input_ids, positions)`; attention layers read everything else about
the step from here, so the model knows nothing of serving.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class ForwardContext:
    """Where this step's tokens live in the paged KV cache.

    Tokens of one step are laid out request after request; request i owns query rows
    `cu_seqlens_q[i]:cu_seqlens_q[i+1]`, which are the last rows of its sequence of
    `context_lens[i]` tokens (cached prefix + this step's tokens).
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64, KV slot of each token of the step
    cu_seqlens_q: torch.Tensor  # [num_reqs + 1] int32, prefix sums of query lengths
    context_lens: torch.Tensor  # [num_reqs] int32, sequence length after this step
    block_tables: torch.Tensor  # [num_reqs, max_blocks] int32, padded with 0
    max_query_len: int  # host copy: 1 means a pure decode step
    max_context_len: int  # host copy of context_lens.max()


_context: ForwardContext | None = None


def get_context() -> ForwardContext:
    assert _context is not None, "attention called outside forward_context()"
    return _context


@contextmanager
def forward_context(ctx: ForwardContext):
    global _context
    _context = ctx
    try:
        yield ctx
    finally:
        _context = None
