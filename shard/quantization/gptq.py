"""GPTQ checkpoints (AutoGPTQ / GPTQModel, 4-bit), read into the shared 4-bit form (int4.py).

Per linear layer of N outputs and K inputs, groups of G input features (G = K with group_size -1):
  qweight int32 [K / 8, N]   nibble j of row r: q at input k = 8r + j, unsigned 0..15
  qzeros  int32 [K / G, N / 8] nibble j of column c: the zero point of output 8c + j
  scales        [K / G, N]
  g_idx   int32 [K]          the group of each input feature (sorted unless desc_act)
and w[n, k] = (q - z) * s with the group g_idx[k]. checkpoint_format "gptq" (v1, the default)
stores z - 1 (AutoGPTQ's historical off-by-one), "gptq_v2" stores z.

Tensor parallelism: column-parallel layers split N (qzeros packs 8 outputs per int32, so a rank's
outputs per projection must be a multiple of 8); row-parallel ones split K, and with it the
groups, so K / shards must be a multiple of G. With desc_act (act-order) a rank's input features
come from any groups: g_idx is split with the inputs, scales and zeros stay whole on every rank.
"""

from dataclasses import dataclass

import torch
from torch import nn

from shard import dist
from shard.quantization import int4
from shard.quantization.base import LayerShape, ParamDims, QuantizationError, Target, add_param


@dataclass(frozen=True, slots=True)
class GPTQConfig:
    group_size: int  # -1: per output channel
    desc_act: bool
    sym: bool
    v1_zeros: bool  # checkpoint_format "gptq": zeros stored minus one


class GPTQLinearMethod(int4.Int4LinearMethod):
    name = "gptq"
    format_name = "GPTQ"

    def __init__(self, config: GPTQConfig, target: Target):
        super().__init__(target)
        self.config = config

    def create_weights(self, layer: nn.Module, shape: LayerShape) -> None:
        cfg = self.config
        act_order = cfg.desc_act and cfg.group_size != -1
        group, rows, split = int4.groups_per_rank(shape, cfg.group_size, "GPTQ", replicated_ok=act_order)
        int4.check_packed_inputs(shape, "GPTQ")
        int4.check_packed_outputs(shape, "GPTQ")
        K, N = shape.input_size, shape.output_size
        layer.gptq_group = group
        layer.gptq_split = split
        add_param(
            layer,
            "qweight",
            torch.empty(K // int4.PACK, N, dtype=torch.int32),
            ParamDims(output_dim=1, input_dim=0, pack_dim=0, pack_factor=int4.PACK),
        )
        group_dims = dict(output_dim=1, input_dim=0 if split else None)
        add_param(
            layer,
            "qzeros",
            torch.empty(rows, N // int4.PACK, dtype=torch.int32),
            ParamDims(**group_dims, pack_dim=1, pack_factor=int4.PACK),
        )
        add_param(layer, "scales", torch.empty(rows, N, dtype=torch.float32), ParamDims(**group_dims))
        g_idx = add_param(layer, "g_idx", torch.full((K,), -1, dtype=torch.int32), ParamDims(input_dim=0))
        g_idx.optional = not act_order  # only act-order checkpoints need it (most others carry it anyway)

    def read(self, layer: nn.Module) -> int4.Int4Weights:
        cfg = self.config
        K = layer.qweight.shape[0] * int4.PACK
        q = int4.unpack(layer.qweight.data, 0)
        zeros = int4.unpack(layer.qzeros.data, 1).float()
        if cfg.v1_zeros:
            zeros += 1
        loaded = layer.g_idx.data.long()
        first = dist.tp_rank() * K if layer.gptq_split else 0
        sequential = (torch.arange(K, device=loaded.device) + first) // layer.gptq_group
        if cfg.desc_act and cfg.group_size != -1:
            if bool((loaded < 0).any()):
                raise QuantizationError("GPTQ desc_act checkpoint without g_idx for a layer")
            g_idx = loaded
        else:
            if not bool((loaded < 0).all()) and not torch.equal(loaded, sequential):
                raise QuantizationError(
                    "GPTQ checkpoint with desc_act false has a g_idx that is not sequential "
                    "(input feature k in group k // group_size): its config.json contradicts its tensors"
                )
            g_idx = sequential - first // layer.gptq_group if layer.gptq_split else sequential
        return int4.Int4Weights(q, layer.scales.data, zeros, g_idx)
