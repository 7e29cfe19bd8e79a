"""Per-step attention metadata, set by the runner around each forward.

Model code takes only `(input_ids, positions)`; attention layers read everything else about
the step from here, so the model knows nothing of serving.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class ExtendMeta:
    """Requests computing several tokens (prompt chunks): query rows [0, num_tokens) of the step.

    Request i owns query rows `cu_seqlens_q[i]:cu_seqlens_q[i+1]`, the last rows of its
    sequence of `context_lens[i]` tokens (cached prefix + this step's tokens).
    """

    num_tokens: int
    cu_seqlens_q: torch.Tensor  # [num_reqs + 1] int32, prefix sums of query lengths
    context_lens: torch.Tensor  # [num_reqs] int32, sequence length after this step
    block_tables: torch.Tensor  # [num_reqs, max_blocks] int32, padded with 0


@dataclass(frozen=True, slots=True)
class DecodeMeta:
    """Requests computing one token each: the step's query rows after the extend rows, one per request."""

    context_lens: torch.Tensor  # [num_reqs] int32, sequence length after this step
    block_tables: torch.Tensor  # [num_reqs, max_blocks] int32, padded with 0
    max_context_len: int  # host copy of context_lens.max()


@dataclass(frozen=True, slots=True)
class CrossMeta:
    """Encoder-decoder models: what each of the step's tokens attends to in cross-attention, the
    K/V of its request's encoder output (every position, no causal mask)."""

    context_lens: torch.Tensor  # [num_tokens] int32, the token's request's encoder length
    block_tables: torch.Tensor  # [num_tokens, max_blocks] int32, that request's encoder blocks
    max_context_len: int  # host copy of context_lens.max()


@dataclass(frozen=True, slots=True)
class ForwardContext:
    """Where this step's tokens live in the paged KV cache.

    A step's tokens are laid out request after request, multi-token requests first, so that
    each part runs its own kernel: prompt chunks the causal extend, single tokens the batched
    decode (in a mixed step too).
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64, KV slot of each token of the step
    extend: ExtendMeta | None
    decode: DecodeMeta | None
    # Per layer (K, V), each [num_blocks, block_size, num_kv_heads, head_dim]; indexed by
    # Attention.layer_index.
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    cross: CrossMeta | None = None  # encoder-decoder models only


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
