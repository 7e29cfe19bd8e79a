"""AWQ checkpoints (AutoAWQ's GEMM layout, 4-bit), read into the shared 4-bit form (int4.py).

Per linear layer of N outputs and K inputs, groups of G input features:
  qweight int32 [K, N / 8]     word c of row k: outputs 8c..8c+7, interleaved (int4.AWQ_ORDER:
                               nibble j holds output 8c + AWQ_ORDER[j]), unsigned 0..15
  qzeros  int32 [K / G, N / 8] the zero points, packed the same way
  scales        [K / G, N]
and w[n, k] = (q - z) * s with the group k // G.

Tensor parallelism: column-parallel layers split N, 8 outputs per int32 word (a rank's outputs per
projection must be a multiple of 8); row-parallel ones split K and the groups with it (K / shards
must be a multiple of G).
"""

from dataclasses import dataclass

import torch
from torch import nn

from shard.quantization import int4
from shard.quantization.base import LayerShape, ParamDims, Target, add_param


@dataclass(frozen=True, slots=True)
class AWQConfig:
    group_size: int  # -1: per output channel


class AWQLinearMethod(int4.Int4LinearMethod):
    name = "awq"
    format_name = "AWQ"

    def __init__(self, config: AWQConfig, target: Target):
        super().__init__(target)
        self.config = config

    def create_weights(self, layer: nn.Module, shape: LayerShape) -> None:
        group, rows, split = int4.groups_per_rank(shape, self.config.group_size, "AWQ", replicated_ok=False)
        int4.check_packed_outputs(shape, "AWQ")
        K, N = shape.input_size, shape.output_size
        layer.awq_group = group
        packed_outputs = dict(output_dim=1, pack_dim=1, pack_factor=int4.PACK)
        add_param(
            layer,
            "qweight",
            torch.empty(K, N // int4.PACK, dtype=torch.int32),
            ParamDims(input_dim=0, **packed_outputs),
        )
        group_input_dim = 0 if split else None
        add_param(
            layer,
            "qzeros",
            torch.empty(rows, N // int4.PACK, dtype=torch.int32),
            ParamDims(input_dim=group_input_dim, **packed_outputs),
        )
        add_param(
            layer,
            "scales",
            torch.empty(rows, N, dtype=torch.float32),
            ParamDims(output_dim=1, input_dim=group_input_dim),
        )

    def read(self, layer: nn.Module) -> int4.Int4Weights:
        q = int4.unpack_awq(layer.qweight.data, 1)
        zeros = int4.unpack_awq(layer.qzeros.data, 1)
        g_idx = torch.arange(q.shape[0], device=q.device) // layer.awq_group
        return int4.Int4Weights(q, layer.scales.data, zeros, g_idx)
