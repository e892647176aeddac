"""Loss terms (SPEC §5) and the rule that only U, V and CI parameters receive gradients."""

from __future__ import annotations

import shutil

import pytest
import torch

import tspd
from conftest import TwoLayer, make_cfg, make_gpt2, needs_compiler, set_exact_factors
from tspd.losses import annealed_p, compute_losses, divergence, importance_minimality, l0, recon_passes

ALL_TERMS = {
    "faithfulness": 1.0,
    "stochastic_recon": 1.0,
    "stochastic_recon_layerwise": 1.0,
    "stochastic_recon_subset": 1.0,
    "ci_masked_recon": 1.0,
    "importance_minimality": 0.1,
    "adversarial_recon": 0.5,
}


# ---- divergence ------------------------------------------------------------------------------
def test_divergence_kl_and_mse():
    torch.manual_seed(0)
    a = torch.randn(2, 4, 7)
    b = torch.randn(2, 4, 7)
    assert float(divergence(a, a, "kl")) == pytest.approx(0.0, abs=1e-7)
    assert float(divergence(a, a + 3.0, "kl")) == pytest.approx(0.0, abs=1e-6)  # shift-invariant logits
    p, q = a.softmax(-1), b.softmax(-1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(divergence(a, b, "kl"), kl, rtol=1e-5, atol=1e-6)
    assert float(divergence(a, b, "kl")) > 0
    torch.testing.assert_close(divergence(a, b, "mse"), (a - b).pow(2).mean())


def test_divergence_positions():
    torch.manual_seed(0)
    a = torch.randn(2, 4, 7)
    b = a.clone()
    b[:, :3] = torch.randn(2, 3, 7)  # differ everywhere except the last position
    assert float(divergence(a, b, "kl", positions=[-1])) == pytest.approx(0.0, abs=1e-7)
    assert float(divergence(a, b, "kl")) > 1e-2
    torch.testing.assert_close(divergence(a, b, "mse", [0, 2]), (a[:, [0, 2]] - b[:, [0, 2]]).pow(2).mean())


# ---- minimality --------------------------------------------------------------------------------
def test_importance_minimality_value():
    g1 = torch.tensor([[[0.0, 1.0], [0.5, 0.25]]])  # (1, 2, 2)
    g2 = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])  # (2, 3) no positions
    got = importance_minimality({"a": g1, "b": g2}, p=0.5, eps=0.0)
    # site a: c0 mean(0, sqrt .5), c1 mean(1, .5); site b: c0 .5, c1 0, c2 1
    expected = (0 + 0.5**0.5) / 2 + (1 + 0.5) / 2 + 0.5 + 0.0 + 1.0
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # p = 1 is the mean CI summed over subcomponents
    assert float(importance_minimality({"b": g2}, 1.0, 0.0)) == pytest.approx(1.5)


def test_annealed_p_linear_schedule():
    cfg = make_cfg(
        [("linear1", 2)], minimality={"p_start": 0.9, "p_end": 0.1, "anneal_start_frac": 0.2, "anneal_end_frac": 0.6}, train={"steps": 100}
    )
    assert annealed_p(cfg, 0) == pytest.approx(0.9)
    assert annealed_p(cfg, 20) == pytest.approx(0.9)
    assert annealed_p(cfg, 40) == pytest.approx(0.5)
    assert annealed_p(cfg, 60) == pytest.approx(0.1)
    assert annealed_p(cfg, 99) == pytest.approx(0.1)
    const = make_cfg([("linear1", 2)], minimality={"p_start": 0.7})
    assert annealed_p(const, 0) == annealed_p(const, 10**6) == 0.7


def test_l0_counts_active():
    g = torch.tensor([[0.6, 0.4, 0.9], [0.1, 0.51, 0.5]])
    assert float(l0(g, 0.5)) == pytest.approx(1.5)


# ---- recon passes --------------------------------------------------------------------------------
def test_recon_passes_structure():
    torch.manual_seed(0)
    cfg = make_cfg([("linear*", 4)], masks={"n_samples": 3, "delta_component": True})
    dec = tspd.Decomposition(TwoLayer(), cfg)
    ci = dec.causal_importance(torch.randn(5, 6))
    gen = torch.Generator().manual_seed(0)
    full = recon_passes("stochastic_recon", dec, ci, gen)
    assert len(full) == 3 and all(set(p.masks) == {"linear1", "linear2"} for p in full)
    assert all(set(p.delta) == {"linear1", "linear2"} for p in full)
    assert not torch.equal(full[0].masks["linear1"], full[1].masks["linear1"])  # fresh per sample
    lw = recon_passes("stochastic_recon_layerwise", dec, ci, gen)
    assert len(lw) == 6 and [list(p.masks) for p in lw[:2]] == [["linear1"], ["linear2"]]
    sub = recon_passes("stochastic_recon_subset", dec, ci, gen)
    assert len(sub) == 3 and all(set(p.routed) == {"linear1", "linear2"} for p in sub)
    cim = recon_passes("ci_masked_recon", dec, ci, gen)
    assert len(cim) == 1 and torch.equal(cim[0].masks["linear1"], ci["linear1"])
    assert torch.equal(cim[0].delta["linear2"], torch.ones(5))
    with pytest.raises(ValueError):
        recon_passes("bogus", dec, ci, gen)


def test_recon_losses_vanish_for_exact_factorisation_with_full_ci():
    """With (VU)^T = W and CI = 1 everywhere, every masked pass is the target: all D = 0."""
    torch.manual_seed(0)
    losses = {**ALL_TERMS, "importance_minimality": 0.0}
    cfg = make_cfg([("linear*", 6)], losses=losses, output={"divergence": "mse"})
    dec = tspd.Decomposition(TwoLayer(), cfg)
    for s in dec.site_names:
        set_exact_factors(dec, s)
        with torch.no_grad():
            net = dec.ci_fns[s.replace(".", "__")].net
            net.w2.zero_()
            net.b2.fill_(5.0)  # z = 5 -> CI = 1
    total, terms, ci = compute_losses(dec, torch.randn(16, 6), 0, torch.Generator().manual_seed(0))
    assert set(terms) == set(losses) - {"importance_minimality"}
    assert all(torch.equal(g, torch.ones_like(g)) for g in ci.values())
    for t, v in terms.items():
        assert v < 1e-9, (t, v)


# ---- 4. gradients reach only U, V and the CI parameters --------------------------------------------
def _check_only_decomposition_grads(dec, target, flags_before):
    for n, p in target.named_parameters():
        assert p.grad is None, f"target parameter {n} received a gradient"
    assert [(n, p.requires_grad) for n, p in target.named_parameters()] == flags_before
    target_ids = {id(p) for p in target.parameters()}
    assert not any(id(p) in target_ids for p in dec.parameters())
    for s in dec.site_names:
        U, V = dec.components(s)
        assert U.grad is not None and float(U.grad.abs().sum()) > 0, s
        assert V.grad is not None and float(V.grad.abs().sum()) > 0, s
    ci_grads = [p.grad for p in dec.ci_fns.parameters()]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in ci_grads)


@pytest.mark.parametrize("delta", [False, True])
def test_gradients_only_to_components_and_ci_tms(delta):
    torch.manual_seed(0)
    target = TwoLayer(6, 4, 6)
    target.linear2.bias.requires_grad_(False)  # a mixed set of flags must survive
    target.train()
    flags = [(n, p.requires_grad) for n, p in target.named_parameters()]
    cfg = make_cfg(
        [("linear*", 5)],
        losses=ALL_TERMS,
        masks={"delta_component": delta, "subset_granularity": "per_example"},
        output={"divergence": "mse"},
    )
    dec = tspd.Decomposition(target, cfg)
    total, terms, _ = compute_losses(dec, torch.randn(16, 6), 0, torch.Generator().manual_seed(0))
    assert set(terms) == set(ALL_TERMS)
    assert torch.isfinite(total) and total.requires_grad
    total.backward()
    _check_only_decomposition_grads(dec, target, flags)
    assert target.training  # train/eval mode restored


def test_installation_is_reentrant_and_restores_only_at_the_outermost_exit():
    torch.manual_seed(0)
    target = TwoLayer(6, 4, 6)
    target.linear2.bias.requires_grad_(False)
    target.train()
    target.linear1.eval()  # mixed modes must survive too
    flags = [p.requires_grad for p in target.parameters()]
    modes = [m.training for m in target.modules()]
    dec = tspd.Decomposition(target, make_cfg([("linear*", 5)]))
    original = target.linear1
    with dec._installed():
        assert target.linear1 is not original and not any(p.requires_grad for p in target.parameters())
        with dec._installed():
            dec._stand_ins["linear1"].recorded = torch.ones(1)
        # the inner exit reset the stand-ins' states but left the target installed
        assert dec._stand_ins["linear1"].recorded is None
        assert target.linear1 is not original and not target.training
        with pytest.raises(RuntimeError, match="boom"):
            with dec._installed():
                raise RuntimeError("boom")
        assert target.linear1 is not original
    assert target.linear1 is original
    assert [p.requires_grad for p in target.parameters()] == flags
    assert [m.training for m in target.modules()] == modes
    with pytest.raises(RuntimeError, match="boom"):
        with dec._installed():
            raise RuntimeError("boom")
    assert target.linear1 is original and [p.requires_grad for p in target.parameters()] == flags
    with dec._installed():  # installs again after an error
        assert target.linear1 is not original


def test_gradients_only_to_components_and_ci_gpt2(tokens):
    model = make_gpt2(0)
    flags = [(n, p.requires_grad) for n, p in model.named_parameters()]
    cfg = make_cfg(
        [("transformer.h.0.mlp.c_fc", 6), ("transformer.h.1.attn.c_attn", 6), ("transformer.wte", 6)],
        losses=ALL_TERMS,
        ci={"kind": "attention", "attention": {"max_len": 32, "d_attn": 8}},
        masks={"delta_component": True, "subset_granularity": "per_position"},
        output={"positions": [-1, -2]},
        adversarial={"n_steps": 2},
    )
    dec = tspd.Decomposition(model, cfg)
    total, terms, _ = compute_losses(dec, tokens, 0, torch.Generator().manual_seed(0))
    assert set(terms) == set(ALL_TERMS)
    total.backward()
    _check_only_decomposition_grads(dec, model, flags)
    assert not model.training


def test_total_is_weighted_sum_of_terms():
    torch.manual_seed(0)
    coeffs = {"faithfulness": 2.0, "stochastic_recon": 0.5, "stochastic_recon_layerwise": 0.0, "importance_minimality": 0.3}
    cfg = make_cfg([("linear*", 5)], losses=coeffs, output={"divergence": "mse"})
    dec = tspd.Decomposition(TwoLayer(), cfg)
    total, terms, _ = compute_losses(dec, torch.randn(8, 6), 0, torch.Generator().manual_seed(0))
    assert set(terms) == {"faithfulness", "stochastic_recon", "importance_minimality"}
    expected = sum(coeffs[t] * v for t, v in terms.items())
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)


def test_stacked_and_unstacked_losses_agree():
    torch.manual_seed(0)
    coeffs = {**ALL_TERMS, "adversarial_recon": 0.0}
    x = torch.randn(3, 5, 6)
    vals = []
    for stack in (True, False):
        cfg = make_cfg(
            [("linear*", 5)],
            losses=coeffs,
            ci={"kind": "attention", "attention": {"max_len": 8}},
            masks={"delta_component": True, "subset_granularity": "per_position", "n_samples": 2},
            train={"stack_passes": stack},
        )
        torch.manual_seed(1)
        dec = tspd.Decomposition(TwoLayer(), cfg)
        total, terms, _ = compute_losses(dec, x, 0, torch.Generator().manual_seed(0))
        vals.append(terms)
    assert vals[0].keys() == vals[1].keys()
    for t in vals[0]:
        assert vals[0][t] == pytest.approx(vals[1][t], rel=1e-4, abs=1e-7), t


def test_adversarial_masks_are_worse_than_random_masks():
    """Sign-gradient ascent on the sources should find masks with a larger D than random ones."""
    torch.manual_seed(0)
    target = TwoLayer(6, 4, 6)
    cfg = make_cfg(
        [("linear*", 5)],
        losses={"faithfulness": 0.0, "stochastic_recon": 1.0, "stochastic_recon_layerwise": 0.0,
                "importance_minimality": 0.0, "adversarial_recon": 1.0},
        adversarial={"n_steps": 5, "step_size": 0.5},
        masks={"n_samples": 8},
        output={"divergence": "mse"},
    )
    dec = tspd.Decomposition(target, cfg)
    for s in dec.site_names:
        set_exact_factors(dec, s)
        with torch.no_grad():
            dec.component(s).V.mul_(1.0 + 0.3 * torch.randn_like(dec.component(s).V))
    with torch.no_grad():
        for fn in dec.ci_fns.values():
            fn.net.w2.zero_()
            fn.net.b2.fill_(0.3)  # CI = 0.3 everywhere: masks in [0.3, 1]
    _, terms, _ = compute_losses(dec, torch.randn(32, 6), 0, torch.Generator().manual_seed(0))
    assert terms["adversarial_recon"] > terms["stochastic_recon"] > 0


def test_failed_pass_restores_target():
    torch.manual_seed(0)
    target = TwoLayer(6, 4, 6)
    target.linear1.weight.requires_grad_(False)
    target.train()
    modules = dict(target.named_modules())
    flags = [p.requires_grad for p in target.parameters()]
    dec = tspd.Decomposition(target, make_cfg([("linear*", 5)]))
    with pytest.raises(RuntimeError):
        dec.run_pass(torch.randn(4, 6), tspd.masks.Pass(masks={"linear1": torch.ones(4, 3)}))  # wrong C
    after = dict(target.named_modules())
    assert all(after[k] is modules[k] for k in modules) and after.keys() == modules.keys()
    assert [p.requires_grad for p in target.parameters()] == flags
    assert target.training
    x = torch.randn(4, 6)
    torch.testing.assert_close(dec.run_pass(x, tspd.masks.Pass(masks={})), target(x))


def test_pass_restores_per_submodule_train_mode():
    target = TwoLayer(6, 4, 6)
    target.train()
    target.act.eval()  # e.g. a frozen BatchNorm/Dropout inside a model in training mode
    dec = tspd.Decomposition(target, make_cfg([("linear1", 3)]))
    dec.causal_importance(torch.randn(2, 6))
    assert target.training
    assert not target.act.training


@needs_compiler
def test_compiled_kl_matches_eager():
    from tspd.losses import Reference

    torch.manual_seed(0)
    target = torch.randn(3, 5, 11)
    out = (target + torch.randn(3, 5, 11)).requires_grad_()
    values, grads = [], []
    for compiled in (False, True):
        out.grad = None
        d = Reference(target, "kl", compiled=compiled).divergence(out)
        d.backward()
        values.append(d.detach())
        grads.append(out.grad.clone())
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)
    assert float(values[0]) > 0.1


@pytest.mark.parametrize("kind,positions,compiled", [("kl", None, False), ("kl", [-1], False), ("mse", None, False), ("kl", None, True)])
def test_divergences_of_stacked_outputs_equal_each_pass_divergence(kind, positions, compiled):
    """Reference.divergences on n outputs stacked along dim 0: the divergence of each block of
    rows, values and gradients (the step computes its reconstruction terms this way)."""
    if compiled and shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    from tspd.losses import Reference

    torch.manual_seed(0)
    target = torch.randn(3, 5, 11)
    out = (target.repeat(4, 1, 1) + torch.randn(12, 5, 11)).requires_grad_()
    ref = Reference(target, kind, positions, compiled=compiled)
    stacked = ref.divergences(out, 4)
    assert stacked.shape == (4,)
    (stacked * torch.arange(1.0, 5.0)).sum().backward()
    g_stacked, out.grad = out.grad.clone(), None
    each = torch.stack([ref.divergence(o) for o in out.chunk(4)])
    (each * torch.arange(1.0, 5.0)).sum().backward()
    torch.testing.assert_close(stacked, each, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_stacked, out.grad, rtol=1e-5, atol=1e-8)
    assert float(each.min()) > 0.01
    with pytest.raises(ValueError, match="output rows for 5 passes"):
        ref.divergences(out, 5)


@needs_compiler
def test_compiled_step_matches_eager():
    """train.compile: each site's CI sigmoids with its minimality term run compiled; the same losses
    and gradients as eager, also at a later step where the annealed p has moved."""
    from conftest import assert_same_step

    from tspd import losses

    coeffs = {"faithfulness": 1.0, "stochastic_recon": 1.0, "stochastic_recon_layerwise": 1.0, "importance_minimality": 0.1}
    def calls():
        info = losses._compiled_ci_and_minimality.cache_info()
        return [info.hits + info.misses]

    x = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(1))
    before, runs = calls(), []
    for compiled in (False, True):
        cfg = make_cfg(
            [("linear*", 5)], seed=0, losses=coeffs, masks={"delta_component": True},
            minimality={"p_start": 1.0, "p_end": 0.5}, train={"steps": 10, "compile": compiled},
        )
        torch.manual_seed(0)
        dec = tspd.Decomposition(TwoLayer(6, 4, 6), cfg)
        gen, steps = torch.Generator().manual_seed(3), []
        for step in (0, 7):
            dec.zero_grad()
            total, terms, _ = compute_losses(dec, x, step, gen)
            total.backward()
            steps.append((terms, {n: p.grad.clone() for n, p in dec.named_parameters() if p.grad is not None}))
        runs.append(steps)
        if not compiled:
            assert calls() == before
    assert calls()[0] > before[0]  # the compiled chain ran
    for eager, compiled in zip(*runs):
        assert_same_step(eager, compiled)
    assert runs[0][0][0]["importance_minimality"] != pytest.approx(runs[0][1][0]["importance_minimality"], rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_target_without_autocast(dtype):
    """A target held in bf16/fp16 (no autocast): the fp32 masks meet factors in the target's dtype."""
    torch.manual_seed(0)
    target = TwoLayer(6, 4, 6).to(dtype)
    cfg = make_cfg([("linear*", 5)], losses=ALL_TERMS, masks={"delta_component": True}, output={"divergence": "mse"})
    dec = tspd.Decomposition(target, cfg)
    assert dec.component("linear1").V.dtype == dtype
    total, terms, _ = compute_losses(dec, torch.randn(16, 6).to(dtype), 0, torch.Generator().manual_seed(0))
    assert set(terms) == set(ALL_TERMS) and torch.isfinite(total)
    total.backward()
    assert all(float(dec.component(s).U.grad.abs().sum()) > 0 for s in dec.site_names)


def test_adversarial_term_runs_under_the_runs_autocast(monkeypatch):
    """The adversarial passes are compared with a target output computed under autocast, so they
    must run under it too (else bf16 rounding alone gives the term a floor)."""
    import tspd.losses as losses

    seen = []
    real = losses.adversarial_recon

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(*args, **kwargs)

    monkeypatch.setattr(losses, "adversarial_recon", spy)
    torch.manual_seed(0)
    for autocast, expected in ((None, False), ("bf16", True)):
        cfg = make_cfg([("linear*", 5)], losses=ALL_TERMS, output={"divergence": "mse"}, train={"autocast": autocast})
        dec = tspd.Decomposition(TwoLayer(6, 4, 6), cfg)
        compute_losses(dec, torch.randn(8, 6), 0, torch.Generator().manual_seed(0))
        assert seen[-1] is expected


@pytest.mark.parametrize("terms", [
    {"stochastic_recon": 1.0, "stochastic_recon_layerwise": 1.0},
    dict(ALL_TERMS),
])
def test_forward_passes_counts_the_target_calls_of_a_step(terms):
    """forward_passes (the harness's pass count for the overhead bar) equals the target forwards
    one step runs when no pass is stacked or replayed."""
    from tspd.losses import forward_passes

    torch.manual_seed(0)
    target = TwoLayer(6, 4, 6)
    cfg = make_cfg([("linear*", 5)], losses=terms, masks={"n_samples": 2}, adversarial={"n_steps": 2},
                   output={"divergence": "mse"}, train={"stack_passes": False, "reuse_prefix": False})
    dec = tspd.Decomposition(target, cfg)
    calls = []
    handle = target.register_forward_hook(lambda *_: calls.append(1))
    try:
        compute_losses(dec, torch.randn(8, 6), 0, torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert len(calls) == forward_passes(dec)


def test_output_positions_out_of_range_or_on_2d_outputs_are_named():
    from tspd.losses import Reference

    out = torch.randn(2, 6, 5)
    with pytest.raises(ValueError, match=r"output.positions \[100\] out of range for outputs with 6 positions"):
        Reference(out, "kl", [100])
    Reference(out, "kl", [-6, 5])  # both ends in range
    with pytest.raises(ValueError, match="output.positions is set but the target's output is 2-D"):
        Reference(torch.randn(4, 5), "mse", [-1])
