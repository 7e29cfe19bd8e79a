"""Calibrated 4-bit quantization of a Llama's decoder linears, for the perplexity checkpoints of
tests/shard/test_perplexity.py (`make quality`); the formats' layouts stay in writers.py.

Three pieces, all standard:
- optionally, AWQ's activation-aware scaling (Lin, Tang, Tang, Yang, Dang, Gan, Han, "AWQ:
  Activation-aware Weight Quantization for LLM Compression and Acceleration", MLSys 2024; AutoAWQ's
  `_search_best_scale`): the input features that carry large activations are scaled up in the
  weights and down in the operation before them (the RMSNorm's weight, or up_proj's rows before
  down_proj), so that their weights lose less to rounding; the model computes the same function;
- each group's scale and zero point minimise the group's squared error (weighted by the input's
  mean square per feature) over a small grid of clipped ranges, as AutoAWQ's and llama.cpp's
  quantizers search, instead of taking the group's min and max;
- GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
  Generative Pre-trained Transformers", ICLR 2023; the IST-DASLab reference `gptq.py`, whose
  `fasterquant` this transcribes): columns are quantized one at a time, in decreasing order of the
  Hessian's diagonal (act-order), and each column's rounding error is spread over the columns not
  yet quantized through the inverse of the Hessian H = X^T X of the layer's calibration inputs.

Hessians come from calibration text run through the model layer by layer, each layer seeing the
outputs of the layers already quantized (as the reference and llm-compressor do). The calibration
text (tests/data/calibration_text.txt) is not the evaluation text.
"""

from pathlib import Path

import torch

CALIBRATION_TEXT = Path(__file__).parent.parent.parent / "data" / "calibration_text.txt"
GRID = torch.linspace(1.0, 0.7, 16)  # fractions of a group's range tried as its clipped range
AWQ_RATIOS = torch.linspace(0, 1, 21)  # exponents of the activation scale tried (AutoAWQ: n_grid 20)


def group_params(w: torch.Tensor, sym: bool, importance: torch.Tensor, min_zero: int = 0):
    """w [..., G] (groups of G input features) -> (scale [...] (float16 values), zero [...] int64),
    w ~= (q - zero) * scale with q in 0..15, minimising sum(importance * error^2) over each group's
    clipped ranges GRID. importance: [..., G], broadcast against w."""
    best_err = torch.full(w.shape[:-1], float("inf"))
    best_scale, best_zero = torch.zeros(w.shape[:-1]), torch.zeros(w.shape[:-1], dtype=torch.int64)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    for p in GRID:
        if sym:
            scale = torch.maximum(-lo, hi) * p / 7.5
            zero = torch.full_like(best_zero, 8)
        else:
            scale = (hi - lo) * p / 15
            zero = torch.round(-lo * p / scale.clamp(min=1e-12)).to(torch.int64).clamp(min_zero, 15)
        scale = scale.clamp(min=1e-8).half().float()  # the checkpoints store float16 scales
        err = ((fake_quantize(w, scale[..., None], zero[..., None]) - w) ** 2 * importance).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
    return best_scale, best_zero


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (torch.clamp(torch.round(w / scale) + zero, 0, 15) - zero) * scale


def gptq(w: torch.Tensor, H: torch.Tensor, group_size: int, sym: bool, act_order_groups: bool, min_zero: int = 0):
    """w [N, K], H [K, K] (sum of x x^T over calibration inputs x) -> (q [K, N] int64 in 0..15,
    scales [groups, N], zeros [groups, N] int64, g_idx [K]) as writers.quantize_int4 returns them.
    act_order_groups: groups are runs of group_size columns in act-order (GPTQ's desc_act g_idx);
    otherwise groups are contiguous input features whose parameters are fixed before solving."""
    w = w.clone().float()
    N, K = w.shape
    H = H.clone().double()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    w[:, dead] = 0
    importance = H.diagonal().float() / H.diagonal().mean().float()
    perm = torch.argsort(H.diagonal(), descending=True)
    g_idx = torch.empty(K, dtype=torch.int64)
    g_idx[perm] = torch.arange(K) // group_size if act_order_groups else perm // group_size
    groups = K // group_size
    if act_order_groups:  # filled while solving
        scales, zeros = torch.zeros(groups, N), torch.zeros(groups, N, dtype=torch.int64)
    else:
        shape = (N, groups, group_size)
        scale, zero = group_params(w.view(shape), sym, importance.view(shape[1:]), min_zero)
        scales, zeros = scale.t().contiguous(), zero.t().contiguous()
    w, H, importance = w[:, perm], H[perm][:, perm], importance[perm]
    H += 0.01 * H.diagonal().mean() * torch.eye(K, dtype=H.dtype)  # GPTQ's dampening, percdamp 0.01
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    q = torch.zeros(N, K, dtype=torch.int64)
    block = 128  # a multiple of the group size: groups never straddle blocks
    for b0 in range(0, K, block):
        b1 = min(b0 + block, K)
        err = torch.zeros(N, b1 - b0)
        for j in range(b0, b1):
            g = int(g_idx[perm[j]])
            if act_order_groups and j % group_size == 0:
                # this group's columns (within the block: group_size divides it), updated so far
                run = slice(j, j + group_size)
                scales[g], zeros[g] = group_params(w[:, run], sym, importance[run], min_zero)
            s, z = scales[g], zeros[g]
            col = w[:, j]
            q[:, j] = torch.clamp(torch.round(col / s) + z, 0, 15).to(torch.int64)
            e = (col - (q[:, j] - z) * s) / Hinv[j, j]
            w[:, j:b1] -= e[:, None] * Hinv[j, j:b1][None, :]
            err[:, j - b0] = e
        w[:, b1:] -= err @ Hinv[b0:b1, b1:]
    out = torch.empty_like(q)
    out[:, perm] = q
    return out.t().contiguous(), scales, zeros, g_idx


def rtn(w: torch.Tensor, group_size: int, sym: bool) -> torch.Tensor:
    """w [N, K] rounded to 4 bits over each group's full range (what AWQ's scale search compares)."""
    view = w.unflatten(-1, (-1, group_size))
    lo, hi = view.amin(-1, keepdim=True).clamp(max=0), view.amax(-1, keepdim=True).clamp(min=0)
    if sym:
        scale, zero = (torch.maximum(-lo, hi) / 7.5).clamp(min=1e-8), torch.full_like(lo, 8)
    else:
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        zero = torch.round(-lo / scale)
    return fake_quantize(view, scale, zero).flatten(-2)


def awq_scales(x: torch.Tensor, weights: list[torch.Tensor], group_size: int, sym: bool) -> torch.Tensor:
    """x [T, K] (the inputs the linears `weights` [N_i, K] share) -> per-feature scales [K]: of
    s = mean|x|^r (normalised), over AWQ_RATIOS r, the one whose rounded (w * s) / s gives outputs
    closest to the unrounded ones in squared error (r = 0: no scaling)."""
    w = torch.cat(weights)
    reference = x @ w.t()
    x_mean = x.abs().mean(0)
    best, best_err = torch.ones_like(x_mean), float("inf")
    for r in AWQ_RATIOS:
        s = x_mean.pow(r).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = ((x @ (rtn(w * s, group_size, sym) / s).t() - reference) ** 2).mean().item()
        if err < best_err:
            best, best_err = s, err
    return best


def apply_awq(layer, inputs: list[torch.Tensor], kwargs: dict, group_size: int, sym: bool) -> None:
    """Scale a transformers Llama decoder `layer`'s linears by awq_scales on its calibration `inputs`,
    dividing the operation before each group by the same scales: input_layernorm before q/k/v,
    post_attention_layernorm before gate/up, up_proj's rows before down_proj. (o_proj's would go
    into v_proj, which has fewer outputs than o_proj has inputs under grouped-query attention.)"""
    attn, mlp = layer.self_attn, layer.mlp
    groups = (
        (layer.input_layernorm.weight, (attn.q_proj, attn.k_proj, attn.v_proj)),
        (layer.post_attention_layernorm.weight, (mlp.gate_proj, mlp.up_proj)),
        (mlp.up_proj.weight, (mlp.down_proj,)),
    )
    for before, linears in groups:
        captured: list[torch.Tensor] = []
        hook = linears[0].register_forward_pre_hook(lambda _m, args, into=captured: into.append(args[0].flatten(0, -2)))
        for x in inputs:
            layer(x, **kwargs)
        hook.remove()
        s = awq_scales(torch.cat(captured), [m.weight for m in linears], group_size, sym)
        for m in linears:
            m.weight.mul_(s)
        before.div_(s[:, None] if before.dim() == 2 else s)


class _Captured(Exception):
    pass


@torch.no_grad()
def quantize_model(
    model,
    token_ids: list[int],
    group_size: int,
    sym: bool,
    act_order_groups: bool,
    min_zero=0,
    awq: bool = False,
    seq_len: int = 512,
) -> dict[str, tuple]:
    """GPTQ-solve every decoder linear of `model` (a transformers Llama) on `token_ids`, in chunks of
    seq_len, layer by layer (each layer first scaled by apply_awq when `awq`); each linear's weight
    becomes its dequantized value, and the norms the scales went into change with them. Returns
    {module name: (q, scales, zeros, g_idx)} for writers' packers."""
    chunks = [torch.tensor([token_ids[i : i + seq_len]]) for i in range(0, len(token_ids) - seq_len + 1, seq_len)]
    layers = model.model.layers
    inputs, kwargs = [], {}

    def capture(_module, args, kw):
        inputs.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Captured

    hook = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    for chunk in chunks:
        try:
            model(chunk, use_cache=False)
        except _Captured:
            pass
    hook.remove()
    result = {}
    for i, layer in enumerate(layers):
        if awq:
            apply_awq(layer, inputs, kwargs, group_size, sym)
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        hessians = {n: torch.zeros(m.in_features, m.in_features) for n, m in linears.items()}

        def accumulate(hessian: torch.Tensor):
            def hook(_module, args):
                x = args[0].reshape(-1, args[0].shape[-1])
                hessian.add_(x.t() @ x)

            return hook

        hooks = [m.register_forward_pre_hook(accumulate(hessians[n])) for n, m in linears.items()]
        for x in inputs:
            layer(x, **kwargs)
        for h in hooks:
            h.remove()
        for name, module in linears.items():
            q, scales, zeros, g_idx = gptq(module.weight, hessians[name], group_size, sym, act_order_groups, min_zero)
            module.weight.copy_((q.t() - zeros[g_idx].t()) * scales[g_idx].t())
            result[f"model.layers.{i}.{name}"] = (q, scales, zeros, g_idx)
        inputs = [layer(x, **kwargs) for x in inputs]
    return result
