"""The GPTQ solver that writes `make quality`'s 4-bit checkpoints: its output is in the writers'
convention, and it compensates rounding error, beating round-to-nearest on the layer's inputs."""

import pytest
import torch

from tests.shard.quantization import solver, writers


def _layer(seed=0, n=48, k=128, rows=1024):
    """A weight [n, k] and correlated inputs [rows, k] (features of unequal scale, as a real
    layer's are), with H = X^T X."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(rows, 16, generator=g) @ torch.randn(16, k, generator=g)
    x = x + 0.1 * torch.randn(rows, k, generator=g)
    x = x * torch.rand(k, generator=g) * 3
    return w, x, x.t() @ x


def _dequantize(q, scales, zeros, g_idx):  # -> [N, K], the writers' w ~= (q - zero) * scale
    return ((q - zeros[g_idx]) * scales[g_idx]).t()


@pytest.mark.parametrize(("sym", "act_order_groups"), [(False, True), (False, False), (True, False)])
def test_gptq_beats_round_to_nearest_on_the_layers_inputs(sym, act_order_groups):
    w, x, H = _layer()
    q, scales, zeros, g_idx = solver.gptq(w, H, 32, sym, act_order_groups)
    assert q.shape == (128, 48) and int(q.min()) >= 0 and int(q.max()) <= 15
    assert scales.shape == zeros.shape == (4, 48)
    assert torch.equal(torch.bincount(g_idx, minlength=4), torch.full((4,), 32))  # four groups of 32
    if not act_order_groups:
        assert torch.equal(g_idx, torch.arange(128) // 32)
    if sym:
        assert (zeros == 8).all()
    solved = _dequantize(q, scales, zeros, g_idx)
    rtn = _dequantize(*writers.quantize_int4(w, 32, sym, g_idx if act_order_groups else None))
    exact = x @ w.t()
    err_solved, err_rtn = ((x @ solved.t() - exact) ** 2).sum(), ((x @ rtn.t() - exact) ** 2).sum()
    assert err_solved < 0.7 * err_rtn, (float(err_solved), float(err_rtn))


def test_group_params_minimise_the_weighted_error_over_the_clipping_grid():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    w[:, 0] = 6.0  # an outlier: clipping it costs less than a coarse grid for the rest
    importance = torch.ones(32)
    scale, zero = solver.group_params(w, False, importance)
    err = ((solver.fake_quantize(w, scale[:, None], zero[:, None]) - w) ** 2).sum(-1)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    minmax = ((hi - lo) / 15).half().float()
    minmax_zero = torch.round(-lo / minmax).to(torch.int64)
    err_minmax = ((solver.fake_quantize(w, minmax[:, None], minmax_zero[:, None]) - w) ** 2).sum(-1)
    assert (err <= err_minmax + 1e-6).all() and (err < err_minmax).any()


def test_awq_scales_beat_no_scaling_on_inputs_with_outlier_features():
    w, x, _ = _layer(seed=2)
    x[:, :4] *= 20  # a few features carry large activations, as in a real layer
    s = solver.awq_scales(x, [w[:24], w[24:]], 32, sym=False)
    assert s.shape == (128,) and (s > 0).all()
    assert s[:4].mean() > s[4:].mean()  # the loud features are scaled up in the weights
    exact = x @ w.t()
    err_scaled = ((x @ (solver.rtn(w * s, 32, False) / s).t() - exact) ** 2).sum()
    err_plain = ((x @ solver.rtn(w, 32, False).t() - exact) ** 2).sum()
    assert err_scaled < 0.8 * err_plain, (float(err_scaled), float(err_plain))


def test_apply_awq_keeps_the_layers_function():
    model = writers.dense_model(seed=3)
    layer = model.model.layers[0]
    for p in (layer.input_layernorm.weight, layer.post_attention_layernorm.weight):
        p.data.uniform_(0.5, 1.5)
    ids = torch.tensor([writers.PROMPTS[0]])
    with torch.no_grad():
        before = model(ids).logits
        inputs, kwargs = [], {}

        def capture(_module, args, kw):
            inputs.append(args[0] if args else kw["hidden_states"])
            kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})

        hook = layer.register_forward_pre_hook(capture, with_kwargs=True)
        model(ids)
        hook.remove()
        mlp = layer.mlp
        weights = [m.weight.clone() for m in (layer.self_attn.q_proj, mlp.gate_proj, mlp.down_proj)]
        solver.apply_awq(layer, inputs, kwargs, 32, sym=False)
        after = model(ids).logits
    assert all(
        not torch.equal(w, m.weight) for w, m in zip(weights, (layer.self_attn.q_proj, mlp.gate_proj, mlp.down_proj))
    )
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
