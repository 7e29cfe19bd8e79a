"""Quantized tiny checkpoints for the tests, written independently of shard's readers, and the runs
that read logits back from them.

GPTQ and AWQ tensors are packed with the loops of the formats' own tools (AutoGPTQ's
`QuantLinear.pack`, AutoAWQ's `WQLinear_GEMM.from_linear`), transcribed with numpy uint32, never
with shard/quantization/int4.py; every weight's dequantized value (q - z) * s is computed here from
the integers before packing. compressed-tensors checkpoints come from the compressed_tensors
library itself (its compressors quantize, pack and write the config); FP8 ones from torch's own
float8 cast.
"""

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

# Sizes every scheme can shard over 2 ranks: per-rank outputs per projection a multiple of 8
# (q 64, k/v 32), per-rank inputs of row-parallel layers a multiple of the group size 32
# (o_proj 64, down_proj 128).
TINY = dict(
    architectures=["LlamaForCausalLM"],
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=384,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    rope_theta=10000.0,
    eos_token_id=1,
    bos_token_id=0,
)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj") + (
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
PROMPTS = ([5, 17, 99, 250, 3, 77, 140, 8, 61, 300, 12, 45, 200], [7, 300, 41, 2, 9])


def dense_model(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(**{**TINY, **overrides}, torch_dtype="float32")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _tensors(model) -> dict[str, torch.Tensor]:
    """The state dict as a checkpoint holds it: a tied LM head is the embedding, stored once."""
    tensors = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors


def linear_names(model) -> list[str]:
    return [f"model.layers.{i}.{kind}" for i in range(model.config.num_hidden_layers) for kind in LINEARS]


def save_checkpoint(out: Path, model, tensors: dict[str, torch.Tensor], quantization_config: dict | None) -> Path:
    """config.json (with `quantization_config`) and model.safetensors holding `tensors`."""
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    if quantization_config is not None:
        config = json.loads((out / "config.json").read_text())
        config["quantization_config"] = quantization_config
        (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors")
    return out


# -- 4-bit round-to-nearest, as GPTQ's and AWQ's quantizers define their grids -------------------


def quantize_int4(w: torch.Tensor, group_size: int, sym: bool, g_idx: torch.Tensor | None = None, min_zero: int = 0):
    """w [N, K] -> (q [K, N] int64 in 0..15, scales [groups, N] (float16 values), zeros [groups, N] int64,
    g_idx [K]); w ~= (q - zeros[g_idx]) * scales[g_idx]. Group g holds the input features with g_idx == g
    (by default k // group_size; -1: one group)."""
    N, K = w.shape
    G = K if group_size == -1 else group_size
    if g_idx is None:
        g_idx = torch.arange(K) // G
    groups = K // G
    q = torch.zeros(K, N, dtype=torch.int64)
    scales = torch.zeros(groups, N)
    zeros = torch.zeros(groups, N, dtype=torch.int64)
    for g in range(groups):
        cols = (g_idx == g).nonzero().squeeze(1)
        wg = w[:, cols]  # [N, members]
        if sym:
            scale = wg.abs().amax(1) * 2 / 15
            zero = torch.full((N,), 8, dtype=torch.int64)
        else:
            lo, hi = wg.amin(1).clamp(max=0), wg.amax(1).clamp(min=0)
            scale = (hi - lo) / 15
            zero = torch.round(-lo / scale).to(torch.int64).clamp(min_zero, 15)
        scale = scale.half().float()  # the checkpoints store float16 scales
        q[cols] = (torch.round(wg / scale[:, None]) + zero[:, None]).clamp(0, 15).to(torch.int64).t()
        scales[g], zeros[g] = scale, zero
    return q, scales, zeros, g_idx


def dequantize_int4(q, scales, zeros, g_idx) -> torch.Tensor:
    """[N, K] float32: w[n, k] = (q[k, n] - zeros[g, n]) * scales[g, n], g = g_idx[k]."""
    K, N = q.shape
    w = torch.empty(N, K)
    for k in range(K):
        g = int(g_idx[k])
        w[:, k] = (q[k].float() - zeros[g].float()) * scales[g]
    return w


# -- GPTQ (AutoGPTQ's QuantLinear.pack) ----------------------------------------------------------


def gptq_tensors(q, scales, zeros, g_idx, v1: bool = True) -> dict[str, torch.Tensor]:
    intweight = q.numpy().astype(np.uint32)  # [K, N]
    qweight = np.zeros((intweight.shape[0] // 32 * 4, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + 8):
            qweight[row] |= intweight[j] << (4 * (j - i))
        i += 8
        row += 1
    z = (zeros.numpy() - (1 if v1 else 0)).astype(np.uint32)  # v1 ("gptq") stores zero - 1
    qzeros = np.zeros((z.shape[0], z.shape[1] // 32 * 4), dtype=np.uint32)
    i = col = 0
    while col < qzeros.shape[1]:
        for j in range(i, i + 8):
            qzeros[:, col] |= z[:, j] << (4 * (j - i))
        i += 8
        col += 1
    return {
        "qweight": torch.from_numpy(qweight.view(np.int32)),
        "qzeros": torch.from_numpy(qzeros.view(np.int32)),
        "scales": scales.half(),
        "g_idx": g_idx.to(torch.int32),
    }


def gptq_checkpoint(
    out: Path, group_size=32, desc_act=False, sym=False, v1=True, seed=0, drop=(), model=None, solved=None, **config
):
    """A GPTQ checkpoint of `model` (default: a random tiny Llama); returns (dir, the model with its
    dequantized weights). solved: {linear name: (q, scales, zeros, g_idx)} (solver.quantize_model's)
    to pack instead of rounding to nearest."""
    model = model or dense_model(seed)
    tensors = _tensors(model)
    g = torch.Generator().manual_seed(seed + 1)
    orders = {}
    for name in linear_names(model):
        w = tensors.pop(f"{name}.weight")
        g_idx = None
        if solved:
            q, scales, zeros, g_idx = solved[name]
        elif desc_act:  # act-order: quantized in a random order of the inputs, in groups along that order
            # The order sorts the layer's input's Hessian diagonal: projections of one input share it.
            shared = name.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
            order = orders.setdefault(shared, torch.randperm(w.shape[1], generator=g))
            g_idx = torch.empty(w.shape[1], dtype=torch.int64)
            g_idx[order] = torch.arange(w.shape[1]) // (w.shape[1] if group_size == -1 else group_size)
        if not solved:
            # v1 cannot store a zero point of 0 (zero - 1 would be -1, which AutoGPTQ's pack smears over the word)
            q, scales, zeros, g_idx = quantize_int4(w, group_size, sym, g_idx, min_zero=1 if v1 else 0)
        for suffix, t in gptq_tensors(q, scales, zeros, g_idx, v1).items():
            tensors[f"{name}.{suffix}"] = t
        with torch.no_grad():
            model.get_submodule(name).weight.copy_(dequantize_int4(q, scales, zeros, g_idx))
    for key in drop:
        del tensors[key]
    qc = dict(
        quant_method="gptq",
        bits=4,
        group_size=group_size,
        desc_act=desc_act,
        sym=sym,
        checkpoint_format="gptq" if v1 else "gptq_v2",
    )
    return save_checkpoint(out, model, tensors, {**qc, **config}), model


# -- AWQ (AutoAWQ's WQLinear_GEMM.from_linear) ---------------------------------------------------

AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]


def awq_pack(intweight: np.ndarray) -> np.ndarray:
    """[rows, N] values -> [rows, N / 8] uint32 in AutoAWQ's interleaved order."""
    packed = np.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=np.uint32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= intweight[:, col * 8 + AWQ_ORDER_MAP[i]].astype(np.uint32) << (i * 4)
    return packed


def awq_tensors(q, scales, zeros) -> dict[str, torch.Tensor]:
    return {
        "qweight": torch.from_numpy(awq_pack(q.numpy()).view(np.int32)),
        "qzeros": torch.from_numpy(awq_pack(zeros.numpy()).view(np.int32)),
        "scales": scales.half(),
    }


def awq_checkpoint(out: Path, group_size=32, seed=0, drop=(), model=None, solved=None, **config):
    """An AWQ GEMM checkpoint of `model` (default: a random tiny Llama), rounded to nearest or packed
    from `solved` (as gptq_checkpoint's, with contiguous groups); returns (dir, dequantized model)."""
    model = model or dense_model(seed)
    tensors = _tensors(model)
    for name in linear_names(model):
        w = tensors.pop(f"{name}.weight")
        q, scales, zeros, g_idx = solved[name] if solved else quantize_int4(w, group_size, sym=False)
        for suffix, t in awq_tensors(q, scales, zeros).items():
            tensors[f"{name}.{suffix}"] = t
        with torch.no_grad():
            model.get_submodule(name).weight.copy_(dequantize_int4(q, scales, zeros, g_idx))
    for key in drop:
        del tensors[key]
    qc = dict(quant_method="awq", bits=4, group_size=group_size, zero_point=True, version="gemm")
    return save_checkpoint(out, model, tensors, {**qc, **config}), model


# -- FP8 (quant_method fp8) ----------------------------------------------------------------------


def fp8_checkpoint(out: Path, block=None, scale_name=None, static_input=False, seed=0):
    """FP8 e4m3 weights with a per-tensor scale (a 0-dim tensor) or [N / bn, K / bk] block scales."""
    model = dense_model(seed)
    tensors = {k: v for k, v in model.state_dict().items()}
    for name in linear_names(model):
        w = tensors.pop(f"{name}.weight")
        N, K = w.shape
        if block is None:
            scale = w.abs().amax() / 448.0
            expanded = scale
        else:
            bn, bk = block
            blocks = w.reshape(N // bn, bn, K // bk, bk)
            scale = blocks.abs().amax(dim=(1, 3)) / 448.0
            expanded = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
        w_fp8 = (w / expanded).to(torch.float8_e4m3fn)
        tensors[f"{name}.weight"] = w_fp8
        tensors[f"{name}.{scale_name or ('weight_scale_inv' if block else 'weight_scale')}"] = scale.float()
        if static_input:
            tensors[f"{name}.input_scale"] = torch.tensor(0.05)
        with torch.no_grad():
            model.get_submodule(name).weight.copy_(w_fp8.float() * expanded)
    qc = {"quant_method": "fp8", "activation_scheme": "static" if static_input else "dynamic"}
    if block is not None:
        qc["weight_block_size"] = list(block)
    return save_checkpoint(out, model, tensors, qc), model


# -- compressed-tensors, by the library ----------------------------------------------------------


def ct_checkpoint(
    out: Path,
    weights: dict,
    input_activations: dict | None,
    fmt: str,
    seed=0,
    ignore=("lm_head",),
    model=None,
    solved=None,
):
    """Quantize a random tiny Llama with compressed_tensors (min-max scales from its calculate_qparams,
    quantization and packing by its compressor for `fmt`) and save it as llm-compressor does.
    `model`: quantize that one instead. solved: 4-bit group scales and zero points (as gptq_checkpoint's,
    contiguous groups, the model's weights already their dequantized values) to use instead of min-max.
    Returns (dir, the library's QuantizationScheme)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    model = model or dense_model(seed)
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(**weights),
        input_activations=None if input_activations is None else QuantizationArgs(**input_activations),
    )
    apply_quantization_config(
        model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(ignore)), show_progress=False
    )
    args = scheme.weights
    for name in linear_names(model):
        module = model.get_submodule(name)
        w = module.weight.data
        N, K = w.shape
        if args.strategy == "group":
            view = w.unflatten(-1, (K // args.group_size, args.group_size))
            lo, hi = view.amin(-1), view.amax(-1)
        elif args.strategy == "channel":
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        elif args.strategy == "tensor":
            lo, hi = w.amin().reshape(1), w.amax().reshape(1)
        else:
            bn, bk = args.block_structure
            view = w.reshape(N // bn, bn, K // bk, bk)
            lo, hi = view.amin(dim=(1, 3)), view.amax(dim=(1, 3))
        scale, zero_point = calculate_qparams(lo, hi, args)
        if solved:  # the library's zero points are signed: stored value q - 8
            _, scales, zeros, _ = solved[name]
            scale, zero_point = scales.t(), (zeros.t() - 8).to(zero_point.dtype)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero_point.reshape(module.weight_zero_point.shape))
        if hasattr(module, "input_scale"):  # static activation scale
            module.input_scale.data.fill_(0.05 + 0.01 * LINEARS.index(name.split(".", 3)[3]))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    state = {k: v.detach().contiguous() for k, v in _tensors(model).items()}
    save_file(state, out / "model.safetensors")
    compressor.update_config(str(out))
    return out, scheme


INT8_TOKEN = dict(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
INT8_TENSOR = dict(num_bits=8, type="int", symmetric=True, strategy="tensor", dynamic=False)
FP8_TOKEN = dict(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)
FP8_TENSOR = dict(num_bits=8, type="float", symmetric=True, strategy="tensor", dynamic=False)


def ct_actorder_checkpoint(out: Path, group_size=32, seed=0):
    """compressed-tensors W4A16 with actorder "group" (weight_g_idx), which compressed_tensors no longer
    writes (older llm-compressor did; such checkpoints are published): symmetric int4, each value stored
    as q + 8 in pack-quantized's layout (8 per int32 along the inputs, nibble j of word i: input 8i + j)."""
    model = dense_model(seed)
    tensors = {k: v for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    orders = {}
    for name in linear_names(model):
        w = tensors.pop(f"{name}.weight")
        N, K = w.shape
        shared = name.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
        order = orders.setdefault(shared, torch.randperm(K, generator=g))
        g_idx = torch.empty(K, dtype=torch.int64)
        g_idx[order] = torch.arange(K) // group_size
        q, scales, zeros, g_idx = quantize_int4(w, group_size, sym=True, g_idx=g_idx)  # zeros: 8, i.e. signed 0
        values = q.t().numpy().astype(np.uint32)  # [N, K]: q = signed value + 8
        packed = np.zeros((N, K // 8), dtype=np.uint32)
        for i in range(K // 8):
            for j in range(8):
                packed[:, i] |= values[:, 8 * i + j] << (4 * j)
        tensors[f"{name}.weight_packed"] = torch.from_numpy(packed.view(np.int32))
        tensors[f"{name}.weight_scale"] = scales.t().contiguous()
        tensors[f"{name}.weight_g_idx"] = g_idx.to(torch.int32)
        tensors[f"{name}.weight_shape"] = torch.tensor([N, K])
        with torch.no_grad():
            model.get_submodule(name).weight.copy_(dequantize_int4(q, scales, zeros, g_idx))
    weights = dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size, actorder="group")
    qc = dict(
        quant_method="compressed-tensors",
        format="pack-quantized",
        config_groups={"group_0": dict(targets=["Linear"], weights=weights, input_activations=None)},
        ignore=["lm_head"],
        quantization_status="compressed",
    )
    return save_checkpoint(out, model, tensors, qc), model


# compressed-tensors schemes: name -> (weights, input activations, format)
CT_SCHEMES = {
    "w4a16-sym-group": (
        dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32),
        None,
        "pack-quantized",
    ),
    "w4a16-asym-group": (
        dict(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32),
        None,
        "pack-quantized",
    ),
    "w4a16-channel": (dict(num_bits=4, type="int", symmetric=True, strategy="channel"), None, "pack-quantized"),
    "w8a8-int8-dynamic": (
        dict(num_bits=8, type="int", symmetric=True, strategy="channel"),
        INT8_TOKEN,
        "int-quantized",
    ),
    "w8a8-int8-static": (dict(num_bits=8, type="int", symmetric=True, strategy="tensor"), INT8_TENSOR, "int-quantized"),
    "fp8-dynamic": (dict(num_bits=8, type="float", symmetric=True, strategy="channel"), FP8_TOKEN, "float-quantized"),
    "fp8-static": (dict(num_bits=8, type="float", symmetric=True, strategy="tensor"), FP8_TENSOR, "float-quantized"),
    "fp8-block": (
        dict(num_bits=8, type="float", symmetric=True, strategy="block", block_structure=[32, 32]),
        dict(FP8_TOKEN, strategy="group", group_size=32),
        "float-quantized",
    ),
}


# -- running checkpoints -------------------------------------------------------------------------


def shard_logits(model_dir: Path, **config) -> torch.Tensor:
    """Our logits at every position of PROMPTS (one prefill of both), then of one decode step of each."""
    from shard.config import ShardConfig
    from shard.runner import ModelRunner
    from shard.sampler import SamplingParams
    from shard.step import Batch, RequestState

    runner = ModelRunner(ShardConfig(model_dir=model_dir, device="cpu", dtype="float32", enforce_eager=True, **config))
    runner.warmup(32, 2, max_num_blocks=8)
    states = [RequestState(i, list(p), len(p), 0, [2 * i, 2 * i + 1], SamplingParams()) for i, p in enumerate(PROMPTS)]
    total = sum(len(p) for p in PROMPTS)
    prefill = runner.forward(Batch(states, [len(p) for p in PROMPTS]), sample_rows_override=torch.arange(total))
    for s in states:
        s.num_computed_tokens = len(s.token_ids)
        s.token_ids.append(33)
    decode = runner.forward(Batch(states, [1, 1]))
    return None if prefill is None else torch.cat([prefill, decode])


def hf_logits(model) -> torch.Tensor:
    """transformers' logits for what shard_logits computes."""
    rows, decode = [], []
    with torch.no_grad():
        for p in PROMPTS:
            rows.append(model(torch.tensor([p])).logits[0].float())
            decode.append(model(torch.tensor([list(p) + [33]])).logits[0, -1].float())
    return torch.cat(rows + [torch.stack(decode)])


def tp_logits(model_dirs: list[Path], rank: int, world_size: int, port: int, queue) -> None:
    """In a spawned process: rank `rank` of `world_size` gloo ranks; rank 0 sends each model's logits."""
    from shard import dist

    torch.set_num_threads(1)
    dist.init(rank, world_size, "127.0.0.1", port, torch.device("cpu"))
    try:
        results = [shard_logits(d, rank=rank, world_size=world_size) for d in model_dirs]
        if rank == 0:
            queue.put([r.tolist() for r in results])
    finally:
        dist.shutdown()


def shard_model(model_dir: Path, kernels: bool = False, **target):
    """Our model as the runner builds it (float32, CPU, dense weights kept unpacked), without the runner.
    kernels: the decoder linears take their CUDA path (repacked for shard/kernels/triton_quant.py)."""
    from transformers import AutoConfig

    from shard.loader import load_weights
    from shard.models import build_model
    from shard.quantization import Target, resolve

    hf_config = AutoConfig.from_pretrained(model_dir)
    quant = resolve(None, hf_config, Target(torch.device("cpu"), torch.float32, **{"cpu_gemm": "aten", **target}))
    quant.linear.use_kernels = kernels
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        model = build_model(hf_config, quant)
    finally:
        torch.set_default_dtype(default)
    load_weights(model, model_dir)
    for module in model.modules():
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()
    return model


def merged_weights(hf_model, i: int) -> dict[str, torch.Tensor]:
    """transformers' layer-i weights [N, K] under our merged names."""
    layer = hf_model.model.layers[i]
    a, m = layer.self_attn, layer.mlp
    return {
        "self_attn.qkv_proj": torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
        "self_attn.o_proj": a.o_proj.weight,
        "mlp.gate_up_proj": torch.cat([m.gate_proj.weight, m.up_proj.weight]),
        "mlp.down_proj": m.down_proj.weight,
    }


# -- checkpoints and logits shared by the tests of a session (read-only: tests that alter one write their own) --

_root: Path | None = None
_checkpoints: dict[str, tuple] = {}


def cached(kind: str, **kw):
    """writers' `{kind}_checkpoint(dir, **kw)` (gptq, awq, fp8, ct), written once per process."""
    global _root
    key = f"{kind}{sorted(kw.items())!r}"
    if key not in _checkpoints:
        if _root is None:
            _root = Path(tempfile.mkdtemp(prefix="sluice-quant-"))
            atexit.register(shutil.rmtree, _root, True)
        writer = {
            "gptq": gptq_checkpoint,
            "awq": awq_checkpoint,
            "fp8": fp8_checkpoint,
            "ct": ct_checkpoint,
            "ct-actorder": ct_actorder_checkpoint,
        }[kind]
        _checkpoints[key] = writer(_root / str(len(_checkpoints)), **kw)
    return _checkpoints[key]


@functools.cache
def cached_logits(model_dir: Path) -> torch.Tensor:
    return shard_logits(model_dir)
