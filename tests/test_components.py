"""Parameterisation of sites (SPEC §2): masked forwards, faithfulness, Conv1D and Embedding sites."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tspd
from conftest import OneLinear, TwoLayer, make_cfg, make_gpt2, set_exact_factors
from tspd.components import Components, SiteError, resolve_sites, target_weight
from tspd.masks import Pass


def _ones(dec, batch):
    _, inputs = dec.run_target(batch)
    ci = dec.causal_importance(batch)
    return dec.ones_pass(ci), inputs


# ---- 1. masked forward with all-ones masks --------------------------------------------------
def test_all_ones_masks_give_x_V_U_plus_bias():
    torch.manual_seed(0)
    target = OneLinear(5, 3)
    dec = tspd.Decomposition(target, make_cfg([("linear1", 7)]))
    x = torch.randn(4, 5)
    U, V = dec.components("linear1")
    assert V.shape == (5, 7) and U.shape == (7, 3)
    p, _ = _ones(dec, x)
    out = dec.run_pass(x, p)
    expected = x @ V @ U + target.linear1.bias
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    # ...and the random init is not the target weight, so this is not the target output.
    assert not torch.allclose(out, target(x), atol=1e-3)


def test_masks_scale_inner_activations():
    torch.manual_seed(0)
    target = OneLinear(5, 3)
    dec = tspd.Decomposition(target, make_cfg([("linear1", 6)]))
    x = torch.randn(4, 5)
    m = torch.rand(4, 6)
    out = dec.run_pass(x, Pass(masks={"linear1": m}))
    U, V = dec.components("linear1")
    torch.testing.assert_close(out, ((x @ V) * m) @ U + target.linear1.bias, rtol=1e-6, atol=1e-6)
    # zero masks leave only the (frozen) bias
    out0 = dec.run_pass(x, Pass(masks={"linear1": torch.zeros(4, 6)}))
    torch.testing.assert_close(out0, target.linear1.bias.expand(4, 3).detach())


def test_delta_component_with_all_ones_masks_reproduces_target():
    torch.manual_seed(0)
    target = TwoLayer(6, 4, 6)
    dec = tspd.Decomposition(target, make_cfg([("linear*", 9)], masks={"delta_component": True}))
    x = torch.randn(8, 6)
    p, _ = _ones(dec, x)
    assert set(p.delta) == {"linear1", "linear2"}
    out = dec.run_pass(x, p)
    torch.testing.assert_close(out, target(x), rtol=0, atol=1e-5)
    # With the delta switched off (delta mask 0) the output is the components' own, which differs.
    p0 = Pass(masks=p.masks, delta={s: torch.zeros_like(d) for s, d in p.delta.items()})
    assert not torch.allclose(dec.run_pass(x, p0), target(x), atol=1e-3)


@pytest.mark.parametrize("fp32_matmul", ["torch", "onednn"])
def test_unrouted_sites_use_target_weight(fp32_matmul):
    torch.manual_seed(0)
    target = TwoLayer(6, 4, 6)
    dec = tspd.Decomposition(target, make_cfg([("linear*", 5)], train={"fp32_matmul": fp32_matmul}))
    x = torch.randn(8, 6)
    # Exact with torch's own products; oneDNN's sum in another order (fp32 rounding).
    tol = dict(rtol=0, atol=0) if fp32_matmul == "torch" else dict(rtol=1e-6, atol=1e-6)
    # No site in the pass: the target itself.
    torch.testing.assert_close(dec.run_pass(x, Pass(masks={})), target(x), **tol)
    # Routed nowhere: the target itself.
    p = Pass(
        masks={"linear1": torch.rand(8, 5), "linear2": torch.rand(8, 5)},
        routed={"linear1": torch.zeros(8, dtype=torch.bool), "linear2": torch.zeros(8, dtype=torch.bool)},
    )
    torch.testing.assert_close(dec.run_pass(x, p), target(x), **tol)


def test_mixed_routing_rows():
    """Routed rows use the components, the others the target weight."""
    torch.manual_seed(0)
    target = OneLinear(5, 3)
    dec = tspd.Decomposition(target, make_cfg([("linear1", 4)]))
    x = torch.randn(6, 5)
    m = torch.rand(6, 4)
    routed = torch.tensor([True, False, True, False, False, True])
    out = dec.run_pass(x, Pass(masks={"linear1": m}, routed={"linear1": routed}))
    U, V = dec.components("linear1")
    comp = ((x @ V) * m) @ U + target.linear1.bias
    torch.testing.assert_close(out[routed], comp[routed], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[~routed], target(x)[~routed], rtol=1e-6, atol=1e-6)


# ---- 2. faithfulness of an exact factorisation -----------------------------------------------
@pytest.mark.parametrize("C", [4, 9])  # exactly the rank, and more than the rank
def test_faithfulness_zero_for_exact_factorisation(C):
    torch.manual_seed(0)
    target = TwoLayer(6, 4, 6)  # linear1: 4x6 (rank 4); linear2: 6x4 (rank 4)
    dec = tspd.Decomposition(target, make_cfg([("linear*", C)]))
    assert float(dec.faithfulness().detach()) > 1e-3  # random init is far from W
    for s in dec.site_names:
        set_exact_factors(dec, s)
    assert float(dec.faithfulness().detach()) < 1e-10
    x = torch.randn(5, 6)
    p, _ = _ones(dec, x)
    torch.testing.assert_close(dec.run_pass(x, p), target(x), rtol=0, atol=1e-5)


def test_faithfulness_is_mean_over_all_entries():
    torch.manual_seed(0)
    target = TwoLayer(6, 4, 6)
    dec = tspd.Decomposition(target, make_cfg([("linear*", 3)]))
    diffs = [
        (target_weight(dec._stand_ins[s].original, "linear") - dec.component(s).weight()).detach().flatten()
        for s in dec.site_names
    ]
    expected = torch.cat(diffs).pow(2).mean()
    torch.testing.assert_close(dec.faithfulness().detach(), expected)


def test_components_weight_layout_and_inner():
    c = Components("linear", d_in=5, d_out=3, C=4, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 5)
    assert c.weight().shape == (3, 5)
    torch.testing.assert_close(c.inner(x), x @ c.V)
    torch.testing.assert_close(c.weight(), (c.V @ c.U).T)
    e = Components("embedding", d_in=10, d_out=3, C=4)
    ids = torch.tensor([[1, 7], [0, 9]])
    torch.testing.assert_close(e.inner(ids), e.V[ids])


# ---- 3. Conv1D and Embedding sites on GPT-2 ---------------------------------------------------
def test_gpt2_conv1d_sites_exact_factorisation_matches_hf(tokens):
    model = make_gpt2(0)
    ref = model(tokens).logits
    cfg = make_cfg([("transformer.h.*.mlp.c_fc", 32), ("transformer.h.*.attn.c_attn", 40)])
    dec = tspd.Decomposition(model, cfg)
    assert dec.site_names == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.1.attn.c_attn",
        "transformer.h.1.mlp.c_fc",
    ]
    # Conv1D stores d_in x d_out; the site must see it in nn.Linear layout.
    U, V = dec.components("transformer.h.0.mlp.c_fc")
    assert V.shape == (32, 32) and U.shape == (32, 128)
    U, V = dec.components("transformer.h.0.attn.c_attn")
    assert V.shape == (32, 40) and U.shape == (40, 96)
    for s in dec.site_names:
        set_exact_factors(dec, s)
    assert float(dec.faithfulness().detach()) < 1e-10
    p, _ = _ones(dec, tokens)
    out = dec.run_pass(tokens, p)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    # the original modules are back in place afterwards
    assert type(model.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
    torch.testing.assert_close(model(tokens).logits, ref, rtol=0, atol=0)


def test_gpt2_conv1d_delta_component_matches_hf(tokens):
    model = make_gpt2(1)
    ref = model(tokens).logits
    cfg = make_cfg([("transformer.h.*.mlp.c_fc", 8), ("transformer.h.0.attn.c_attn", 8)], masks={"delta_component": True})
    dec = tspd.Decomposition(model, cfg)
    p, _ = _ones(dec, tokens)
    out = dec.run_pass(tokens, p)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    # without delta the random low-rank components do not reproduce the model
    p.delta = {}
    assert (dec.run_pass(tokens, p) - ref).abs().max() > 1e-2


def test_gpt2_embedding_site(tokens):
    model = make_gpt2(2)
    ref = model(tokens).logits
    dec = tspd.Decomposition(model, make_cfg([("transformer.wte", 32)], ci={"kind": "vector_mlp"}))
    U, V = dec.components("transformer.wte")
    assert V.shape == (100, 32) and U.shape == (32, 32)  # V is vocab x C
    # CI has shape (batch, positions, C) and lies in [0, 1]
    ci = dec.causal_importance(tokens)["transformer.wte"]
    assert ci.shape == (3, 10, 32)
    assert float(ci.min()) >= 0 and float(ci.max()) <= 1
    # h = V[token]: the inner activation is a row lookup
    _, inputs = dec.run_target(tokens)
    assert torch.equal(inputs["transformer.wte"], tokens)
    torch.testing.assert_close(dec.component("transformer.wte").inner(tokens), V[tokens])
    set_exact_factors(dec, "transformer.wte")
    assert float(dec.faithfulness().detach()) < 1e-10
    p, _ = _ones(dec, tokens)
    torch.testing.assert_close(dec.run_pass(tokens, p), ref, rtol=0, atol=1e-4)
    # ablating every subcomponent at one position changes the logits from that position on only
    out = dec.forward_with_ablation(tokens, {"transformer.wte": list(range(32))}, positions=[4])
    torch.testing.assert_close(out[:, :4], ref[:, :4], rtol=0, atol=1e-4)
    assert (out[:, 4:] - ref[:, 4:]).abs().max() > 1e-3


def test_gpt2_embedding_site_with_delta(tokens):
    model = make_gpt2(3)
    ref = model(tokens).logits
    dec = tspd.Decomposition(model, make_cfg([("transformer.wte", 5)], masks={"delta_component": True}))
    p, _ = _ones(dec, tokens)
    torch.testing.assert_close(dec.run_pass(tokens, p), ref, rtol=0, atol=1e-4)


def test_gpt2_dict_batch(tokens):
    model = make_gpt2(0)
    batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
    ref = model(**batch).logits
    dec = tspd.Decomposition(model, make_cfg([("transformer.h.0.mlp.c_fc", 4)], masks={"delta_component": True}))
    out, inputs = dec.run_target(batch)
    torch.testing.assert_close(out, ref)
    assert inputs["transformer.h.0.mlp.c_fc"].shape == (3, 10, 32)
    p = dec.ones_pass(dec.causal_importance(batch))
    torch.testing.assert_close(dec.run_pass(batch, p), ref, rtol=0, atol=1e-4)


def test_gpt2_dict_batch_with_broadcast_inputs_stacks(tokens):
    """Keyword inputs that are not per example (a (1, T) position_ids, a flag) pass through stacking."""
    from tspd.losses import recon_passes

    model = make_gpt2(0)
    batch = {"input_ids": tokens, "position_ids": torch.arange(tokens.shape[1])[None], "use_cache": False}
    dec = tspd.Decomposition(model, make_cfg([("transformer.h.*.mlp.c_fc", 4)], masks={"delta_component": True}))
    with torch.no_grad():
        _, inputs = dec.run_target(batch)
        ci, _ = dec.ci_from_logits(dec.ci_logits(inputs))
        gen = torch.Generator().manual_seed(0)
        passes = recon_passes("stochastic_recon_layerwise", dec, ci, gen) + recon_passes("stochastic_recon", dec, ci, gen)
        stacked = dec.run_passes(batch, passes)  # the stochastic pass stacks with block 0's layerwise one
        single = dec.run_passes(batch, passes, stack=False)
    assert len(stacked) == 3
    for a, b in zip(stacked, single):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---- site resolution -----------------------------------------------------------------------
def test_site_pattern_matching_nothing_lists_modules():
    target = TwoLayer()
    with pytest.raises(SiteError) as err:
        resolve_sites(target, [("linear3", 4)])
    msg = str(err.value)
    assert "linear3" in msg and "linear1" in msg and "linear2" in msg
    with pytest.raises(SiteError, match="linear1"):
        tspd.Decomposition(target, make_cfg([("nope.*", 4)]))


def test_site_pattern_on_unsupported_module():
    with pytest.raises(SiteError) as err:
        resolve_sites(TwoLayer(), [("act", 4)])
    assert "ReLU" in str(err.value) and "linear1" in str(err.value)


def test_a_block_glob_takes_its_matrices_and_skips_activations_norms_and_containers():
    """`transformer.h.1.mlp.*` also meets the MLP's activation and dropout: refused before."""
    gpt = make_gpt2(0)
    assert resolve_sites(gpt, [("transformer.h.1.mlp.*", 4)]) == [("transformer.h.1.mlp.c_fc", 4), ("transformer.h.1.mlp.c_proj", 4)]
    assert [n for n, _ in resolve_sites(gpt, [("transformer.h.1.*", 4)])] == [
        f"transformer.h.1.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    with pytest.raises(SiteError, match="LayerNorm"):  # nothing decomposable matched: still named
        resolve_sites(gpt, [("transformer.h.*.ln_*", 4)])
    with pytest.raises(SiteError, match="'1' \\(Conv1d\\)"):  # a weight matrix tspd cannot take is never skipped
        resolve_sites(nn.Sequential(nn.Linear(3, 3), nn.Conv1d(3, 3, 1), nn.ReLU()), [("*", 2)])

    class OwnMatrix(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(3, 3))

    for odd, name in ((nn.MultiheadAttention(4, 2), "MultiheadAttention"), (nn.GRU(3, 3), "GRU"), (OwnMatrix(), "OwnMatrix")):
        with pytest.raises(SiteError, match=f"'1' \\({name}\\)"):  # a matrix under another name than `weight`
            resolve_sites(nn.Sequential(nn.Linear(3, 3), odd), [("*", 2)])


def test_resolve_sites_globs_in_module_order():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3), nn.Linear(3, 2))
    assert resolve_sites(model, [("3", 2), ("0", 5), ("2", 4)]) == [("0", 5), ("2", 4), ("3", 2)]
    gpt = make_gpt2(0)
    sites = resolve_sites(gpt, [("transformer.h.*.mlp.c_*", 3)])
    assert [n for n, _ in sites] == [
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
        "transformer.h.1.mlp.c_fc",
        "transformer.h.1.mlp.c_proj",
    ]
    assert all(c == 3 for _, c in sites)
    # overlapping patterns: the same C is fine, different Cs are named
    assert resolve_sites(model, [("[02]", 4), ("2", 4)]) == [("0", 4), ("2", 4)]
    with pytest.raises(SiteError, match="'2' is matched by two site patterns with different C .4 and 6"):
        resolve_sites(model, [("[02]", 4), ("2", 6)])


def test_component_unknown_site_raises():
    dec = tspd.Decomposition(OneLinear(), make_cfg([("linear1", 2)]))
    with pytest.raises(KeyError):
        dec.component("linear9")


def test_a_site_whose_module_is_never_called_is_named():
    """nn.MultiheadAttention uses out_proj's weight directly: decomposing it would do nothing, so the
    first target run says so; a Linear subclass with a `bias` read by the forward still works."""
    from tspd.components import SiteError

    class UsesWeight(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.other = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.nn.functional.linear(self.other(x), self.proj.weight)

    dec = tspd.Decomposition(UsesWeight(), make_cfg([("proj", 3), ("other", 3)]))
    with pytest.raises(SiteError, match="site.s. proj were never called"):
        dec.run_target(torch.randn(2, 4))

    class ReadsBias(torch.nn.Module):  # a forward that reads a site's bias itself, besides calling it
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x) - self.proj.bias

    dec = tspd.Decomposition(ReadsBias(), make_cfg([("proj", 3)]))
    out, inputs = dec.run_target(torch.randn(2, 4))
    assert set(inputs) == {"proj"} and out.shape == (2, 4)
    # torch's fused fast path of TransformerEncoderLayer (eval mode) is off while tspd stands in:
    # the layer calls its linear1, so it can be a site (tests/test_plain_models.py checks the masks act)
    layer = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    dec = tspd.Decomposition(layer, make_cfg([("linear1", 4)]))
    _, inputs = dec.run_target(torch.randn(2, 5, 8))
    assert inputs["linear1"].shape == (2, 5, 8)


def test_a_linear_or_embedding_subclass_with_its_own_forward_is_refused():
    """E.g. Gemma's embedding scaled by sqrt(d): a masked pass would compute the plain lookup."""
    from tspd.components import SiteError

    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 5.0

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.norm_emb, self.out = Scaled(10, 4), nn.Embedding(10, 4, max_norm=1.0), nn.Linear(4, 10)

        def forward(self, ids):
            return self.out(self.emb(ids) + self.norm_emb(ids))

    with pytest.raises(SiteError, match=r"'emb' \(Scaled\), a subclass of nn.Embedding with its own forward"):
        tspd.Decomposition(Net(), make_cfg([("emb", 2)]))
    with pytest.raises(SiteError, match="max_norm"):
        tspd.Decomposition(Net(), make_cfg([("norm_emb", 2)]))
    assert tspd.Decomposition(Net(), make_cfg([("out", 2)])).site_names == ["out"]


@pytest.mark.parametrize("sections", [{"train": {"fuse_head": True}}, {"output": {"positions": [-1]}}])
def test_labels_in_a_keyword_batch_are_not_passed_to_the_model(tokens, sections):
    """A batch from a language-model collator carries labels; the model's own loss is never used
    (and on passes stopped before the head it would get hidden states)."""
    from tspd.losses import compute_losses
    from tspd.seeding import generator

    dec = tspd.Decomposition(make_gpt2(0), make_cfg([("transformer.h.*.mlp.c_fc", 4)], **sections))
    plain = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
    _, with_labels, _ = compute_losses(dec, {**plain, "labels": tokens}, 0, generator(0, 0, 202))
    _, without, _ = compute_losses(dec, plain, 0, generator(0, 0, 202))
    assert with_labels == without


PADDING_CASES = [
    {"ci": {"kind": "attention"}},
    {"ci": {"kind": "shared_mlp"}, "train": {"compile": False}},
    {"ci": {"kind": "attention"}, "train": {"fuse_head": True}},
    {"ci": {"kind": "vector_mlp"}, "output": {"positions": [-1, -2]}},
]


@pytest.mark.parametrize("sections", PADDING_CASES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_positions_are_left_out_of_every_loss(tokens, sections, side):
    """What stands at padded positions changes no loss term, no gradient and no metric: the
    divergences and minimality average over the real positions, the attention CI does not attend
    to padding. (Before: every term averaged over the padding too, and the attention CI read it.)"""
    from tspd.analysis.metrics import evaluate
    from tspd.losses import compute_losses, l0
    from tspd.seeding import generator

    losses = {"faithfulness": 1.0, "stochastic_recon": 1.0, "stochastic_recon_layerwise": 1.0,
              "stochastic_recon_subset": 1.0, "ci_masked_recon": 1.0, "adversarial_recon": 1.0,
              "importance_minimality": 0.1}
    dec = tspd.Decomposition(make_gpt2(0), make_cfg([("transformer.h.*.mlp.c_fc", 4), ("transformer.h.1.attn.c_attn", 3)],
                                                    losses=losses, **sections))
    mask = torch.ones_like(tokens)
    pad = slice(0, 4) if side == "left" else slice(6, None)
    mask[0, pad] = 0
    mask[2, pad] = 0
    other = tokens.clone()
    other[0, pad], other[2, pad] = 7, 99  # different pad tokens

    def step(ids):
        dec.zero_grad()
        total, terms, ci = compute_losses(dec, {"input_ids": ids, "attention_mask": mask}, 0, generator(0, 0, 202))
        total.backward()
        grads = {n: p.grad.clone() for n, p in dec.named_parameters() if p.grad is not None}
        return terms, grads, {s: float(l0(g, 0.1, mask.bool())) for s, g in ci.items()}

    (terms_a, grads_a, l0_a), (terms_b, grads_b, l0_b) = step(tokens), step(other)
    assert terms_a.keys() == set(losses)
    for t in terms_a:
        assert terms_a[t] == pytest.approx(terms_b[t], rel=1e-5, abs=1e-7), t
    assert terms_a["importance_minimality"] > 0 and terms_a["stochastic_recon"] > 0
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=1e-4, atol=1e-6, msg=n)
    assert l0_a == pytest.approx(l0_b)
    ev_a, ev_b = (evaluate(dec, [{"input_ids": ids, "attention_mask": mask}]) for ids in (tokens, other))
    for k in ("l0_total", "ci_masked_recon", "stochastic_recon", "ones_recon", "alive_total"):
        assert ev_a[k] == pytest.approx(ev_b[k], rel=1e-5, abs=1e-7), k


def test_left_padding_leaves_the_attention_ci_of_real_tokens_as_without_padding(tokens):
    """The attention CI's position embedding is looked up by each token's place among the real
    tokens (before: by column, so left padding shifted every real token's CI)."""
    dec = tspd.Decomposition(make_gpt2(0), make_cfg([("transformer.h.0.mlp.c_fc", 4)], ci={"kind": "attention"}))
    with torch.no_grad():
        for fn in dec.ci_fns.values():
            fn.net.pos.normal_(0, 1.0)
            fn.net.rel_bias.normal_(0, 1.0)
    seq = tokens[0, :6]
    alone = dec.causal_importance(seq[None])["transformer.h.0.mlp.c_fc"][0]
    for pads in (1, 4):
        ids = torch.cat([torch.full((pads,), 5), seq])[None]
        mask = torch.cat([torch.zeros(pads, dtype=torch.long), torch.ones(6, dtype=torch.long)])[None]
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        padded = dec.causal_importance({"input_ids": ids, "attention_mask": mask, "position_ids": pos})
        torch.testing.assert_close(padded["transformer.h.0.mlp.c_fc"][0, pads:], alone, rtol=1e-4, atol=1e-5)


def test_a_mask_that_is_not_2d_is_warned_about(tokens):
    from tspd.losses import compute_losses
    from tspd.seeding import generator

    dec = tspd.Decomposition(make_gpt2(0), make_cfg([("transformer.h.0.mlp.c_fc", 4)]))
    mask = torch.ones(tokens.shape[0], 1, tokens.shape[1], tokens.shape[1])
    with pytest.warns(UserWarning, match="its attention_mask is 4-D"):
        compute_losses(dec, {"input_ids": tokens, "attention_mask": mask}, 0, generator(0, 0, 202))


@pytest.mark.parametrize("side", ["left", "right"])
def test_consolidation_ignores_what_stands_at_padded_positions(tokens, side):
    from tspd.consolidate import consolidate

    cfg = make_cfg([("transformer.h.*.mlp.c_fc", 6)], ci={"kind": "vector_mlp"})
    mask = torch.ones_like(tokens)
    pad = slice(0, 4) if side == "left" else slice(6, None)
    mask[0, pad] = 0
    results = []
    for fill in (3, 77):
        torch.manual_seed(0)
        dec = tspd.Decomposition(make_gpt2(0), cfg)
        with torch.no_grad():  # pieces that fire together, so that there is something to merge
            for fn in dec.ci_fns.values():
                fn.net.b2.fill_(0.5)
        ids = tokens.clone()
        ids[0, pad] = fill
        changes = consolidate(dec, [{"input_ids": ids, "attention_mask": mask}], max_increase=1e-3, prune=1e-3, final=True)
        results.append((changes, {k: v.clone() for k, v in dec.state_dict().items()}))
    assert results[0][0] == results[1][0]
    for k, v in results[0][1].items():
        torch.testing.assert_close(v, results[1][1][k], msg=k)


def test_an_unpadded_attention_mask_changes_nothing(tokens):
    """A batch whose attention_mask is all 1 takes the usual route: the same terms as the bare ids."""
    from tspd.losses import compute_losses
    from tspd.seeding import generator

    dec = tspd.Decomposition(make_gpt2(0), make_cfg([("transformer.h.*.mlp.c_fc", 4)], ci={"kind": "attention"}))
    _, bare, _ = compute_losses(dec, tokens, 0, generator(0, 0, 202))
    _, masked, _ = compute_losses(dec, {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}, 0, generator(0, 0, 202))
    assert bare == masked


def test_padding_weights_average_over_the_real_positions():
    """The weighted mean is the plain mean over the kept rows, for the KL and for the MSE."""
    from tspd.losses import Reference

    g = torch.Generator().manual_seed(0)
    target, out = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    keep = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    kl = Reference(target, "kl", keep=keep).divergence(out)
    per_row = (target.softmax(-1) * (target.log_softmax(-1) - out.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(kl, per_row[keep].mean())
    mse = Reference(target, "mse", keep=keep).divergence(out)
    torch.testing.assert_close(mse, (out - target).pow(2)[keep].mean())
    # output.positions count among each row's real tokens: 0 is row 0's column 2 (left padding), and
    # with right padding -1 is each row's last real token; a row too short for a position drops out
    first = Reference(target, "kl", positions=[0], keep=keep).divergence(out)
    torch.testing.assert_close(first, (per_row[0, 2] + per_row[1, 0]) / 2)
    right = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    last = Reference(target, "kl", positions=[-1], keep=right).divergence(out)
    torch.testing.assert_close(last, (per_row[0, 1] + per_row[1, 3]) / 2)
    third = Reference(target, "kl", positions=[2], keep=right).divergence(out)
    torch.testing.assert_close(third, per_row[1, 2])
    with pytest.raises(ValueError, match="no real position is left to average over"):
        Reference(target, "kl", keep=torch.zeros_like(keep))


def test_a_mask_that_does_not_fit_the_output_is_warned_about():
    from tspd.losses import compute_losses
    from tspd.seeding import generator

    class Pooled(nn.Module):  # one output per example: padding cannot be weighted in the divergence
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(10, 4), nn.Linear(4, 10)

        def forward(self, input_ids, attention_mask):
            return self.out((self.emb(input_ids) * attention_mask[..., None]).sum(1))

    dec = tspd.Decomposition(Pooled(), make_cfg([("out", 3)]))
    ids = torch.randint(0, 10, (2, 4))
    mask = torch.ones_like(ids)
    mask[0, 2:] = 0
    with pytest.warns(UserWarning, match="does not fit the output"):
        compute_losses(dec, {"input_ids": ids, "attention_mask": mask}, 0, generator(0, 0, 202))


def test_keyword_batch_flags_reach_the_model_through_sharding_and_devices():
    from tspd import distributed

    ids = torch.arange(12).view(4, 3)
    batch = {"input_ids": ids, "position_ids": torch.arange(3)[None], "use_cache": False}
    moved = distributed.to_device(batch, torch.device("cpu"))
    assert moved["use_cache"] is False and torch.equal(moved["input_ids"], ids)
    part = distributed.shard(batch, distributed.World(rank=1, size=2))
    assert torch.equal(part["input_ids"], ids[2:]) and part["position_ids"].shape == (1, 3) and part["use_cache"] is False
