"""The one import point for attention kernels.

`select_backend(device)` is called once by the runner; afterwards `store_kv`,
`attention_extend` and `attention_decode` dispatch, with identical signatures, to:
- "triton" on CUDA: the Triton kernels;
- "cpu" on a CPU: the C++ kernels (cpu_native): KV store, prompt (extend) and decode attention
  reading the paged cache in place, and the greedy reductions;
- "reference" elsewhere, or on a CPU where the C++ kernels cannot be built (no compiler).
"""

import logging
from pathlib import Path

import torch

from shard.kernels import reference

log = logging.getLogger(__name__)

_store_kv = reference.store_kv
_extend = reference.attention_extend
_decode = reference.attention_decode
_argmax_logsumexp = reference.argmax_logsumexp


def select_backend(device: torch.device, cache_dir: Path) -> str:
    """Choose the kernels for `device`; `cache_dir` holds built C++ kernels. Returns the name."""
    global _store_kv, _extend, _decode, _argmax_logsumexp
    _store_kv, _extend, _decode = reference.store_kv, reference.attention_extend, reference.attention_decode
    _argmax_logsumexp = reference.argmax_logsumexp
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
        _argmax_logsumexp = cpu_native.argmax_logsumexp
        return "cpu"
    return "reference"


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    _store_kv(key, value, k_cache, v_cache, slot_mapping)


def attention_extend(query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale):
    return _extend(query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale)


def attention_decode(query, k_cache, v_cache, context_lens, block_tables, scale, max_context_len):
    return _decode(query, k_cache, v_cache, context_lens, block_tables, scale, max_context_len)


def argmax_logsumexp(logits):
    return _argmax_logsumexp(logits)
