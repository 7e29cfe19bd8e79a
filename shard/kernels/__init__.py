"""The one import point for attention kernels.

`select_backend(device)` is called once by the runner; afterwards `store_kv`,
`attention_extend` and `attention_decode` dispatch, with identical signatures, to:
- "triton" on CUDA: the Triton kernels;
- "cpu" on a CPU: the C++ kernels (cpu_native): KV store, prompt (extend) and decode attention
  reading the paged cache in place, and the greedy reductions;
- "reference" elsewhere, or on a CPU where the C++ kernels cannot be built (no compiler).
Every backend implements the per-layer features (sliding window, soft-cap, ALiBi, position bias; see
paged_attention) itself, and none reads the KV blocks wholly before a query's window.
"""

import logging
from pathlib import Path

import torch

from shard.context import ForwardContext, get_context
from shard.kernels import reference

log = logging.getLogger(__name__)

_store_kv = reference.store_kv
_extend = reference.attention_extend
_decode = reference.attention_decode
_argmax_logsumexp = reference.argmax_logsumexp
_native_step = False  # the CPU kernels hold the step's metadata and run a layer's attention in one C++ op


def select_backend(device: torch.device, cache_dir: Path) -> str:
    """Choose the kernels for `device`; `cache_dir` holds built C++ kernels. Returns the name."""
    global _store_kv, _extend, _decode, _argmax_logsumexp, _native_step
    _store_kv, _extend, _decode = reference.store_kv, reference.attention_extend, reference.attention_decode
    _argmax_logsumexp, _native_step = reference.argmax_logsumexp, False
    if device.type == "cuda":
        try:
            from shard.kernels import triton_attention as t
        except ImportError:
            log.warning("triton is not importable: using the torch reference kernels on CUDA")
            return "reference"
        _store_kv, _extend, _decode = t.store_kv, t.attention_extend, t.attention_decode
        return "triton"
    if device.type == "cpu":
        from shard.kernels import cpu_native

        try:
            cpu_native.load(cache_dir)
        except RuntimeError as e:
            log.warning("%s; decoding with the slower torch reference attention", e)
            return "reference"
        _store_kv, _extend, _decode = cpu_native.store_kv, cpu_native.attention_extend, cpu_native.attention_decode
        _argmax_logsumexp, _native_step = cpu_native.argmax_logsumexp, True
        return "cpu"
    return "reference"


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    _store_kv(key, value, k_cache, v_cache, slot_mapping)


def attention_extend(
    query,
    k_cache,
    v_cache,
    cu_seqlens_q,
    context_lens,
    block_tables,
    scale,
    sliding_window=0,
    softcap=0.0,
    alibi_slopes=None,
    position_bias=None,
):
    return _extend(
        query,
        k_cache,
        v_cache,
        cu_seqlens_q,
        context_lens,
        block_tables,
        scale,
        sliding_window,
        softcap,
        alibi_slopes,
        position_bias,
    )


def attention_decode(
    query,
    k_cache,
    v_cache,
    context_lens,
    block_tables,
    scale,
    max_context_len,
    sliding_window=0,
    softcap=0.0,
    alibi_slopes=None,
    position_bias=None,
):
    return _decode(
        query,
        k_cache,
        v_cache,
        context_lens,
        block_tables,
        scale,
        max_context_len,
        sliding_window,
        softcap,
        alibi_slopes,
        position_bias,
    )


def argmax_logsumexp(logits):
    return _argmax_logsumexp(logits)


def begin_step(ctx: ForwardContext) -> None:
    """Hand the step's metadata to the kernels that keep it themselves (the C++ CPU kernels)."""
    if _native_step:
        from shard.kernels import cpu_native

        cpu_native.set_step(ctx)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_index: int,
    scale: float,
    sliding_window: int = 0,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    position_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, Hq, D], k and v [T, Hkv, D] -> [T, Hq, D]: store the step's K/V in the layer's cache,
    then attend. One opaque op, so a compiled forward calls it as a unit.

    The layer's features, as in reference.attention_decode: `sliding_window` > 0 limits each
    query to its last that many positions, `softcap` > 0 soft-caps the scores, `alibi_slopes`
    [Hq] float32 adds ALiBi biases, `position_bias` [Hq, L] float32 adds the bias of each
    distance i - j (the last column for every distance from L - 1 on, T5's decoder). Blocks
    wholly before a query's window are never read."""
    features = (sliding_window, softcap, alibi_slopes, position_bias)
    if _native_step:
        return torch.ops.sluice_cpu.attention(q, k, v, layer_index, scale, *features)
    return _context_attention(q, k, v, layer_index, scale, *features)


@torch.library.custom_op("sluice::attention", mutates_args=())
def _context_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_index: int,
    scale: float,
    sliding_window: int,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    position_bias: torch.Tensor | None,
) -> torch.Tensor:
    """paged_attention for the backends without a step of their own: reads the forward context."""
    ctx = get_context()
    k_cache, v_cache = ctx.kv_caches[layer_index]
    store_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
    features = (sliding_window, softcap, alibi_slopes, position_bias)
    e, d = ctx.extend, ctx.decode
    if e is None:
        return attention_decode(
            q, k_cache, v_cache, d.context_lens, d.block_tables, scale, d.max_context_len, *features
        )
    extend = attention_extend(
        q[: e.num_tokens], k_cache, v_cache, e.cu_seqlens_q, e.context_lens, e.block_tables, scale, *features
    )
    if d is None:
        return extend
    out = torch.empty_like(q)  # mixed step: prompt chunks first, then single tokens
    out[: e.num_tokens] = extend
    out[e.num_tokens :] = attention_decode(
        q[e.num_tokens :], k_cache, v_cache, d.context_lens, d.block_tables, scale, d.max_context_len, *features
    )
    return out


@_context_attention.register_fake
def _(q, k, v, layer_index, scale, sliding_window, softcap, alibi_slopes, position_bias):
    return torch.empty_like(q)
