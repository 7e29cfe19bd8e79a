"""compressed-tensors checkpoints (llm-compressor): the linear methods of its schemes.

The config (config_groups, ignore, format) is parsed in checkpoints.py, which picks one of:
  W4A16 pack-quantized  `CompressedTensorsW4A16` below; per layer of N outputs, K inputs:
      weight_packed int32 [N, K / 8]   8 values per word along K (nibble j: input 8i + j), each
                                       stored as the signed 4-bit value + 8
      weight_scale        [N, K / G]   (channel strategy: [N, 1])
      weight_zero_point int32 [N / 8, K / G]  asymmetric only: signed zero + 8, packed along N
      weight_shape  int64 [2]          the unpacked shape (unused)
      weight_g_idx  int32 [K]          actorder "group" only (older checkpoints)
    w = (q - zero) * scale, with q and zero the signed values.
  W8A8 int8 / FP8 (int-, float- or naive-quantized)  fp8.EightBitLinearMethod: `weight` int8 or
    float8_e4m3fn [N, K], `weight_scale` [N, 1] (channel), one per tensor (tensor) or [N / bn, K / bk]
    (block), and `input_scale` for static activation scales.
"""

from dataclasses import dataclass

import torch
from torch import nn

from shard.quantization import int4
from shard.quantization.base import LayerShape, ParamDims, QuantizationError, Target, add_param


@dataclass(frozen=True, slots=True)
class W4A16Config:
    group_size: int  # -1: channel strategy
    symmetric: bool
    act_order: bool  # actorder "group": weight_g_idx in the checkpoint


class CompressedTensorsW4A16(int4.Int4LinearMethod):
    name = "compressed-tensors-w4a16"
    format_name = "compressed-tensors W4A16"

    def __init__(self, config: W4A16Config, target: Target):
        super().__init__(target)
        self.config = config

    def create_weights(self, layer: nn.Module, shape: LayerShape) -> None:
        cfg = self.config
        act_order = cfg.act_order and cfg.group_size != -1
        group, cols, split = int4.groups_per_rank(shape, cfg.group_size, self.format_name, replicated_ok=act_order)
        int4.check_packed_inputs(shape, self.format_name)
        K, N = shape.input_size, shape.output_size
        layer.ct_group, layer.ct_split = group, split
        add_param(
            layer,
            "weight_packed",
            torch.empty(N, K // int4.PACK, dtype=torch.int32),
            ParamDims(output_dim=0, input_dim=1, pack_dim=1, pack_factor=int4.PACK),
        )
        group_input_dim = 1 if split else None
        add_param(
            layer,
            "weight_scale",
            torch.empty(N, cols, dtype=torch.float32),
            ParamDims(output_dim=0, input_dim=group_input_dim),
        )
        if not cfg.symmetric:
            int4.check_packed_outputs(shape, self.format_name + " (asymmetric zero points)")
            add_param(
                layer,
                "weight_zero_point",
                torch.empty(N // int4.PACK, cols, dtype=torch.int32),
                ParamDims(output_dim=0, input_dim=group_input_dim, pack_dim=0, pack_factor=int4.PACK),
            )
        add_param(layer, "weight_shape", torch.zeros(2, dtype=torch.int64), ParamDims())
        if act_order:
            add_param(layer, "weight_g_idx", torch.full((K,), -1, dtype=torch.int32), ParamDims(input_dim=0))

    def read(self, layer: nn.Module) -> int4.Int4Weights:
        q = int4.unpack(layer.weight_packed.data, 1).t()  # [K, N], signed value + 8
        scales = layer.weight_scale.data.t()
        if self.config.symmetric:
            zeros = torch.full_like(scales, 8.0)
        else:
            zeros = int4.unpack(layer.weight_zero_point.data, 0).t().float()  # signed zero + 8
        K = q.shape[0]
        if hasattr(layer, "weight_g_idx"):
            g_idx = layer.weight_g_idx.data.long()
            if bool((g_idx < 0).any()):
                raise QuantizationError(f"{self.format_name} checkpoint with actorder 'group' lacks a weight_g_idx")
        else:
            g_idx = torch.arange(K, device=q.device) // layer.ct_group
        return int4.Int4Weights(q, scales, zeros, g_idx)
