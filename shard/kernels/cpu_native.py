"""C++ CPU kernels (csrc/), compiled once per machine for its vector ISA and cached on disk.

`load(cache_dir)` builds them with torch's extension builder into `cache_dir/extensions` (the
first time on a machine, which `make install` does: ~70 s on 2 cores; later starts only load the
library) and registers the ops under `torch.ops.sluice_cpu`. The ISA comes from
`torch.backends.cpu.get_cpu_capability()`, so a cache shared by different machines keeps one build
per ISA.
"""

import hashlib
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [
    _CSRC / f"cpu_{name}.cpp"
    for name in (
        "attention",
        "extend",
        "step",
        "sampling",
        "linear",
        "int8",
        "int8_avx512",
        "int8_avx2",
        "amx",
        "dense_amx",
        "dense_avx2",
    )
]
_ISA_FLAGS = {  # what at::vec expects for each CPU_CAPABILITY, as Inductor compiles it
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}
_loaded: str | None = None  # the ISA built, once loaded


def load(cache_dir: Path) -> str:
    """Build (if needed) and load the kernels; returns the ISA they were built for. Raises
    RuntimeError, with the compiler's reason, where they cannot be built (no C++ compiler)."""
    global _loaded
    if _loaded is not None:
        return _loaded
    isa = build_isa()
    # The sources' digest names the build, headers included (torch only tracks the .cpp files).
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(_CSRC.iterdir()))).hexdigest()[:12]
    name = f"sluice_cpu_{isa.lower()}_{digest}"
    build_dir = cache_dir / "extensions" / name
    try:
        build_library(name, _SOURCES, build_dir)
    except (RuntimeError, OSError) as e:  # no compiler, or it failed: the caller decides what to fall back to
        raise RuntimeError(f"could not build the C++ CPU kernels in {build_dir}: {e}") from e
    _register_fakes()
    _loaded = isa
    log.info("C++ CPU kernels loaded (%s, %s)", isa, build_dir)
    return isa


def build_isa() -> str:
    """The vector ISA the kernels are built for on this CPU (at::vec's CPU_CAPABILITY name)."""
    isa = torch.backends.cpu.get_cpu_capability()
    return isa if isa in _ISA_FLAGS else "DEFAULT"


def build_library(name: str, sources: list[Path], build_dir: Path, include_dir: Path | None = None) -> None:
    """Build (if needed) `sources` into the library `name` in `build_dir` for this CPU's ISA, and
    load it: the ops it registers appear under torch.ops."""
    from torch.utils import cpp_extension

    isa = build_isa()
    flags = ["-O3", "-fopenmp", f"-DCPU_CAPABILITY={isa}", f"-DCPU_CAPABILITY_{isa}", *_ISA_FLAGS.get(isa, [])]
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=name,
        sources=[str(s) for s in sources],
        extra_cflags=flags + ([f"-I{include_dir}"] if include_dir else []),
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        is_python_module=False,
    )


def is_loaded() -> bool:
    return _loaded is not None


def _register_fakes() -> None:
    """Shapes of the ops a compiled forward calls, for tracing."""

    @torch.library.register_fake("sluice_cpu::packed_linear")
    def _(x, handle, out_features, bias):
        return x.new_empty(*x.shape[:-1], out_features)

    @torch.library.register_fake("sluice_cpu::dense_amx_linear")
    def _(x, handle, out_features, bias):
        return x.new_empty(*x.shape[:-1], out_features)

    @torch.library.register_fake("sluice_cpu::dense_avx2_linear")
    def _(x, handle, out_features, bias):
        return x.new_empty(*x.shape[:-1], out_features)

    @torch.library.register_fake("sluice_cpu::int8_linear")
    def _(x, handle, out_features, bias, act_quant_min_rows):
        return x.new_empty(*x.shape[:-1], out_features)

    @torch.library.register_fake("sluice_cpu::attention")
    def _(q, k, v, layer, scale, sliding_window, softcap, alibi_slopes, position_bias):
        return torch.empty_like(q)


def set_step(ctx) -> None:
    """The step's metadata and caches (a shard.context.ForwardContext) for sluice_cpu::attention."""
    e, d = ctx.extend, ctx.decode
    torch.ops.sluice_cpu.set_step(
        [k for k, _ in ctx.kv_caches],
        [v for _, v in ctx.kv_caches],
        ctx.slot_mapping,
        e.num_tokens if e is not None else 0,
        e.cu_seqlens_q if e is not None else None,
        e.context_lens if e is not None else None,
        e.block_tables if e is not None else None,
        d.context_lens if d is not None else None,
        d.block_tables if d is not None else None,
    )


def attention_decode(
    query: torch.Tensor,  # [num_reqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    context_lens: torch.Tensor,  # [num_reqs] int32, including the query token
    block_tables: torch.Tensor,  # [num_reqs, max_blocks] int32
    scale: float,
    max_context_len: int,
    sliding_window: int = 0,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,  # [num_heads] float32
    position_bias: torch.Tensor | None = None,  # [num_heads, L] float32
) -> torch.Tensor:  # [num_reqs, num_heads, head_dim]
    """reference.attention_decode, features included, reading each row's K/V in place through its
    block table: only the positions in its window."""
    return torch.ops.sluice_cpu.paged_attention_decode(
        query, k_cache, v_cache, block_tables, context_lens, scale, sliding_window, softcap, alibi_slopes, position_bias
    )


def attention_extend(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,  # [num_reqs + 1] int32
    context_lens: torch.Tensor,  # [num_reqs] int32, cached prefix + new tokens
    block_tables: torch.Tensor,  # [num_reqs, max_blocks] int32
    scale: float,
    sliding_window: int = 0,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,  # [num_heads] float32
    position_bias: torch.Tensor | None = None,  # [num_heads, L] float32
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """reference.attention_extend, features included, reading the cached prefix and the new tokens
    in place (from the start of each query block's window)."""
    return torch.ops.sluice_cpu.paged_attention_extend(
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


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    """reference.store_kv: each token's K and V rows into its slot."""
    torch.ops.sluice_cpu.store_kv(key, value, k_cache, v_cache, slot_mapping)


def argmax_logsumexp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, vocab] float32 -> (argmax [N] int64, logsumexp [N] float32), in one call."""
    return torch.ops.sluice_cpu.argmax_logsumexp(logits)


if __name__ == "__main__":  # `make install`: build ahead of the first shard start (or say why not)
    from shard.config import default_cache_dir

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        load(default_cache_dir())
    except RuntimeError as e:
        log.warning("%s; shards will use the slower torch reference attention", e)
