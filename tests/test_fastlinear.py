"""fp32 products through oneDNN (tspd.fastlinear): same values and gradients as torch's own, and
the Decomposition wiring that swaps the target's linear layers only where it is safe."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tspd
from conftest import assert_same_step, make_cfg, make_gpt2
from tspd.fastlinear import FastLinear, WEIGHT_GRAD_MIN_SIDE, linear, onednn_available, use_onednn
from tspd.losses import compute_losses

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


def _grads(f, x, w, b):
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True) if b is not None else None
    y = f(x, w, b)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    ins = [x, w] + ([b] if b is not None else [])
    return (y, *torch.autograd.grad(y, ins, g))


@pytest.mark.parametrize("shape", [(37, 16, 100), (300, 96, 128), (2, 7, 80, 72)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_torch_forward_and_backward(shape, bias):
    """Values and the gradients to x, w and b; shapes on both sides of the weight-gradient switch
    (min side 16 < 64: torch; 96 x 128 and 80 x 72: oneDNN) and a 3-D input."""
    gen = torch.Generator().manual_seed(0)
    *lead, k, n = shape
    x, w = torch.randn(*lead, k, generator=gen), torch.randn(k, n, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    ref = _grads(lambda x, w, b: x @ w + (b if b is not None else 0), x, w, b)
    new = _grads(lambda x, w, b: linear(x, w, b), x, w, b)
    assert (min(k, n) >= WEIGHT_GRAD_MIN_SIDE) == (shape != (37, 16, 100))
    for r, t in zip(ref, new):
        assert r.shape == t.shape
        torch.testing.assert_close(t, r, rtol=1e-5, atol=1e-4)


def test_linear_takes_non_contiguous_inputs_and_transposed_weights():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 9, 64, generator=gen).transpose(0, 1)[:, 3:]  # (9, 17, 64), not contiguous
    w_out_in = torch.randn(80, 64, generator=gen)  # nn.Linear layout: pass w.t()
    torch.testing.assert_close(linear(x, w_out_in.t()), x @ w_out_in.t(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k,n", [(96, 128), (16, 128)])
def test_weight_gradient_of_an_nn_linear_layout_weight_is_in_its_layout(k, n):
    """An nn.Linear weight (d_out, d_in) passed as w.t(): its gradient matches torch's and is
    contiguous in the weight's own layout (what Adam then reads)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, k, generator=gen)
    w = torch.randn(n, k, generator=gen, requires_grad=True)
    g = torch.randn(200, n, generator=gen)
    (gw,) = torch.autograd.grad(linear(x, w.t()), [w], g)
    (ref,) = torch.autograd.grad(x @ w.t(), [w], g)
    assert gw.is_contiguous()
    torch.testing.assert_close(gw, ref, rtol=1e-5, atol=1e-4)


def test_linear_falls_back_under_autocast_and_for_other_dtypes():
    x, w = torch.randn(8, 64), torch.randn(64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x, w).dtype == torch.bfloat16  # autocast's own bf16 product, not an fp32 one
    xd, wd = x.double(), w.double()
    assert linear(xd, wd).dtype == torch.float64
    torch.testing.assert_close(linear(xd, wd), xd @ wd, rtol=0, atol=0)


def test_fast_linear_stands_in_for_linear_and_conv1d():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    gpt2 = make_gpt2()
    conv = gpt2.transformer.h[0].attn.c_attn
    for m, x in ((lin, torch.randn(5, 64)), (conv, torch.randn(2, 5, 32))):
        torch.testing.assert_close(FastLinear(m)(x), m(x), rtol=1e-5, atol=1e-5)


def test_setting_resolves():
    assert use_onednn("torch") is False
    assert use_onednn("onednn") is True
    assert isinstance(use_onednn("auto"), bool)


def _gpt2_dec(fp32_matmul: str, ci: str = "shared_mlp") -> tspd.Decomposition:
    sites = [("transformer.h.*.mlp.c_fc", 8), ("transformer.h.*.mlp.c_proj", 8)]
    cfg = make_cfg(sites, seed=0, train={"fp32_matmul": fp32_matmul}, ci={"kind": ci, "hidden": [64]},
                   losses={"stochastic_recon": 1.0, "stochastic_recon_layerwise": 1.0, "importance_minimality": 0.01})
    return tspd.Decomposition(make_gpt2(), cfg)


@pytest.mark.parametrize("ci", ["shared_mlp", "attention", "vector_mlp", "mlp"])
def test_decomposition_step_agrees_with_torch_products(ci):
    """One SPD step's losses and gradients (components and CI) on a tiny GPT-2, oneDNN vs torch's
    own products."""
    batch = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(2))
    results = []
    for setting in ("torch", "onednn"):
        dec = _gpt2_dec(setting, ci)
        assert bool(dec._fast) == (setting == "onednn")
        total, terms, _ = compute_losses(dec, batch, 0, torch.Generator().manual_seed(3))
        total.backward()
        results.append((terms, {n: p.grad.clone() for n, p in dec.named_parameters()}))
    assert_same_step(*results, loss_tol=(1e-4, 1e-7), grad_tol=(1e-3, 1e-6))


def test_hooked_or_wrapped_layers_are_left_alone():
    """A linear layer with a hook, or one someone swapped for a wrapper, is not replaced while
    the decomposition runs: the hook fires and the wrapper runs."""
    dec = _gpt2_dec("onednn")
    target = dec.target
    ids = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        dec.run_target(ids)  # the first run also checks that examples are independent (three more forwards)
    calls = []
    h = target.transformer.h[1].attn.c_proj.register_forward_hook(lambda m, i, o: calls.append(1))

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            calls.append(2)
            return self.inner(x)

    head = target.lm_head
    target.lm_head = Wrapper(head)
    try:
        with torch.no_grad():
            dec.run_target(ids)
    finally:
        h.remove()
        target.lm_head = head
    assert sorted(calls) == [1, 2]
    # After the run every layer is the original again.
    assert type(target.transformer.h[0].attn.c_attn).__name__ == "Conv1D"


# ---- review findings (each failed on the first version of fastlinear) ---------------------------
def test_under_autocast_the_decomposition_keeps_torch_products_exactly():
    """A bf16-autocast run leaves oneDNN off (it does not apply there): the target run equals the
    one with train.fp32_matmul: torch bit for bit, biases included."""
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    outs = []
    for setting in ("torch", "onednn"):
        sites = [("transformer.h.*.mlp.c_fc", 8)]
        dec = tspd.Decomposition(make_gpt2(), make_cfg(sites, train={"fp32_matmul": setting, "autocast": "bf16"}))
        assert not dec.onednn and not dec._fast
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(dec.run_target(ids)[0])
    assert outs[0].dtype == torch.bfloat16
    assert torch.equal(outs[0], outs[1])


def test_linear_falls_back_to_torch_linear_exactly():
    """Outside oneDNN's reach `linear` is F.linear: the same dtype and bits as nn.Linear."""
    lin = nn.Linear(64, 32)
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(linear(x, lin.weight.t(), lin.bias), lin(x))
    d = lin.double()
    assert torch.equal(linear(x.double(), d.weight.t(), d.bias), d(x.double()))


def test_onednn_is_off_for_fp64_targets_and_fp64_runs_under_autocast():
    target = make_gpt2().double()
    sites = [("transformer.h.*.mlp.c_fc", 8)]
    dec = tspd.Decomposition(target, make_cfg(sites, train={"fp32_matmul": "onednn"}))
    assert not dec.onednn
    dec = tspd.Decomposition(target, make_cfg(sites, train={"fp32_matmul": "onednn", "autocast": "bf16"}))
    total, _, _ = compute_losses(dec, torch.randint(0, 100, (2, 8)), 0, torch.Generator().manual_seed(0))
    assert torch.isfinite(total)


def test_modules_reading_their_linear_layers_weights_still_work():
    """nn.MultiheadAttention reads out_proj.weight instead of calling it, and a Linear subclass
    with its own forward must keep it: neither changes under oneDNN."""

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(64, 64)
            self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
            self.out = Doubled(64, 64)

        def forward(self, x):
            h = self.inp(x)
            return self.out(self.attn(h, h, h, need_weights=False)[0])

    torch.manual_seed(0)
    model = Model().eval()
    x = torch.randn(2, 5, 64)
    dec = tspd.Decomposition(model, make_cfg([("inp", 8)], train={"fp32_matmul": "onednn"}))
    assert dec.onednn
    with torch.no_grad():
        out, _ = dec.run_target(x)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


def test_measurements_leave_the_global_rng_alone():
    from tspd.fastlinear import onednn_fp32_is_faster
    from tspd.losses import measure_fast_bf16

    onednn_fp32_is_faster.cache_clear()
    measure_fast_bf16.cache_clear()
    state = torch.get_rng_state()
    onednn_fp32_is_faster()
    measure_fast_bf16()
    assert torch.equal(state, torch.get_rng_state())


def test_backward_hooks_on_a_linear_layer_are_kept():
    dec = _gpt2_dec("onednn")
    fired = []
    layer = dec.target.transformer.h[1].attn.c_attn
    h = layer.register_full_backward_hook(lambda m, gi, go: fired.append(1))
    try:
        total, _, _ = compute_losses(dec, torch.randint(0, 100, (2, 8)), 0, torch.Generator().manual_seed(0))
        total.backward()
    finally:
        h.remove()
    assert fired


def test_non_contiguous_bias_empty_output_and_double_backward():
    x, w = torch.randn(6, 64), torch.randn(64, 80)
    b = torch.randn(1, 160)[0, ::2]  # a strided bias
    torch.testing.assert_close(linear(x, w, b), x @ w + b, rtol=1e-5, atol=1e-4)
    assert linear(x, torch.randn(64, 0)).shape == (6, 0)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(linear(xg, w).pow(2).sum(), [xg], create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_resume_keeps_the_fp32_matmul_choice_the_run_started_with(tmp_path, monkeypatch):
    """train.fp32_matmul 'auto' measures per process; a resumed run uses the checkpoint's choice,
    so it stays bit-identical to an uninterrupted run even where the new process measures otherwise."""
    import tspd.fastlinear as fl

    cfg = make_cfg([("transformer.h.*.mlp.c_fc", 8)], seed=0, ci={"kind": "shared_mlp", "hidden": [64]},
                   losses={"stochastic_recon": 1.0, "importance_minimality": 0.01},
                   train={"steps": 6, "batch_size": 4, "eval_batches": 1, "eval_every": 100, "checkpoint_every": 100})

    def data(step):
        return torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(1000 + step))

    monkeypatch.setattr(fl, "onednn_fp32_is_faster", lambda: True)
    full = tspd.decompose(make_gpt2(0), data, cfg, run_dir=tmp_path / "a", progress=False)
    assert full.onednn
    tspd.decompose(make_gpt2(0), data, cfg, run_dir=tmp_path / "b", progress=False, stop_after=3)
    monkeypatch.setattr(fl, "onednn_fp32_is_faster", lambda: False)  # the resuming process "measures" otherwise
    resumed = tspd.decompose(make_gpt2(0), data, cfg, run_dir=tmp_path / "b", progress=False, resume=True)
    assert resumed.onednn
    b = resumed.state_dict()
    for k, v in full.state_dict().items():
        assert torch.equal(v, b[k]), k


def test_a_onednn_output_can_be_changed_in_place():
    """Models that edit a linear layer's output in place (3-D inputs: oneDNN returns a view)."""
    x = torch.randn(2, 3, 64, requires_grad=True)
    w = torch.randn(64, 80, requires_grad=True)
    y = linear(x, w)
    y.mul_(2.0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, 2 * w.sum(1).expand(2, 3, 64), rtol=1e-5, atol=1e-4)
