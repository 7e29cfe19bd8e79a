"""4-bit weights packed eight to an int32, and what the pre-quantized linear methods share.

Every 4-bit format (GPTQ, AWQ, compressed-tensors pack-quantized) is read into one logical form,
`Int4Weights`: unsigned values q [K, N] in 0..15, per-group scales and zero points [groups, N] and
the group of each input feature g_idx [K], with w[k, n] = (q[k, n] - zeros[g, n]) * scales[g, n],
g = g_idx[k]. From it, `Int4LinearMethod` either dequantizes (CPU: the dense weight is then packed
for oneDNN as an unquantized one, so serving runs at the unquantized model's speed) or repacks for
the Triton kernels (GPU: shard/kernels/triton_quant.py), whose canonical layout is qweight
[K // 8, N] int32 (nibble j of row r holds k = 8r + j), scales and zeros [K // G, N] for groups of
G consecutive input features (scales in the compute dtype where it holds them exactly, else float32).
Act-order checkpoints (groups not contiguous in k) are permuted at
load so that they are: the layer keeps `perm` and gathers the input's features through it.
"""

import logging
from abc import abstractmethod

import torch
from torch import nn

from shard.quantization.base import LayerShape, LinearMethod, QuantizationError, Target, UnquantizedLinearMethod

log = logging.getLogger(__name__)

PACK = 8  # 4-bit values per int32
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ: nibble j of a word holds column 8c + AWQ_ORDER[j]

_logged: set[str] = set()


def log_once(key: str, message: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        log.info(message, *args)


def kernels():
    """shard.kernels.triton_quant, imported on first use (it needs triton and a GPU)."""
    from shard.kernels import triton_quant

    return triton_quant


def require_kernels(target: Target, scheme: str) -> None:
    """Fail at startup where `target` has neither the CPU path nor the Triton kernels."""
    if target.device.type == "cpu":
        return
    if target.device.type != "cuda":
        raise QuantizationError(f"{scheme} runs on CPU (dequantized) and CUDA, not on {target.device.type}")
    try:
        kernels()
    except ImportError as e:
        raise QuantizationError(
            f"{scheme} on CUDA needs the Triton kernels of shard/kernels/triton_quant.py: {e}"
        ) from e


def check_multiple(value: int, of: int, what: str) -> None:
    if of <= 0 or value % of:
        raise QuantizationError(f"{what} ({value}) is not a multiple of {of}")


# -- packing -------------------------------------------------------------------------------


def unpack(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words -> their 4-bit values (uint8, 0..15), 8 per word along `dim`, nibble j (bits
    4j..4j+3) of word i becoming element 8i + j."""
    dim = dim % packed.dim()
    shifts = _SHIFTS.to(packed.device).view([PACK if d == dim + 1 else 1 for d in range(packed.dim() + 1)])
    values = (packed.to(torch.int32).unsqueeze(dim + 1) >> shifts) & 0xF  # [..., words, 8, ...]
    return values.flatten(dim, dim + 1).to(torch.uint8)


def pack(values: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of `unpack`: values 0..15, a multiple of 8 along `dim` -> int32 words."""
    dim = dim % values.dim()
    grouped = values.to(torch.int64).unflatten(dim, (-1, PACK))
    shifts = _SHIFTS.to(device=values.device, dtype=torch.int64).view(
        [PACK if d == dim + 1 else 1 for d in range(grouped.dim())]
    )
    words = (grouped << shifts).sum(dim + 1)  # disjoint bits: the sum is the OR
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_awq(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """AutoAWQ's GEMM packing: like `unpack`, with the columns of each word interleaved (AWQ_ORDER)."""
    values = unpack(packed, dim).movedim(dim, -1)
    inverse = torch.tensor([AWQ_ORDER.index(i) for i in range(PACK)], device=values.device)
    ordered = values.unflatten(-1, (-1, PACK)).index_select(-1, inverse).flatten(-2)
    return ordered.movedim(-1, dim)


# -- the logical form ----------------------------------------------------------------------


class Int4Weights:
    """q [K, N] uint8 (0..15), scales / zeros [groups, N] float32, g_idx [K] int64."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor):
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= scales.shape[0]):
            raise QuantizationError(
                f"g_idx names groups {int(g_idx.min())}..{int(g_idx.max())}, but the scales have {scales.shape[0]}"
            )
        self.q, self.scales, self.zeros, self.g_idx = q, scales.float(), zeros.float(), g_idx.long()

    def dequantize(self) -> torch.Tensor:
        """w [K, N] float32."""
        return (self.q.float() - self.zeros[self.g_idx]) * self.scales[self.g_idx]

    def canonical(self, dtype: torch.dtype) -> dict:
        """The Triton kernels' layout (module docstring): qweight, scales, zeros, group_size, and
        perm [K'] (None when the groups are already contiguous runs of group_size features), the
        input feature that row k' of the repacked weight multiplies; perm[k'] == K selects a zero
        feature, which pads groups that hold fewer features on this rank (act-order checkpoints
        split over ranks, whose groups are scattered over the input features)."""
        K = self.q.shape[0]
        device = self.q.device
        counts = torch.bincount(self.g_idx, minlength=self.scales.shape[0])
        present = counts.nonzero().squeeze(1)  # ascending
        n = len(present)
        size = K // n
        arange = torch.arange(K, device=device)
        if (
            K % n == 0
            and torch.equal(present, torch.arange(n, device=device))
            and torch.equal(self.g_idx, arange // size)
        ):
            perm, q = None, self.q
        else:  # sort the features by group; row (i * size + j) holds the j-th feature of the i-th present group
            size = -(-int(counts.max()) // PACK) * PACK
            order = torch.argsort(self.g_idx, stable=True)
            starts = torch.cumsum(counts[present], 0) - counts[present]
            rank_in_group = arange - torch.repeat_interleave(starts, counts[present])
            rows = torch.searchsorted(present, self.g_idx[order]) * size + rank_in_group
            perm = torch.full((n * size,), K, dtype=torch.long, device=device)
            perm[rows] = order
            q = torch.zeros(n * size, self.q.shape[1], dtype=self.q.dtype, device=device)
            q[rows] = self.q[order]
        if q.shape[0] % PACK:
            raise QuantizationError(f"{q.shape[0]} input features per rank is not a multiple of {PACK}")
        scales = self.scales[present]
        # the kernel dequantizes in float32: keep float32 scales unless `dtype` holds them exactly (float16
        # scales of GPTQ / AWQ lose 3 bits in bfloat16); zero points are small integers, exact in any dtype
        if torch.equal(scales.to(dtype).float(), scales):
            scales = scales.to(dtype)
        return {
            "qweight": pack(q, 0).contiguous(),
            "scales": scales.contiguous(),
            "zeros": self.zeros[present].to(dtype).contiguous(),
            "group_size": size,
            "perm": perm,
        }


# -- the linear method ---------------------------------------------------------------------


def replace_with_dense(method: LinearMethod, layer: nn.Module, weight: torch.Tensor, names, target: Target) -> None:
    """Drop the quantized parameters `names` and give `layer` the dense `weight` [N, K], processed
    as an unquantized layer's (oneDNN-packed on CPU)."""
    for name in names:
        if name in layer._parameters:
            del layer._parameters[name]
    layer.weight = nn.Parameter(weight.to(target.dtype).contiguous(), requires_grad=False)
    method.dense.process_after_loading(layer)


class Int4LinearMethod(LinearMethod):
    """A 4-bit format: subclasses register the checkpoint's tensors (`create_weights`) and read
    them into `Int4Weights` (`read`); this class dequantizes or repacks them."""

    name = "int4"
    format_name = "4-bit"

    def __init__(self, target: Target):
        self.target = target
        self.dense = UnquantizedLinearMethod(target.cpu_gemm)
        self.use_kernels = target.device.type != "cpu"

    @abstractmethod
    def read(self, layer: nn.Module) -> Int4Weights:
        """The layer's loaded checkpoint tensors as Int4Weights."""

    def checkpoint_params(self, layer: nn.Module) -> list[str]:
        return [n for n in layer._parameters if n != "bias"]

    def process_after_loading(self, layer: nn.Module) -> None:
        weights = self.read(layer)
        names = self.checkpoint_params(layer)
        if not self.use_kernels:
            log_once(
                f"dequantized-{self.format_name}",
                "%s checkpoint: weights dequantized to %s at load on %s (no 4-bit CPU kernel)",
                self.format_name,
                str(self.target.dtype).removeprefix("torch."),
                self.target.device,
            )
            replace_with_dense(self, layer, weights.dequantize().t(), names, self.target)
            return
        packed = weights.canonical(self.target.dtype)
        for name in names:
            del layer._parameters[name]
        for name in ("qweight", "scales", "zeros"):
            layer.register_parameter(f"w4_{name}", nn.Parameter(packed[name], requires_grad=False))
        layer.w4_group_size = packed["group_size"]
        perm = packed["perm"]
        layer.w4_padded = perm is not None and bool((perm == weights.q.shape[0]).any())
        layer.register_buffer("w4_perm", perm, persistent=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not self.use_kernels:
            return self.dense.apply(layer, x, bias)
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if layer.w4_perm is not None:
            if layer.w4_padded:
                x = torch.cat([x, x.new_zeros(x.shape[0], 1)], dim=1)
            x = x.index_select(-1, layer.w4_perm)
        out = kernels().w4a16_linear(x, layer.w4_qweight, layer.w4_scales, layer.w4_zeros, layer.w4_group_size, bias)
        return out.reshape(*shape[:-1], out.shape[-1])

    def weight_bytes(self, layer: nn.Module) -> int:
        return self.dense.weight_bytes(layer)


def groups_per_rank(shape: LayerShape, group_size: int, fmt: str, replicated_ok: bool) -> tuple[int, int, bool]:
    """(features per group, scale rows on this rank, whether the scales are split with the inputs)
    for a layer of `shape` and a checkpoint's group size (-1: one group per output channel).
    Row-parallel layers split the scales' rows with the inputs, which needs whole groups per rank
    unless `replicated_ok` (act-order: every rank keeps all groups and indexes them by g_idx)."""
    full = shape.input_size_full
    if group_size == -1:
        return full, 1, False
    if group_size <= 0:
        raise QuantizationError(f"{fmt}: group size {group_size} is neither positive nor -1")
    if full % group_size:
        raise QuantizationError(f"{fmt}: the group size {group_size} does not divide a layer's {full} input features")
    if not shape.input_is_split or replicated_ok:
        return group_size, full // group_size, False
    if shape.input_size % group_size:
        raise QuantizationError(
            f"{fmt}: a row-parallel layer's {shape.input_size} input features per rank are not a multiple of "
            f"the group size {group_size} ({full} split over the shards): use fewer shards"
        )
    return group_size, shape.input_size // group_size, True


def check_packed_outputs(shape: LayerShape, fmt: str) -> None:
    """Formats that pack 8 output features per int32 need a multiple of 8 per projection and rank."""
    for size in shape.output_sizes:
        if size % PACK:
            raise QuantizationError(
                f"{fmt} packs {PACK} output features per int32, but a projection has {size} output features "
                f"on this rank: not a multiple of {PACK} (too many shards for this layer?)"
            )


def check_packed_inputs(shape: LayerShape, fmt: str) -> None:
    if shape.input_size % PACK:
        raise QuantizationError(
            f"{fmt} packs {PACK} input features per int32, but a layer has {shape.input_size} input features "
            f"on this rank: not a multiple of {PACK}"
        )
