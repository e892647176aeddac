"""Mask sampling, routing (SPEC §4) and stacked passes."""

from __future__ import annotations

import pytest
import torch

import tspd
from conftest import TwoLayer, make_cfg, make_gpt2
from tspd.masks import Pass, delta_masks, sample_sources, stochastic_masks, subset_routing

SITES = [f"s{i}" for i in range(6)]


# ---- 6. subset routing ----------------------------------------------------------------------
def test_subset_size_is_uniform_over_1_to_n():
    n_draws = 60000
    routed = subset_routing(SITES, (n_draws,), "per_example", torch.Generator().manual_seed(0))
    assert set(routed) == set(SITES)
    k = torch.stack([routed[s] for s in SITES]).sum(0)
    assert int(k.min()) >= 1 and int(k.max()) <= 6  # never empty, never more than n
    freq = torch.bincount(k, minlength=7)[1:].double() / n_draws
    assert torch.all((freq - 1 / 6).abs() < 0.05 / 6), freq
    # chi-square against uniform, 5 dof: 99.9% quantile is 20.5
    expected = n_draws / 6
    chi2 = float(((freq * n_draws - expected) ** 2 / expected).sum())
    assert chi2 < 20.5, chi2


def test_subset_given_k_is_uniform_over_sites():
    n_draws = 60000
    routed = subset_routing(SITES, (n_draws,), "per_example", torch.Generator().manual_seed(1))
    R = torch.stack([routed[s] for s in SITES], dim=1)  # (draws, sites)
    k = R.sum(1)
    # marginal: P(site routed) = E[k]/n = 3.5/6
    marg = R.double().mean(0)
    assert torch.all((marg - 3.5 / 6).abs() < 0.02), marg
    # for k = 1, which site is chosen is uniform
    ones = R[k == 1].double().mean(0)
    assert torch.all((ones - 1 / 6).abs() < 0.03), ones


def test_subset_routing_granularity_shapes():
    gen = torch.Generator().manual_seed(0)
    lead = (64, 12)
    per_pos = subset_routing(SITES, lead, "per_position", gen)
    per_ex = subset_routing(SITES, lead, "per_example", gen)
    per_b = subset_routing(SITES, lead, "per_batch", gen)
    for r in (per_pos, per_ex, per_b):
        for s in SITES:
            assert r[s].shape == lead and r[s].dtype == torch.bool
    P = torch.stack([per_pos[s] for s in SITES], -1)  # (B, T, n)
    E = torch.stack([per_ex[s] for s in SITES], -1)
    Bt = torch.stack([per_b[s] for s in SITES], -1)
    # per_position: the subset differs across positions (in many examples)
    varies = (P != P[:, :1]).any(-1).any(-1)
    assert int(varies.sum()) > 50
    # per_example: constant across positions, differs across examples
    assert torch.equal(E, E[:, :1].expand_as(E))
    assert (E[:, 0] != E[:1, 0]).any()
    # per_batch: one subset for everything
    assert torch.equal(Bt, Bt[:1, :1].expand_as(Bt))
    for R in (P, E, Bt):
        assert int(R.sum(-1).min()) >= 1


def test_subset_routing_with_sites_of_different_leading_shapes():
    """A pooled site (B,) next to token sites (B, T): per example, each example's subset is the
    same at every site, along dim 0 (not broadcast along positions), with the same draws as one shape."""
    leads = {"a": (4,), "b": (4, 4), "c": (4, 4)}
    routed = subset_routing(["a", "b", "c"], leads, "per_example", torch.Generator().manual_seed(5))
    same = subset_routing(["a", "b", "c"], (4, 4), "per_example", torch.Generator().manual_seed(5))
    assert routed["a"].shape == (4,) and routed["b"].shape == (4, 4)
    for s in "abc":
        assert torch.equal(routed[s].reshape(4, -1)[:, 0], same[s][:, 0])
    assert torch.equal(routed["b"], routed["b"][:, :1].expand(4, 4))  # constant along positions
    with pytest.raises(ValueError, match="per_position needs every site's CI to have the same leading shape"):
        subset_routing(["a", "b"], leads, "per_position", torch.Generator())
    with pytest.raises(ValueError, match="per_example needs every site's CI to have the batch"):
        subset_routing(["a", "b"], {"a": (3,), "b": (4, 4)}, "per_example", torch.Generator())
    assert subset_routing(["a", "b"], {"a": (3,), "b": (4, 4)}, "per_batch", torch.Generator())["a"].shape == (3,)


def test_subset_routing_reproducible_and_rejects_bad_granularity():
    a = subset_routing(SITES, (8, 3), "per_position", torch.Generator().manual_seed(3))
    b = subset_routing(SITES, (8, 3), "per_position", torch.Generator().manual_seed(3))
    assert all(torch.equal(a[s], b[s]) for s in SITES)
    with pytest.raises(ValueError, match="granularity"):
        subset_routing(SITES, (8,), "per_token", torch.Generator())


# ---- mask sampling ---------------------------------------------------------------------------
def test_stochastic_masks_continuous_and_binomial():
    gen = torch.Generator().manual_seed(0)
    g = torch.rand(2000, 5)
    g[:, 0] = 1.0
    g[:, 1] = 0.0
    m = stochastic_masks({"a": g}, "continuous", gen)["a"]
    assert m.shape == g.shape
    assert torch.all(m >= g) and torch.all(m <= 1)
    assert torch.equal(m[:, 0], torch.ones(2000))  # g = 1: always on
    # g = 0: m = r ~ U(0, 1)
    assert abs(float(m[:, 1].mean()) - 0.5) < 0.03
    assert len(torch.unique(m[:, 1])) > 1900
    mb = stochastic_masks({"a": g}, "binomial", gen)["a"]
    assert set(torch.unique(mb[:, 1]).tolist()) == {0.0, 1.0}
    r = (mb - g) / (1 - g).clamp_min(1e-9)
    on = r[:, 1:]
    assert torch.all((on.abs() < 1e-5) | ((on - 1).abs() < 1e-5))
    assert abs(float(mb[:, 1].mean()) - 0.5) < 0.05


def test_uniform_grid_moments_and_reproducibility():
    """U(0, 1) on the grid (k + 1/2) / 2^16, four values from each 64-bit draw of the run's
    generator: right mean, variance and lag-1 correlation across them; the same generator state
    gives the same values, and the generator moves on."""
    from tspd.masks import uniform

    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    u = uniform((1001, 203), gen, torch.float32, "cpu").flatten().double()
    k = u * 2**16 - 0.5
    assert torch.equal(k, k.round()) and float(k.min()) >= 0 and float(k.max()) <= 2**16 - 1
    assert abs(float(u.mean()) - 0.5) < 0.003
    assert abs(float(u.var()) - 1 / 12) < 0.002
    c = u - u.mean()
    assert abs(float((c[1:] * c[:-1]).mean() / c.var())) < 0.01
    assert len(torch.unique(u)) > 60000
    gen.set_state(state)
    assert torch.equal(uniform((1001, 203), gen, torch.float32, "cpu").flatten().double(), u)
    assert not torch.equal(uniform((1001, 203), gen, torch.float32, "cpu").flatten().double(), u)


def test_fresh_sources_per_draw_and_delta_shape():
    gen = torch.Generator().manual_seed(0)
    like = torch.zeros(4, 3, 5)
    a, b = sample_sources(like, "continuous", gen), sample_sources(like, "continuous", gen)
    assert not torch.equal(a, b)
    d = delta_masks({"s": like}, gen)["s"]
    assert d.shape == (4, 3)
    assert float(d.min()) >= 0 and float(d.max()) <= 1


# ---- 10. stacked versus unstacked passes ---------------------------------------------------------
def _mixed_passes(dec, ci, gen, use_delta):
    sites = dec.site_names
    lead = tuple(ci[sites[0]].shape[:-1])
    passes = []
    # all sites, stochastic masks
    passes.append(Pass(masks=stochastic_masks(ci, "continuous", gen), delta=delta_masks(ci, gen) if use_delta else {}))
    # one site only (layerwise-like)
    s0 = {sites[0]: ci[sites[0]]}
    passes.append(Pass(masks=stochastic_masks(s0, "continuous", gen), delta=delta_masks(s0, gen) if use_delta else {}))
    # per-position subset routing
    passes.append(
        Pass(
            masks=stochastic_masks(ci, "binomial", gen),
            routed=subset_routing(sites, lead, "per_position", gen),
            delta=delta_masks(ci, gen) if use_delta else {},
        )
    )
    # per-example subset routing, CI masks
    passes.append(
        Pass(masks=dict(ci), routed=subset_routing(sites, lead, "per_example", gen), delta=delta_masks(ci, gen) if use_delta else {})
    )
    # nothing routed at all
    passes.append(Pass(masks={}))
    return passes


@pytest.mark.parametrize("use_delta", [False, True])
def test_stacked_equals_unstacked_gpt2(tokens, use_delta):
    model = make_gpt2(0)
    cfg = make_cfg(
        [("transformer.h.*.mlp.c_fc", 6), ("transformer.h.1.attn.c_attn", 6), ("transformer.wte", 6)],
        masks={"delta_component": use_delta},
    )
    dec = tspd.Decomposition(model, cfg)
    ci = dec.causal_importance(tokens)
    passes = _mixed_passes(dec, ci, torch.Generator().manual_seed(0), use_delta)
    stacked = dec.run_passes(tokens, passes, stack=True)
    single = dec.run_passes(tokens, passes, stack=False)
    assert len(stacked) == len(single) == len(passes)
    for a, b in zip(stacked, single):
        assert a.shape == b.shape == (3, 10, 100)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # sanity: the passes really differ from each other and the empty pass is the target
    assert (single[0] - single[2]).abs().max() > 1e-3
    torch.testing.assert_close(single[-1], model(tokens).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("use_delta", [False, True])
def test_stacked_equals_unstacked_gradients(use_delta):
    torch.manual_seed(0)
    target = TwoLayer(6, 4, 6)
    dec = tspd.Decomposition(target, make_cfg([("linear*", 5)], masks={"delta_component": use_delta}))
    x = torch.randn(7, 6)
    ci = dec.causal_importance(x)

    def grads(stack):
        dec.zero_grad(set_to_none=True)
        passes = _mixed_passes(dec, ci, torch.Generator().manual_seed(4), use_delta)
        outs = dec.run_passes(x, passes, stack=stack)
        sum(o.pow(2).sum() for o in outs).backward()
        return {n: p.grad.clone() for n, p in dec.named_parameters() if p.grad is not None}

    ga, gb = grads(True), grads(False)
    assert ga.keys() == gb.keys() and len(ga) >= 4
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-6)


def test_stacked_equals_unstacked_when_some_passes_lack_delta():
    torch.manual_seed(0)
    target = TwoLayer(6, 4, 6)
    dec = tspd.Decomposition(target, make_cfg([("linear*", 5)], masks={"delta_component": True}))
    x = torch.randn(7, 6)
    ci = dec.causal_importance(x)
    gen = torch.Generator().manual_seed(0)
    with_delta = Pass(masks=stochastic_masks(ci, "continuous", gen), delta=delta_masks(ci, gen))
    without_delta = Pass(masks=stochastic_masks(ci, "continuous", gen))
    stacked = dec.run_passes(x, [with_delta, without_delta], stack=True)
    single = dec.run_passes(x, [with_delta, without_delta], stack=False)
    for a, b in zip(stacked, single):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
