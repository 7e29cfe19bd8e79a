"""Calibrated 4-bit quantization of a Llama's decoder linears, for the perplexity checkpoints of
tests/shard/test_perplexity.py (`make quality`); the formats' layouts stay in writers.py.

Two pieces, both standard:
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


class _Captured(Exception):
    pass


@torch.no_grad()
def quantize_model(
    model, token_ids: list[int], group_size: int, sym: bool, act_order_groups: bool, min_zero=0, seq_len: int = 512
) -> dict[str, tuple]:
    """GPTQ-solve every decoder linear of `model` (a transformers Llama) on `token_ids`, in chunks of
    seq_len, layer by layer; each linear's weight becomes its dequantized value. Returns
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
