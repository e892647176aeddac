"""The fast paths of an SPD step compute what the plain ones do: block replay, fused modules, the
custom minimality gradient, the 16-bit uniform sampler, bf16 autocast; and the benchmark harness runs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_cfg, make_gpt2, needs_compiler, set_exact_factors

import tspd
from tspd.losses import compute_losses, importance_minimality, recon_passes
from tspd.masks import Pass, uniform
from tspd.targets.induction import InductionTransformer


def _induction_dec(delta: bool) -> tspd.Decomposition:
    torch.manual_seed(0)
    target = InductionTransformer(20, 8, 2, 12)
    cfg = make_cfg(
        [("blocks.*.attn.q_proj", 4), ("blocks.*.attn.v_proj", 4)],
        ci={"kind": "shared_mlp", "hidden": [8]},
        masks={"delta_component": delta},
    )
    return tspd.Decomposition(target, cfg)


def _stacked_vs_single(dec, tokens, calls: list, rtol: float = 1e-5) -> tuple[list, list]:
    """Layerwise + stochastic passes run stacked (with replay) and one by one: asserts equal outputs
    and gradients; returns what `calls` recorded during each run's passes (stacked, single)."""

    def run(stack):
        dec.zero_grad(set_to_none=True)
        _, inputs = dec.run_target(tokens)
        ci, _ = dec.ci_from_logits(dec.ci_logits(inputs))
        gen = torch.Generator().manual_seed(2)
        passes = recon_passes("stochastic_recon_layerwise", dec, ci, gen) + recon_passes("stochastic_recon", dec, ci, gen)
        calls.clear()
        outs = dec.run_passes(tokens, passes, stack=stack)
        seen = list(calls)
        sum(o.pow(2).mean() for o in outs).backward()
        return outs, {n: p.grad.clone() for n, p in dec.named_parameters() if p.grad is not None}, seen

    stacked, g_stacked, calls_stacked = run(True)
    single, g_single, calls_single = run(False)
    for a, b in zip(stacked, single):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol)
    assert g_stacked.keys() == g_single.keys() and len(g_single) >= 6
    for n in g_single:
        torch.testing.assert_close(g_stacked[n], g_single[n], rtol=10 * rtol, atol=rtol / 10)
    return calls_stacked, calls_single


@pytest.mark.parametrize("delta", [False, True])
def test_block_replay_matches_full_passes_and_skips_block_0(delta):
    dec = _induction_dec(delta)
    tokens = torch.randint(0, 20, (5, 12), generator=torch.Generator().manual_seed(1))
    calls = []
    dec.target.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    calls_stacked, calls_single = _stacked_vs_single(dec, tokens, calls)
    assert len(calls_single) == 5  # every pass runs block 0
    assert len(calls_stacked) == 1  # one stacked forward for the passes routed in block 0; block 1's replay it


@pytest.mark.parametrize("arch,delta", [("gpt2", False), ("gpt2", True), ("llama", True)])
def test_child_replay_skips_the_attention_before_mlp_sites(arch, delta):
    """Passes whose first routed site sits in a block's MLP replay that block's attention (and
    layer norms) from the target run; outputs and gradients equal those of full passes."""
    torch.manual_seed(0)
    if arch == "gpt2":
        model, blocks, attn = make_gpt2(0), "transformer.h", "attn"
        sites = [("transformer.h.*.mlp.c_fc", 6), ("transformer.h.*.mlp.c_proj", 6)]
    else:
        from tspd.targets.huggingface import tiny_llama

        model, blocks, attn = tiny_llama(d_model=32, d_ff=64, vocab_size=100), "model.layers", "self_attn"
        sites = [("model.layers.*.mlp.up_proj", 6), ("model.layers.*.mlp.down_proj", 6)]
    dec = tspd.Decomposition(model, make_cfg(sites, masks={"delta_component": delta}))
    tokens = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(1))
    attn_calls = []
    for i, block in enumerate(model.get_submodule(blocks)):
        getattr(block, attn).register_forward_hook(lambda *a, i=i: attn_calls.append(i))
    calls_stacked, calls_single = _stacked_vs_single(dec, tokens, attn_calls)
    assert sorted(calls_single) == [0] * 5 + [1] * 5  # every pass runs both attentions
    assert calls_stacked == [1]  # only block 0's passes run block 1's attention; none runs its own block's


@pytest.mark.parametrize("ci_kind", ["mlp", "shared_mlp"])
def test_a_pass_first_masked_segment_takes_its_input_without_gradient(ci_kind):
    """Stacked behind the stochastic pass, a layerwise pass at c_proj reaches c_proj with target rows
    only: its segment forms no x V of its own with an input gradient -- it reads the CI's x V when
    the CI function reads inner activations ('mlp'), else x V formed from the recorded input,
    detached ('shared_mlp') -- while the stochastic pass's segment forms x V with its input's
    gradient; every gradient equals that of the passes run one by one (_stacked_vs_single)."""
    torch.manual_seed(0)
    model = make_gpt2(0)
    sites = [("transformer.h.*.mlp.c_fc", 6), ("transformer.h.*.mlp.c_proj", 6)]
    cfg = make_cfg(sites, masks={"delta_component": True}, ci={"kind": ci_kind, "hidden": [4]})
    dec = tspd.Decomposition(model, cfg)
    tokens = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(1))
    comps = dec.component("transformer.h.0.mlp.c_proj")
    seen = []
    inner = comps.inner
    comps.inner = lambda x, onednn=False: (seen.append(x.requires_grad), inner(x, onednn))[1]
    calls_stacked, calls_single = _stacked_vs_single(dec, tokens, seen)
    # Stacked group of block 0: [layerwise c_fc.0, layerwise c_proj.0, stochastic]; c_proj.0 is masked
    # in the last two. The layerwise pass's segment comes first and has no masked site upstream.
    assert calls_stacked == ([True] if ci_kind == "mlp" else [False, True])
    assert calls_single == [False, True]  # one at a time, each pass forms its own (the layerwise one from target rows)


def test_clean_segments_of_one_site_share_x_v_and_skip_x_w():
    """The induction model hands q_proj and k_proj one tensor: stacked, the stochastic pass (started
    at q_proj) and the layerwise pass at k_proj both reach k_proj with target rows, so k_proj forms
    x V once (from the recorded input) and no x W^T at all (the delta term reads the recorded
    output); outputs and gradients equal those of the passes one by one."""
    target = InductionTransformer(20, 8, 2, 12)
    cfg = make_cfg([("blocks.*.attn.q_proj", 4), ("blocks.*.attn.k_proj", 4)], ci={"kind": "shared_mlp", "hidden": [8]}, masks={"delta_component": True})
    dec = tspd.Decomposition(target, cfg)
    tokens = torch.randint(0, 20, (5, 12), generator=torch.Generator().manual_seed(1))
    site = dec._stand_ins["blocks.0.attn.k_proj"]
    seen = []
    comps = dec.component("blocks.0.attn.k_proj")
    inner, target_linear = comps.inner, site._target_linear
    comps.inner = lambda x, onednn=False: (seen.append(("xV", x.shape[0], x.requires_grad)), inner(x, onednn))[1]
    site._target_linear = lambda x: (seen.append(("xW", x.shape[0], x.requires_grad)), target_linear(x))[1]
    calls_stacked, calls_single = _stacked_vs_single(dec, tokens, seen)
    assert calls_stacked == [("xV", 5, False)]
    assert sorted(calls_single) == [("xV", 5, False), ("xV", 5, False), ("xW", 5, False), ("xW", 5, False)]


class _SharedTwice(torch.nn.Module):
    """One linear layer applied twice (weights shared in a loop): its record holds the last call."""

    def __init__(self):
        super().__init__()
        self.inp, self.shared, self.out = torch.nn.Linear(6, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.shared(torch.relu(self.inp(x))))
        return self.out(torch.relu(self.shared(h)))


class _InPlaceAfterSites(torch.nn.Module):
    """A site's input scaled in place after it ran (before a second site reads it), and a site's
    output rectified in place: the recorded tensors change after the recording."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(6, 8), torch.nn.Linear(6, 8), torch.nn.Linear(8, 5)

    def forward(self, x):
        h = x * 1.0
        ya = self.a(h)
        h.mul_(2.0)
        yb = self.b(h)
        ya.relu_()
        return self.c(ya + yb)


class _EmbedThenLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lin = torch.nn.Embedding(11, 6), torch.nn.Linear(6, 5)

    def forward(self, t):
        return self.lin(torch.tanh(self.emb(t)))


def _off_target_dec(model, sites) -> tspd.Decomposition:
    dec = tspd.Decomposition(model, make_cfg(sites, masks={"delta_component": True}, ci={"kind": "mlp", "hidden": [4]}))
    for n in dec.site_names:
        with torch.no_grad():  # factors away from the target weight, so a wrong x V or x W^T shows
            dec.component(n).V.mul_(1.5)
    return dec


@pytest.mark.parametrize("net", ["shared layer applied twice", "embedding site"])
def test_stacked_passes_with_reused_target_values_match_single_passes(net):
    """Where a clean segment could be handed the wrong target values (a site called twice: its
    record holds the last call) or where the reuse takes another route (an embedding site's
    lookups), stacked passes still equal passes one by one, gradients included."""
    torch.manual_seed(0)
    if net == "embedding site":
        dec, batch = _off_target_dec(_EmbedThenLinear(), [("emb", 4), ("lin", 3)]), torch.randint(0, 11, (4, 3))
    else:
        dec, batch = _off_target_dec(_SharedTwice(), [("inp", 3), ("shared", 3), ("out", 3)]), torch.randn(4, 3, 6)
    _stacked_vs_single(dec, batch, [])


def test_stacked_passes_see_target_values_changed_in_place_after_recording():
    """A site's recorded input scaled in place after it ran, and a site's output rectified in
    place: without gradients (as analysis runs passes; with them autograd itself refuses the input
    change) stacked passes equal passes one by one -- the changed recordings are not reused."""
    torch.manual_seed(0)
    dec = _off_target_dec(_InPlaceAfterSites(), [("a", 3), ("b", 3), ("c", 3)])
    x = torch.randn(4, 3, 6)
    with torch.no_grad():
        _, inputs = dec.run_target(x)
        ci, _ = dec.ci_from_logits(dec.ci_logits(inputs))
        passes = recon_passes("stochastic_recon_layerwise", dec, ci, torch.Generator().manual_seed(2))
        stacked = dec.run_passes(x, passes)
        dec.run_target(x)
        single = dec.run_passes(x, passes, stack=False)
    for a, b in zip(stacked, single):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_passes_twice_after_one_target_run():
    """Passes run and differentiated twice after one run_target (no optimiser step between) give the
    same gradients both times: nothing from the first round's freed graph is offered again."""
    torch.manual_seed(0)
    dec = _induction_dec(True)
    tokens = torch.randint(0, 20, (5, 12), generator=torch.Generator().manual_seed(1))
    _, inputs = dec.run_target(tokens)
    ci, _ = dec.ci_from_logits(dec.ci_logits(inputs))
    ci = {s: g.detach() for s, g in ci.items()}
    passes = recon_passes("stochastic_recon_layerwise", dec, ci, torch.Generator().manual_seed(2))
    grads = []
    for _ in range(2):
        dec.zero_grad(set_to_none=True)
        sum(o.pow(2).mean() for o in dec.run_passes(tokens, passes)).backward()
        grads.append({n: p.grad.clone() for n, p in dec.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)


def test_stacked_passes_under_bf16_autocast_reuse_and_match_single_passes():
    """Under bf16 autocast the clean segments' reused x V and x W^T (bf16, as the segments' own
    products would be) give the outputs and gradients of passes one by one, to bf16 rounding."""
    torch.manual_seed(0)
    model = make_gpt2(0)
    sites = [("transformer.h.*.mlp.c_fc", 6), ("transformer.h.*.mlp.c_proj", 6)]
    cfg = make_cfg(sites, masks={"delta_component": True}, train={"autocast": "bf16"})
    dec = tspd.Decomposition(model, cfg)
    tokens = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _stacked_vs_single(dec, tokens, [], rtol=2e-2)


class _TwoInputNet(torch.nn.Module):
    """lin2(relu(lin0(x) + extra)): a second input, which may be the one requiring grad."""

    def __init__(self):
        super().__init__()
        self.lin0, self.lin2 = torch.nn.Linear(5, 4), torch.nn.Linear(4, 3)

    def forward(self, x, extra=None):
        h = self.lin0(x)
        if extra is not None:
            h = h + extra
        return self.lin2(torch.relu(h))


@pytest.mark.parametrize("leaf_at", ["batch tensor", "dict value x", "dict value extra"])
def test_inputs_that_require_grad_keep_their_gradient_through_a_layerwise_pass(leaf_at):
    """A caller differentiating with respect to the inputs (the batch tensor, or one value of a
    dict batch) gets the same gradient from stacked passes as from passes run one at a time, also
    through a pass whose only masked site is the last layer (nothing is detached)."""
    torch.manual_seed(0)
    net = _TwoInputNet()
    dec = tspd.Decomposition(net, make_cfg([("lin0", 3), ("lin2", 3)], masks={"delta_component": True}))
    x, e = torch.randn(6, 5), torch.randn(6, 4)
    ci = dec.causal_importance(x if leaf_at == "batch tensor" else {"x": x, "extra": e})
    passes = [Pass(masks={"lin2": ci["lin2"]}, delta={"lin2": torch.ones(6)}), dec.ones_pass(ci)]

    def grad(stack: bool) -> torch.Tensor:
        leaf = (e if leaf_at == "dict value extra" else x).clone().requires_grad_(True)
        batch = {"batch tensor": leaf, "dict value x": {"x": leaf, "extra": e}, "dict value extra": {"x": x, "extra": leaf}}[leaf_at]
        dec.run_target(batch)
        dec.run_passes(batch, passes, stack=stack)[0].sum().backward()
        assert leaf.grad is not None
        return leaf.grad

    stacked = grad(True)
    assert stacked.abs().sum() > 0
    torch.testing.assert_close(stacked, grad(False))


class _InPlaceBlock(torch.nn.Module):
    """h = pre(x); relu_(h); x + fc(h): `act` changes its input in place, so replaying it is unsound."""

    def __init__(self, d: int):
        super().__init__()
        self.pre, self.act, self.fc = torch.nn.Linear(d, d), torch.nn.ReLU(inplace=True), torch.nn.Linear(d, d)

    def forward(self, x):
        h = self.pre(x)
        self.act(h)
        return x + self.fc(h)


class _InPlaceNet(torch.nn.Module):
    def __init__(self, d: int = 6):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_InPlaceBlock(d) for _ in range(2)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_child_replay_refuses_children_that_change_tensors_in_place_and_works_in_inference_mode():
    torch.manual_seed(0)
    net = _InPlaceNet()
    dec = tspd.Decomposition(net, make_cfg([("blocks.*.fc", 3)], masks={"delta_component": True}))
    x = torch.randn(4, 6)
    ci = dec.causal_importance(x)
    p = dec.ones_pass(ci)
    dec.run_target(x)
    assert set(dec._child_calls[0]) == {"pre", "act", "fc"}
    assert all(out is None for _, _, out in dec._child_calls[0].values())  # none may be replayed
    outs = dec.run_passes(x, [p, p])
    torch.testing.assert_close(outs[0], net(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1], net(x), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        out, _ = dec.run_target(x)
        ci = dec.causal_importance(x)
    torch.testing.assert_close(out, net(x))
    assert set(ci) == {"blocks.0.fc", "blocks.1.fc"}


def test_unrouted_rows_give_target_output_and_zero_component_gradient():
    """Mixed routing uses d = 1, m - d = 0 on unrouted rows: exactly the target, no gradient to U, V."""
    dec = _induction_dec(True)
    tokens = torch.randint(0, 20, (4, 12), generator=torch.Generator().manual_seed(3))
    ci = dec.causal_importance(tokens)
    routed = {s: torch.zeros(4, 12, dtype=torch.bool) for s in ci}
    masks = {s: torch.rand_like(g) for s, g in ci.items()}
    out = dec.run_pass(tokens, Pass(masks=masks, routed=routed, delta={s: torch.rand(4, 12) for s in ci}))
    torch.testing.assert_close(out, dec.target(tokens), rtol=0, atol=1e-6)
    routed["blocks.1.attn.v_proj"][0] = True  # one example routed: gradient flows, from it alone
    out = dec.run_pass(tokens, Pass(masks=masks, routed=routed))
    out[1:].sum().backward()
    assert dec.component("blocks.1.attn.v_proj").U.grad.abs().max() == 0


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=needs_compiler)])
def test_fused_gelu_matches_gpt2_and_is_restored(compiled):
    model = make_gpt2(0)
    tokens = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    from tspd.decomposition import _compiled_tanh_gelu

    cfg = make_cfg([("transformer.h.*.mlp.c_fc", 4)], masks={"delta_component": True}, train={"compile": compiled})
    dec = tspd.Decomposition(model, cfg)
    kind = "CompiledTanhGELU" if compiled else "GELU"
    assert [type(r).__name__ for *_, r in dec._fused] == [kind, kind]

    def compiled_calls():
        info = _compiled_tanh_gelu.cache_info()
        return info.hits + info.misses

    before = compiled_calls()
    ci = dec.causal_importance(tokens)  # no gradients: torch's own kernel, compiler or not
    assert compiled_calls() == before
    out = dec.run_pass(tokens, dec.ones_pass(ci))
    assert compiled_calls() == before + (2 if compiled else 0)  # both layers' GELU in the pass
    torch.testing.assert_close(out, model(tokens).logits, rtol=0, atol=2e-5)
    assert type(model.transformer.h[0].mlp.act).__name__ == "NewGELUActivation"


def test_masked_site_output_keeps_the_autocast_dtype():
    """Under bf16 autocast a masked site's output has the dtype of the module's own output (bf16),
    and the all-ones pass stays within bf16 rounding of the target run."""
    from tspd.losses import autocast_for

    model = make_gpt2(0)
    tokens = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    cfg = make_cfg([("transformer.h.*.mlp.c_fc", 4)], masks={"delta_component": True}, train={"autocast": "bf16"})
    dec = tspd.Decomposition(model, cfg)
    seen = {}
    stand_in = dec._stand_ins["transformer.h.0.mlp.c_fc"]
    stand_in.register_forward_hook(lambda m, a, out: seen.setdefault(m.state.mode, out.dtype) and None)
    with torch.no_grad(), autocast_for(cfg, model):
        target_out, _ = dec.run_target(tokens)
        ci = dec.causal_importance(tokens)
        out = dec.run_pass(tokens, dec.ones_pass(ci))
    assert seen == {"record": torch.bfloat16, "masked": torch.bfloat16}
    torch.testing.assert_close(out.float(), target_out.float(), rtol=0, atol=0.05)


@needs_compiler
def test_compiled_tanh_gelu_value_and_gradient():
    from transformers.activations import NewGELUActivation

    from tspd.decomposition import CompiledTanhGELU

    x = (torch.randn(3, 7, 40, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_()
    g = torch.randn(3, 7, 40, generator=torch.Generator().manual_seed(1))
    (ref_grad,) = torch.autograd.grad(NewGELUActivation()(x), x, g)
    y = CompiledTanhGELU()(x)
    (grad,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(y, NewGELUActivation()(x), rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_sites_reproduce_module_outputs_with_all_ones_masks(arch):
    from tspd.targets.huggingface import tiny_gpt2, tiny_llama

    if arch == "gpt2":
        model = tiny_gpt2(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16)
        sites = [("transformer.h.*.mlp.c_fc", 140), ("transformer.h.*.attn.c_attn", 100)]
    else:
        model = tiny_llama(n_layer=2, d_model=32, d_ff=48, vocab_size=64)
        sites = [("model.layers.*.mlp.down_proj", 40), ("model.layers.*.self_attn.q_proj", 40)]
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    expected = model(tokens).logits
    dec = tspd.Decomposition(model, make_cfg(sites))
    for s in dec.site_names:
        set_exact_factors(dec, s)
    ci = dec.causal_importance(tokens)
    torch.testing.assert_close(dec.run_pass(tokens, dec.ones_pass(ci)), expected, rtol=1e-4, atol=1e-4)
    assert len(dec.site_names) == 4


def test_minimality_gradient_matches_autograd():
    g = torch.rand(3, 4, 5, dtype=torch.float64).mul(1.5).requires_grad_(True)
    p, eps = 0.7, 1e-6
    importance_minimality({"a": g}, p, eps).backward()
    reference = torch.autograd.grad((g + eps).pow(p).flatten(0, -2).mean(0).sum(), g)[0]
    torch.testing.assert_close(g.grad, reference, rtol=1e-10, atol=1e-12)


def test_uniform_is_uniform_on_the_open_interval_and_seeded():
    u = uniform((200_000,), torch.Generator().manual_seed(0), torch.float32, "cpu")
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert float((hist - 0.1).abs().max()) < 0.005
    again = uniform((200_000,), torch.Generator().manual_seed(0), torch.float32, "cpu")
    assert torch.equal(u, again)


def test_bf16_autocast_losses_agree_with_fp32():
    """Tolerance: every loss term within 1 % (relative, floor 1e-6) of its fp32 value. Measured on
    three seeds of this case (2-core AMD EPYC, torch 2.13): at most 4.6e-4 relative."""
    model = make_gpt2(0)
    tokens = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    terms = {}
    for autocast in (None, "bf16"):
        cfg = make_cfg(
            [("transformer.h.*.mlp.c_fc", 16), ("transformer.h.*.mlp.c_proj", 16)],
            ci={"kind": "shared_mlp", "hidden": [16]},
            masks={"delta_component": True},
            losses={"stochastic_recon_subset": 1.0, "ci_masked_recon": 1.0},
            train={"autocast": autocast},
        )
        dec = tspd.Decomposition(model, cfg)
        _, terms[autocast], _ = compute_losses(dec, tokens, 0, torch.Generator().manual_seed(5))
    assert terms[None].keys() == terms["bf16"].keys() and len(terms[None]) == 6
    for k, v in terms[None].items():
        assert abs(terms["bf16"][k] - v) <= max(0.01 * abs(v), 1e-6), (k, v, terms["bf16"][k])


def test_autocast_auto_picks_bf16_only_where_it_is_fast(monkeypatch):
    import tspd.losses as L

    assert L.resolve_autocast(None, "cpu") is None and L.resolve_autocast("bf16", "cpu") == "bf16"
    assert isinstance(L.cpu_has_fast_bf16(), bool)  # measured once per process (bf16 vs fp32 matmul)
    monkeypatch.setattr(L, "cpu_has_fast_bf16", lambda: False)
    assert L.resolve_autocast("auto", "cpu") is None
    monkeypatch.setattr(L, "cpu_has_fast_bf16", lambda: True)
    assert L.resolve_autocast("auto", "cpu") == "bf16"
    # ... and the loss context follows it: under 'auto' where bf16 is fast, a matmul on the model's device is bf16.
    cfg = make_cfg([("transformer.h.*.mlp.c_fc", 4)], train={"autocast": "auto"})
    with L.autocast_for(cfg, make_gpt2(0)):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    monkeypatch.setattr(L, "cpu_has_fast_bf16", lambda: False)
    with L.autocast_for(cfg, make_gpt2(0)):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_bench_phases_time_the_step_and_leave_it_unchanged():
    """--phases: each phase of the step timed by wrapping the calls compute_losses makes; the
    wrappers are gone afterwards and the steps are the training loop's (the same parameters as
    steps run without them)."""
    from tspd import bench
    from tspd import losses as L
    from tspd.seeding import generator
    from tspd.train import faithfulness_warmup, make_optimizer, optimizer_step

    target, batch, cfg = bench.CASES["tms-5-2"].build()
    runs = []
    for timed in (True, False):
        torch.manual_seed(cfg.seed)
        dec = tspd.Decomposition(target, cfg)
        opt = make_optimizer(dec)
        faithfulness_warmup(dec)
        if timed:
            phases = bench.time_phases(dec, opt, batch, steps=3, first_step=0)
            timed_dec, timed_opt = dec, opt
        else:
            for step in range(3):
                optimizer_step(dec, opt, compute_losses(dec, batch, step, generator(cfg.seed, step, 202))[0])
        runs.append([p.detach().clone() for p in dec.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert list(phases) == ["target run", "CI", "faithfulness", "masks", "masked passes", "divergences", "backward",
                            "optimizer", "other"]
    assert all(v >= 0 for k, v in phases.items() if k != "other") and phases["backward"] > 0 and phases["masked passes"] > 0
    assert "run_target" not in timed_dec.__dict__ and "step" not in timed_opt.__dict__  # the wrappers are gone
    # A divergence inside adversarial_recon counts to 'adversarial' only (no phase counted twice).
    cfg_adv = cfg.with_overrides(["losses.adversarial_recon=1", "losses.stochastic_recon=0", "losses.stochastic_recon_layerwise=0"])
    dec = tspd.Decomposition(target, cfg_adv)
    adv = bench.time_phases(dec, make_optimizer(dec), batch, steps=2, first_step=0)
    assert adv["adversarial"] > 0 and "divergences" not in adv
    assert L.recon_passes.__name__ == "recon_passes" and L.Reference.divergences.__name__ == "divergences"


def test_bench_case_runs_and_reports(tmp_path):
    from tspd.bench import run_all, run_case

    threads_before = torch.get_num_threads()
    row = run_case("tms-5-2", steps=2, warmup=1, threads=1)
    torch.set_num_threads(threads_before)  # run_case sets the thread count of the process it runs in
    assert row["ms_per_step"] > 0 and row["forward_passes"] == 4 and row["peak_rss_gb"] > 0
    # An SPD step multiplies more matrices than one plain forward + backward of the target.
    assert row["gflop_per_step"] > row["target_fwd_bwd_gflop"] > 0 and row["flop_ratio"] > 1
    report = run_all(["tms-5-2"], steps=2, warmup=1, threads=1, out=tmp_path / "b.json", progress=lambda _: None)
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved == report and saved["machine"]["torch"] == torch.__version__
    assert isinstance(saved["machine"]["cpu_flags"], list)  # AMX or not changes bf16 figures ~6x
    assert isinstance(saved["machine"]["cpu_fast_bf16"], bool)
    assert saved["results"][0]["case"] == "tms-5-2" and "error" not in saved["results"][0]
    with pytest.raises(KeyError, match="unknown benchmark case"):
        run_case("nope")
    assert row["device"] == "cpu" and saved["results"][0]["device"] == "cpu" and "cuda_peak_gb" not in row
    assert row["fp32_matmul"] in ("onednn", "torch") and row["autocast"] is None
    assert saved["reference_machine"]["cpu_flags"]  # the reference times' CPU, for comparing across machines
    # The host's speed around the case's subprocess, measured in this process (its thread count restored).
    probe = saved["results"][0]["host_probe"]
    assert all(probe[k]["matmul_gflop_per_s"] > 0 and probe[k]["stream_gb_per_s"] > 0 for k in ("before", "after"))
    assert torch.get_num_threads() == threads_before


def test_bench_recipe_cases_build_the_same_target_every_time():
    """A recipe case's untrained target is seeded: runs (and processes) time the same weights."""
    from tspd.bench import CASES

    a, b = CASES["induction-recipe"].build()[0], CASES["induction-recipe"].build()[0]
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_bench_skips_bf16_cases_where_bf16_is_slow_unless_asked(monkeypatch):
    """On a CPU whose bf16 matmuls are not fast (e.g. AVX2 only: emulated, ~70x slower than fp32),
    the bf16-autocast case reports why it is skipped instead of timing the emulation for minutes."""
    import tspd.bench as bench

    monkeypatch.setattr(bench, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.delenv(bench.SLOW_BF16_ENV, raising=False)
    threads_before = torch.get_num_threads()
    row = bench.run_case("tiny-gpt2-bf16", steps=1, warmup=0, threads=1)
    torch.set_num_threads(threads_before)
    assert "ms_per_step" not in row and "--slow-bf16" in row["skipped"] and "not faster than fp32" in row["skipped"]
    assert "skipped" in bench._format_row(row)
    assert bench.slow_bf16_skip(None, "cpu") is None and bench.slow_bf16_skip("bf16", "cuda") is None
    # Asked for (--slow-bf16 sets the variable for the case processes): timed; "0" does not ask.
    monkeypatch.setenv(bench.SLOW_BF16_ENV, "0")
    assert bench.slow_bf16_skip("bf16", "cpu")
    monkeypatch.setenv(bench.SLOW_BF16_ENV, "1")
    assert bench.slow_bf16_skip("bf16", "cpu") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_bench_on_cuda_without_a_gpu_says_so(capsys):
    from tspd.bench import run_case
    from tspd.cli import main

    with pytest.raises(RuntimeError, match="sees no CUDA GPU here; use --device cpu"):
        run_case("tms-5-2", steps=1, warmup=0, device="cuda")
    with pytest.raises(SystemExit):
        main(["bench", "--cases", "tms-5-2", "--device", "cuda"])
    assert "sees no CUDA GPU" in capsys.readouterr().err


def test_bench_repeats_report_the_median_run():
    from tspd.bench import combine_repeats, run_all

    rows = [{"case": "c", "ms_per_step": ms, "peak_rss_gb": rss} for ms, rss in [(30.0, 1.0), (10.0, 1.2), (20.0, 0.9)]]
    row = combine_repeats(rows)
    assert row["ms_per_step"] == 20.0 and row["ms_per_step_runs"] == [30.0, 10.0, 20.0]
    assert row["repeats"] == 3 and row["peak_rss_gb"] == 1.2  # the highest peak of the runs
    assert combine_repeats(rows[:2])["ms_per_step"] == 10.0  # even count: the lower middle run
    failed = combine_repeats([{"case": "c", "error": "boom"}, rows[0]])
    assert failed["ms_per_step"] == 30.0 and failed["failed_runs"] == 1
    assert combine_repeats([{"case": "c", "error": "boom"}])["error"] == "boom"
    lines = []
    report = run_all(["tms-5-2"], steps=1, warmup=1, threads=1, out=None, progress=lines.append, repeats=2)
    assert report["results"][0]["repeats"] == 2 and len(report["results"][0]["ms_per_step_runs"]) == 2
    assert len(report["results"][0]["host_probe_runs"]) == 2 and "GB/s" in lines[0]
    assert lines[0].startswith("[1/2] tms-5-2") and lines[2] == "median of the repeats:"
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        run_all(["tms-5-2"], steps=1, warmup=1, threads=1, out=None, repeats=0)


def test_bench_acceptance_judges_issue_6s_bars(monkeypatch):
    from tspd import bench
    from tspd.bench import REFERENCE_MACHINE, acceptance, format_acceptance

    def row(case, ms, rss=0.5, **kw):
        shown = {"target_fwd_bwd_ms": 1.0, "overhead_factor": 1.0, "forward_passes": 1, "gflop_per_step": 1.0,
                 "achieved_gflop_per_s": 1.0, "flop_ratio": 1.0}  # what _format_row prints
        return {**shown, "case": case, "ms_per_step": ms, "peak_rss_gb": rss, **kw}

    results = [
        row("induction-shared-64", 46.0),  # 92 / 46 = 2.00x: met
        row("induction-shared-256", 184.0),  # 367 / 184 = 1.99x: not met
        row("induction-vector-64", 100.0, rss=1.7),  # 2.71x but more memory than the reference's 1.6 GB
        {"case": "induction-qkvo-256", "error": "boom"},  # failed: not run
        row("tiny-gpt2-fp32", 80.0, overhead_factor=3.6, forward_passes=6),  # overhead exactly at the bar
        row("smollm2-layer", 100.0), row("smollm2-layer-naive", 290.0),  # 2.9x: not met
    ]
    acc = acceptance(results, {"cpu_flags": list(REFERENCE_MACHINE["cpu_flags"])})
    met = {ln["check"].split(" ")[0]: ln["met"] for ln in acc["lines"]}
    assert met["induction-shared-64"] is True and met["induction-shared-256"] is False
    assert met["induction-vector-64"] is False and met["induction-qkvo-256"] is None and met["tiny-gpt2-bf16"] is None
    assert met["smollm2-layer"] is False
    overhead = [ln for ln in acc["lines"] if "overhead" in ln["check"]]
    assert overhead[0]["met"] is True and "bar 3.60" in overhead[0]["measured"]
    assert acc["reference_cpu_flags"] is True
    assert not acceptance(results, {"cpu_flags": ["avx2"]})["reference_cpu_flags"]
    text = format_acceptance(acc)
    assert "[met]     induction-shared-64 >= 2x" in text and "[not run] induction-qkvo-256" in text
    assert "failed: boom" in text  # why a case did not run is kept
    skipped = acceptance([{"case": "tiny-gpt2-bf16", "skipped": "no fast bf16"}], {})
    assert [ln["measured"] for ln in skipped["lines"] if ln["check"].startswith("tiny-gpt2-bf16")] == [
        "tiny-gpt2-bf16 skipped: no fast bf16"]
    assert "[not run]" not in format_acceptance(acc, show_not_run=False)
    # run_all adds it to the report (and prints it) when a case it judges ran
    monkeypatch.setattr(bench, "_run_one", lambda name, *a, **k: next((r for r in results if r["case"] == name), row(name, 1.0)))
    monkeypatch.setattr(bench, "host_probe", lambda: {"matmul_gflop_per_s": 1.0, "stream_gb_per_s": 1.0})
    lines = []
    report = bench.run_all(["induction-shared-64"], steps=1, warmup=0, threads=1, out=None, progress=lines.append)
    assert report["acceptance"]["lines"][0]["met"] is True
    assert any(line.startswith("acceptance (issue 6)") for line in lines)
    assert "not run" not in "\n".join(lines)
    assert "acceptance" not in bench.run_all(["tms-5-2"], steps=1, warmup=0, threads=1, out=None, progress=lines.append)


def test_count_gflop_counts_a_known_matmul():
    from tspd.bench import count_gflop

    a, b = torch.randn(64, 32), torch.randn(32, 16)
    assert count_gflop(lambda: a @ b) == pytest.approx(2 * 64 * 32 * 16 / 1e9)


def test_cli_bench_rejects_an_unknown_case(capsys):
    from tspd.cli import main

    assert main(["bench", "--cases", "nope", "--steps", "1"]) == 2
    assert "unknown benchmark case 'nope'" in capsys.readouterr().err


def test_head_runs_on_the_output_positions_only_and_matches_the_full_head():
    """With output positions, the masked passes stop before the output head and the head runs on
    those positions only: the same loss terms and gradients as the head on every position."""
    torch.manual_seed(0)
    target = InductionTransformer(20, 8, 2, 12)
    cfg = make_cfg(
        [("blocks.*.attn.q_proj", 4), ("blocks.*.attn.v_proj", 4)],
        ci={"kind": "shared_mlp", "hidden": [8]},
        losses={"faithfulness": 1.0, "stochastic_recon": 1.0, "stochastic_recon_layerwise": 1.0, "ci_masked_recon": 0.5,
                "stochastic_recon_subset": 1.0, "importance_minimality": 0.1},
        output={"positions": [-1]},
    )
    dec = tspd.Decomposition(target, cfg)
    tokens = torch.randint(0, 20, (6, 12))
    rows = []
    apply_head = dec.apply_head
    dec.apply_head = lambda h: rows.append(h.shape[:-1]) or apply_head(h)
    results = []
    for head in (dec.output_head, None):
        dec.__dict__["_head"] = None if head is None else dec.__dict__["_head"]
        dec.zero_grad()
        total, terms, _ = compute_losses(dec, tokens, 0, torch.Generator().manual_seed(1))
        total.backward()
        results.append((terms, [p.grad.clone() for p in dec.parameters() if p.grad is not None]))
    # the head saw the last position only, once per group of stacked passes (rows: passes x batch)
    assert rows and all(r[0] % 6 == 0 and r[1] == 1 for r in rows)
    assert sum(r[0] for r in rows) // 6 == 1 + 4 + 1 + 1  # stochastic, layerwise (4 sites), CI-masked, subset
    (terms_sel, grads_sel), (terms_all, grads_all) = results
    assert terms_sel.keys() == terms_all.keys()
    for t in terms_sel:
        assert terms_sel[t] == pytest.approx(terms_all[t], rel=1e-5, abs=1e-9)
    assert len(grads_sel) == len(grads_all)
    for a, b in zip(grads_sel, grads_all):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_bench_case_that_prints_no_result_is_a_failed_row(monkeypatch):
    import subprocess

    from tspd import bench

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout="", stderr=""))
    row = bench._run_one("tms-5-2", steps=1, warmup=0, threads=1)
    assert row["case"] == "tms-5-2" and "no result line" in row["error"]


# ---- models whose structure the fast paths must notice (a review's findings, 2026-12-03) ------------
class _ResBlock(torch.nn.Module):
    def __init__(self, d: int = 6):
        super().__init__()
        self.fc = torch.nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class _ScaledAfterEachBlock(torch.nn.Module):
    """Changes each block's output in place after the block returned it."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_ResBlock() for _ in range(3)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
            x.mul_(0.5)
        return x


class _SideBranchLast(torch.nn.Module):
    """Block 2 runs before block 1 and feeds it."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_ResBlock() for _ in range(3)])

    def forward(self, x):
        x = self.blocks[0](x)
        return self.blocks[1](x + self.blocks[2](x))


class _FlatTokens(torch.nn.Module):
    """Flattens (B, T) tokens to (B*T, d) rows before its linear layers."""

    def __init__(self):
        super().__init__()
        self.emb, self.a, self.b = torch.nn.Embedding(11, 6), torch.nn.Linear(6, 6), torch.nn.Linear(6, 11)

    def forward(self, t):
        B, T = t.shape
        return self.b(torch.relu(self.a(self.emb(t).view(B * T, -1)))).view(B, T, -1)


@pytest.mark.parametrize("model,sites,delta", [
    (_ScaledAfterEachBlock, [("blocks.*.fc", 4)], True),
    (_SideBranchLast, [("blocks.*.fc", 3)], False),
    (_FlatTokens, [("a", 3), ("b", 3)], False),
])
def test_stacked_passes_match_single_passes_on_unusual_models(model, sites, delta):
    torch.manual_seed(0)
    dec = tspd.Decomposition(model(), make_cfg(sites, ci={"kind": "mlp", "hidden": [4]}, masks={"delta_component": delta}))
    batch = torch.randint(0, 11, (2, 5)) if model is _FlatTokens else torch.randn(4, 6)
    _stacked_vs_single(dec, batch, [])
    if model is _ScaledAfterEachBlock:  # every mask 1 with the delta on is the target, stacked too
        with torch.no_grad():
            _, inputs = dec.run_target(batch)
            ci, _ = dec.ci_from_logits(dec.ci_logits(inputs))
            outs = dec.run_passes(batch, [dec.ones_pass({s: ci[s]}) for s in dec.site_names])
            want = dec.target(batch.clone())
        for out in outs:
            torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


def test_sites_that_are_the_block_list_elements_run():
    """A ModuleList of nn.Linear whose elements are the sites: no block replay, no error."""

    class Deep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(6, 6) for _ in range(3)])

        def forward(self, x):
            for layer in self.layers:
                x = torch.relu(layer(x))
            return x

    torch.manual_seed(0)
    dec = tspd.Decomposition(Deep(), make_cfg([("layers.*", 3)], ci={"kind": "mlp", "hidden": [4]}))
    assert sorted(dec.causal_importance(torch.randn(4, 6))) == ["layers.0", "layers.1", "layers.2"]
    _stacked_vs_single(dec, torch.randn(4, 6), [])


def test_a_module_registered_under_two_paths_is_refused_as_a_site():
    from tspd.components import SiteError

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first = torch.nn.Linear(4, 4)
            self.second = self.first

        def forward(self, x):
            return self.second(torch.relu(self.first(x)))

    with pytest.raises(SiteError, match=r"'first' is registered under 2 paths \(first, second\)"):
        tspd.Decomposition(Tied(), make_cfg([("first", 2)]))


def test_the_compiled_ci_chain_does_not_recompile_per_shape():
    """dynamic=False compiled the CI chain's backward once per (rows, C): a run with sites of many
    C, or a sweep of batch sizes in one process, recompiled each (seconds) and past dynamo's limit
    of 8 silently ran eager for the rest of the process. Automatic dynamic shapes: at most three
    graphs (static, then rows dynamic, then both)."""
    from torch._dynamo.utils import counters

    from tspd.losses import _compiled_ci_min

    backward = _compiled_ci_min()[1]
    before = counters["stats"]["unique_graphs"]
    for rows, C in [(37, 5), (41, 5), (43, 7), (47, 11), (53, 13)]:
        z = torch.randn(rows, C)
        q = torch.rand(rows, C)
        g = backward(z, q, torch.ones_like(z), torch.tensor(1.0), 0.01, rows)
        assert g.shape == (rows, C) and torch.isfinite(g).all()
    assert counters["stats"]["unique_graphs"] - before <= 3
