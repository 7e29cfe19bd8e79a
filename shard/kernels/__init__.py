"""The one import point for attention kernels.

`select_backend(device)` is called once by the runner; afterwards `store_kv`,
`attention_extend` and `attention_decode` dispatch to the Triton kernels on CUDA and to the
torch reference elsewhere, with identical signatures, so callers never branch.
"""

import torch

from shard.kernels import reference

_backend = reference


def select_backend(device: torch.device) -> str:
    """Choose the kernels for `device` ("triton" on CUDA when available, else "reference")."""
    global _backend
    _backend = reference
    if device.type == "cuda":
        try:
            from shard.kernels import triton_attention

            _backend = triton_attention
        except ImportError:
            pass
    return _backend.__name__.rsplit(".", 1)[-1]


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    _backend.store_kv(key, value, k_cache, v_cache, slot_mapping)


def attention_extend(query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale):
    return _backend.attention_extend(query, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale)


def attention_decode(query, k_cache, v_cache, context_lens, block_tables, scale, max_context_len):
    return _backend.attention_decode(query, k_cache, v_cache, context_lens, block_tables, scale, max_context_len)
