"""Causal-importance functions and the leaky hard sigmoids (SPEC §3)."""

from __future__ import annotations

import pytest
import torch

import tspd
from conftest import TwoLayer, make_cfg, make_gpt2
from tspd.config import CIConfig
from tspd.importance import CIFunction, lower_leaky_hard_sigmoid, upper_leaky_hard_sigmoid


# ---- 5. sigmoids ------------------------------------------------------------------------------
Z = torch.tensor([-2.0, -0.5, 0.0, 1e-3, 0.3, 0.999, 1.0, 1.001, 1.5, 3.0], dtype=torch.float64)


def _lower_grad(z: torch.Tensor, upstream: torch.Tensor, leak: float = 0.01) -> torch.Tensor:
    z = z.clone().requires_grad_(True)
    y = lower_leaky_hard_sigmoid(z, leak)
    y.backward(upstream)
    return z.grad


def test_lower_leaky_forward_is_clamp():
    z = torch.linspace(-3, 3, 61)
    torch.testing.assert_close(lower_leaky_hard_sigmoid(z), z.clamp(0, 1), rtol=0, atol=0)


def test_lower_leaky_backward_positive_upstream():
    """Upstream grad > 0 (descent would lower z): passes on (0, 1], zero elsewhere."""
    g = _lower_grad(Z, torch.full_like(Z, 2.0))
    expected = torch.where((Z > 0) & (Z <= 1), 2.0, 0.0).to(Z.dtype)
    torch.testing.assert_close(g, expected, rtol=0, atol=0)


def test_lower_leaky_backward_negative_upstream():
    """Upstream grad < 0 (descent would raise z): unchanged on (0, 1], leak * grad for z <= 0, zero above 1."""
    g = _lower_grad(Z, torch.full_like(Z, -3.0), leak=0.01)
    expected = torch.where((Z > 0) & (Z <= 1), -3.0, torch.where(Z <= 0, -0.03, 0.0)).to(Z.dtype)
    torch.testing.assert_close(g, expected, rtol=0, atol=1e-7)


def test_lower_leaky_backward_mixed_signs_and_leak():
    z = torch.tensor([-1.0, -1.0, 0.5, 0.5, 2.0, 2.0], dtype=torch.float64)
    up = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    g = _lower_grad(z, up, leak=0.25)
    torch.testing.assert_close(g, torch.tensor([0.0, -0.25, 1.0, -1.0, 0.0, 0.0], dtype=torch.float64))


def test_lower_leaky_gradcheck_inside():
    z = torch.tensor([0.1, 0.4, 0.8], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: lower_leaky_hard_sigmoid(t, 0.01), (z,))


def test_upper_leaky_forward_values():
    y = upper_leaky_hard_sigmoid(Z, 0.01)
    expected = torch.tensor([0.0, 0.0, 0.0, 1e-3, 0.3, 0.999, 1.0, 1.00001, 1.005, 1.02], dtype=torch.float64)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    grid = torch.linspace(-2, 4, 121, dtype=torch.float64)
    y = upper_leaky_hard_sigmoid(grid, 0.1)
    ref = torch.where(grid < 0, 0.0, torch.where(grid <= 1, grid, 1 + 0.1 * (grid - 1)))
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)


def test_upper_leaky_gradient():
    z = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    upper_leaky_hard_sigmoid(z, 0.01).sum().backward()
    torch.testing.assert_close(z.grad, torch.tensor([0.0, 1.0, 0.01], dtype=torch.float64))


def test_decomposition_uses_config_leak():
    dec = tspd.Decomposition(TwoLayer(), make_cfg([("linear1", 3)], ci={"leak": 0.2}))
    z = {"linear1": torch.tensor([[-1.0, 0.5, 2.0]], requires_grad=True)}
    lower, upper = dec.ci_from_logits(z)
    torch.testing.assert_close(upper["linear1"].detach(), torch.tensor([[0.0, 0.5, 1.2]]))
    lower["linear1"].sum().mul(-1).backward()
    torch.testing.assert_close(z["linear1"].grad, torch.tensor([[-0.2, -1.0, 0.0]]))


# ---- CI kinds -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "vector_mlp", "shared_mlp", "attention"])
def test_ci_kinds_shapes_and_range(kind):
    torch.manual_seed(0)
    target = TwoLayer(6, 4, 6)
    dec = tspd.Decomposition(target, make_cfg([("linear*", 5)], ci={"kind": kind, "attention": {"max_len": 16}}))
    x = torch.randn(3, 7, 6)
    ci = dec.causal_importance(x)
    assert set(ci) == {"linear1", "linear2"}
    for g in ci.values():
        assert g.shape == (3, 7, 5)
        assert float(g.min()) >= 0.0 and float(g.max()) <= 1.0
    _, inputs = dec.run_target(x)
    z = dec.ci_logits(inputs)
    assert z["linear1"].shape == (3, 7, 5)
    # CI is the clamp of the logits
    torch.testing.assert_close(ci["linear1"], z["linear1"].detach().clamp(0, 1))


def test_mlp_kind_reads_only_inner_activations():
    """mlp CI: one scalar MLP per subcomponent on h_c = v_c . x, so z_c depends on h_c alone."""
    fn = CIFunction(CIConfig(kind="mlp", hidden=[8]), d_in=4, C=4)
    h = torch.randn(5, 4)
    z = fn(h)
    h2 = h.clone()
    h2[:, 2] += 1.0
    z2 = fn(h2)
    assert torch.equal(z[:, [0, 1, 3]], z2[:, [0, 1, 3]])
    assert not torch.allclose(z[:, 2], z2[:, 2])


def test_attention_ci_rejects_inputs_without_positions():
    dec = tspd.Decomposition(TwoLayer(), make_cfg([("linear1", 3)], ci={"kind": "attention"}))
    with pytest.raises(ValueError, match="positions"):
        dec.causal_importance(torch.randn(4, 6))


def test_attention_ci_rejects_too_long_sequences():
    dec = tspd.Decomposition(TwoLayer(), make_cfg([("linear1", 3)], ci={"kind": "attention", "attention": {"max_len": 4}}))
    with pytest.raises(ValueError, match="max_len"):
        dec.causal_importance(torch.randn(2, 5, 6))


# ---- 7. sequence-aware CI is causal --------------------------------------------------------------
def _randomise(dec):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in dec.ci_fns.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("head, pos_emb", [("vector_mlp", True), ("shared_mlp", True), ("vector_mlp", False)])
def test_attention_ci_is_causal(head, pos_emb):
    torch.manual_seed(0)
    target = TwoLayer(6, 4, 6)  # acts per position on (B, T, d): site inputs carry no mixing
    att = {"max_len": 12, "head": head, "pos_emb": pos_emb}
    cfg = make_cfg([("linear*", 5)], ci={"kind": "attention", "attention": att})
    dec = tspd.Decomposition(target, cfg)
    _randomise(dec)  # non-zero position embedding and relative biases
    x = torch.randn(2, 9, 6)
    n = 4
    x2 = x.clone()
    x2[:, n:] = torch.randn(2, 9 - n, 6)
    z = dec.ci_logits(dec.run_target(x)[1])
    z2 = dec.ci_logits(dec.run_target(x2)[1])
    for s in dec.site_names:
        torch.testing.assert_close(z[s][:, :n], z2[s][:, :n], rtol=0, atol=1e-6)
        assert (z[s][:, n] - z2[s][:, n]).abs().max() > 1e-3
    # and it does read earlier positions: change position 0 only, position 5 moves too
    x3 = x.clone()
    x3[:, 0] += 1.0
    z3 = dec.ci_logits(dec.run_target(x3)[1])
    assert (z["linear1"][:, 5] - z3["linear1"][:, 5]).abs().max() > 1e-4


def test_attention_ci_is_causal_on_gpt2(tokens):
    model = make_gpt2(0)
    cfg = make_cfg(
        [("transformer.h.*.mlp.c_fc", 6), ("transformer.wte", 6)],
        ci={"kind": "attention", "attention": {"max_len": 32, "d_attn": 8}},
    )
    dec = tspd.Decomposition(model, cfg)
    _randomise(dec)
    t2 = tokens.clone()
    t2[:, 6:] = (t2[:, 6:] + 17) % 100
    with torch.no_grad():
        z = dec.ci_logits(dec.run_target(tokens)[1])
        z2 = dec.ci_logits(dec.run_target(t2)[1])
    for s in dec.site_names:
        torch.testing.assert_close(z[s][:, :6], z2[s][:, :6], rtol=0, atol=1e-5)
        assert (z[s][:, 6] - z2[s][:, 6]).abs().max() > 1e-4


def test_vector_mlp_ci_is_per_position():
    """Non-attention kinds see each position on its own (the SPEC's motivation for the attention kind)."""
    torch.manual_seed(0)
    dec = tspd.Decomposition(TwoLayer(), make_cfg([("linear1", 4)], ci={"kind": "vector_mlp"}))
    x = torch.randn(2, 5, 6)
    x2 = x.clone()
    x2[:, 0] = torch.randn(2, 6)
    z = dec.ci_logits(dec.run_target(x)[1])["linear1"]
    z2 = dec.ci_logits(dec.run_target(x2)[1])["linear1"]
    torch.testing.assert_close(z[:, 1:], z2[:, 1:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("chunk_rows", [None, 5])
def test_vector_mlp_recomputing_backward_matches_autograd(chunk_rows, keep):
    """PerComponentMLP's backward, in one chunk or in chunks of rows (5 rows: 18 rows in 4 chunks,
    the last one short), reusing the forward's hidden layer (keep) or recomputing it from the input."""
    import torch.nn.functional as F

    from tspd.importance import PerComponentMLP

    torch.manual_seed(0)
    m = PerComponentMLP(7, 5, 4).double()
    m.KEEP_BYTES = 2**30 if keep else 0
    if chunk_rows is not None:
        m.CHUNK_BYTES = chunk_rows * 5 * 4 * 4  # rows x C x hidden x 4 bytes
    for p in m.parameters():
        p.data.normal_()
    x = torch.randn(3, 6, 7, dtype=torch.double, requires_grad=True)
    plain = (F.gelu(x @ m.w1 + m.b1).unflatten(-1, (5, 4)) * m.w2).sum(-1) + m.b2
    out = m(x)
    torch.testing.assert_close(out, plain)
    g = torch.randn_like(out)
    params = [x, *m.parameters()]
    for a, b in zip(torch.autograd.grad(out, params, g, retain_graph=True), torch.autograd.grad(plain, params, g, retain_graph=True)):
        torch.testing.assert_close(a, b)
    # A second backward through the same graph (the kept values are released after the first: it recomputes).
    for a, b in zip(torch.autograd.grad(out, params, 2 * g), torch.autograd.grad(plain, params, 2 * g)):
        torch.testing.assert_close(a, b)


def test_vector_mlp_chunks_under_bf16_autocast_match_one_chunk():
    """Under bf16 autocast the chunked recomputation gives the one-chunk gradients (to bf16 precision):
    w1's gradient is summed over chunks in fp32."""
    from tspd.importance import PerComponentMLP

    torch.manual_seed(0)
    m = PerComponentMLP(8, 6, 4)
    x = torch.randn(64, 8)
    grads = []
    for chunk_rows in (64, 7):
        m.CHUNK_BYTES = chunk_rows * 6 * 4 * 4
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = m(x)
        (z.float() ** 2).sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_sigmoid_gradients_as_elementwise_ops_equal_the_custom_backwards():
    # The compiled CI chain (train.compile) uses these where-forms; the boundaries 0 and 1 and the
    # signs of the incoming gradient decide which side each lands on.
    from tspd.importance import lower_leaky_hard_sigmoid_grad, upper_leaky_hard_sigmoid_grad

    z = torch.tensor([-2.0, -1e-30, -0.0, 0.0, 1e-30, 0.3, 0.5, 1.0 - 1e-7, 1.0, 1.0 + 1e-7, 3.0])
    for sign in (1.0, -1.0):
        g = sign * torch.linspace(0.5, 1.5, len(z))
        for fn, grad_fn in ((lower_leaky_hard_sigmoid, lower_leaky_hard_sigmoid_grad), (upper_leaky_hard_sigmoid, upper_leaky_hard_sigmoid_grad)):
            zz = z.clone().requires_grad_(True)
            (expected,) = torch.autograd.grad(fn(zz, 0.01), zz, g)
            assert torch.equal(grad_fn(g, z, 0.01), expected), (fn.__name__, sign)
