"""train.fuse_head: the masked passes stop before the output head and the loss runs the head with
the KL over chunks of rows. Same losses and gradients as the unfused path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tspd
from conftest import assert_same_step, make_cfg, make_gpt2
from tspd.losses import Reference, compute_losses, fuse_head


def _step(target_fn, sites, fuse, batch, **sections):
    cfg = make_cfg(sites, seed=0, **{**sections, "train": {**sections.get("train", {}), "fuse_head": fuse}})
    dec = tspd.Decomposition(target_fn(), cfg)
    total, terms, _ = compute_losses(dec, batch, 0, torch.Generator().manual_seed(3))
    total.backward()
    return dec, terms, {n: p.grad.clone() for n, p in dec.named_parameters() if p.grad is not None}


def _both(target_fn, sites, batch, **sections):
    """(unfused, fused) runs of one step: each (decomposition, (terms, grads))."""
    out = []
    for fuse in (False, True):
        dec, terms, grads = _step(target_fn, sites, fuse, batch, **sections)
        out.append((dec, (terms, grads)))
    return out


def _seeded(cls):
    def make():
        torch.manual_seed(0)
        return cls()

    return make


X = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(0))


LOSSES = {"stochastic_recon": 1.0, "stochastic_recon_layerwise": 1.0, "ci_masked_recon": 0.5, "importance_minimality": 0.01}


@pytest.mark.parametrize("positions", [None, [-1, 3]])
@pytest.mark.parametrize("fp32_matmul", ["torch", "onednn"])
def test_fused_head_matches_the_unfused_losses_and_gradients(positions, fp32_matmul):
    batch = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(2))
    sites = [("transformer.h.*.mlp.c_fc", 8), ("transformer.h.1.attn.c_proj", 8)]
    kw = dict(losses=LOSSES, output={"positions": positions}, train={"fp32_matmul": fp32_matmul},
              ci={"kind": "shared_mlp", "hidden": [16]})
    (_, a), (dec1, b) = _both(make_gpt2, sites, batch, **kw)
    assert dec1._head_batch is not None  # the head was found and deferred
    assert_same_step(a, b)


def test_fused_head_under_bf16_autocast():
    batch = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(2))
    sites = [("transformer.h.*.mlp.c_fc", 8)]
    kw = dict(losses=LOSSES, train={"autocast": "bf16"}, ci={"kind": "shared_mlp", "hidden": [16]})
    (_, a), (_, b) = _both(make_gpt2, sites, batch, **kw)
    # the same bf16 logits: the same values up to fp32 summation order; the gradient's bf16
    # products round at another scale
    assert_same_step(a, b, grad_tol=(2e-2, 1e-5))


def test_induction_target_fuses_its_unembedding():
    from tspd.targets.induction import InductionTransformer

    def target():
        torch.manual_seed(0)
        return InductionTransformer(30, 16, 2, 12)

    batch = torch.randint(0, 30, (6, 12), generator=torch.Generator().manual_seed(1))
    sites = [("blocks.*.attn.q_proj", 6), ("blocks.1.attn.v_proj", 6)]
    kw = dict(losses=LOSSES, ci={"kind": "attention", "attention": {"max_len": 12, "d_attn": 4}})
    (_, a), (dec1, b) = _both(target, sites, batch, **kw)
    assert dec1.output_head is dec1.target.unembed and dec1._head_batch is not None
    assert_same_step(a, b, loss_tol=(1e-4, 1e-7), grad_tol=(1e-4, 1e-8))


class _Scaled(nn.Module):
    """Applies something after its head: the passes must not stop before it."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20)

    def get_output_embeddings(self):
        return self.head

    def forward(self, x):
        return 2.0 * self.head(torch.relu(self.inp(x)))


def test_no_fusion_when_the_model_changes_the_heads_output_or_the_head_is_a_site():
    (_, a), (dec1, b) = _both(_seeded(_Scaled), [("inp", 4)], X, losses=LOSSES)
    assert dec1.output_head is not None and dec1._head_batch is None  # found, but the output is not the head's
    assert a[0] == b[0]
    dec2, _, _ = _step(_seeded(_Scaled), [("inp", 4), ("head", 4)], True, X, losses=LOSSES)
    assert dec2.output_head is None


def test_auto_fuses_large_vocabularies_only():
    class Fake:
        def __init__(self, n):
            self.output_head = nn.Linear(4, n)

    assert fuse_head("auto", Fake(8192)) and not fuse_head("auto", Fake(1024))
    assert fuse_head(True, Fake(10)) and not fuse_head(False, Fake(10**5))
    assert not fuse_head("auto", type("NoHead", (), {"output_head": None})())


def test_divergence_through_head_refuses_mse():
    ref = Reference(torch.randn(2, 3, 5), "mse")
    with pytest.raises(ValueError, match="KL"):
        ref.divergence_through_head(torch.randn(2, 3, 4), nn.Linear(4, 5), False)


class _InPlace(_Scaled):
    """Scales its logits in place after the head: the same tensor object, changed."""

    def forward(self, x):
        return self.head(torch.relu(self.inp(x))).mul_(0.5)


class _ReadsHead(_Scaled):
    """Reads the head's weight before calling it (as Mamba-style models do)."""

    def forward(self, x):
        h = torch.relu(self.inp(x)).to(self.head.weight.dtype)
        return self.head(h)


def test_no_fusion_when_the_heads_output_is_changed_in_place():
    (_, a), (dec1, b) = _both(_seeded(_InPlace), [("inp", 4)], X, losses=LOSSES)
    assert dec1._head_batch is None
    assert a[0] == b[0]


def test_models_reading_the_heads_attributes_still_fuse():
    (_, a), (dec1, b) = _both(_seeded(_ReadsHead), [("inp", 4)], X, losses=LOSSES)
    assert dec1._head_batch is not None
    assert_same_step(a, b, loss_tol=(1e-4, 1e-7), grad_tol=(1e-4, 1e-7))


class _ReadsBlocks(nn.Module):
    """Reads a block's weight before calling the block (as Mamba-style models read norm weights)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(2))
        self.head = nn.Linear(8, 20)

    def get_output_embeddings(self):
        return self.head

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x.to(b.lin.weight.dtype))
        return self.head(x)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.lin(x))


def test_replayed_blocks_read_through_to_the_original():
    """With prefix replay the first block is a stand-in during the passes; the model reading
    its weight must still work (it crashed before), with the same losses as without replay."""
    sites = [("blocks.1.lin", 4)]
    _, t0, g0 = _step(_seeded(_ReadsBlocks), sites, True, X, losses=LOSSES, train={"reuse_prefix": False})
    dec1, t1, g1 = _step(_seeded(_ReadsBlocks), sites, True, X, losses=LOSSES, train={"reuse_prefix": True})
    assert dec1._block_outputs is not None  # block 0 was recorded for replay
    assert_same_step((t0, g0), (t1, g1), loss_tol=(1e-5, 1e-8), grad_tol=(1e-4, 1e-7))


def test_fused_head_takes_its_own_measured_onednn_choice(monkeypatch):
    """train.fp32_matmul auto with the other products on torch's route: the fused head's products
    follow their own measurement at the head's chunk shape; 'torch' never measures; a head that is
    not fused is never measured; the choice reaches the loss."""
    import tspd.decomposition as decomposition
    from tspd import fastlinear

    if not fastlinear.onednn_available():
        pytest.skip("no oneDNN in this torch build")
    asked = []

    def fake(rows, d_in, d_out):
        asked.append((rows, d_in, d_out))
        return True

    monkeypatch.setattr(decomposition, "use_onednn", lambda setting: False)  # the layers: torch's route
    monkeypatch.setattr(decomposition, "onednn_head_is_faster", fake)
    batch = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(2))
    sites = [("transformer.h.*.mlp.c_fc", 8)]
    kw = dict(losses=LOSSES, ci={"kind": "shared_mlp", "hidden": [16]})
    dec = tspd.Decomposition(make_gpt2(0), make_cfg(sites, **kw, train={"fuse_head": True}))
    assert not dec.onednn and dec.head_onednn
    assert asked == [(Reference.head_chunk_rows(100), dec.output_head.in_features, 100)]
    seen = []
    real = Reference.divergence_through_head
    monkeypatch.setattr(Reference, "divergence_through_head", lambda self, h, head, onednn: seen.append(onednn) or real(self, h, head, onednn))
    compute_losses(dec, batch, 0, torch.Generator().manual_seed(3))
    assert seen and all(seen)
    asked.clear()
    for train in ({"fuse_head": True, "fp32_matmul": "torch"}, {"fuse_head": False}):
        dec = tspd.Decomposition(make_gpt2(0), make_cfg(sites, **kw, train=train))
        assert not dec.head_onednn and not asked


def test_head_onednn_measurement_returns_a_choice_once_per_shape():
    from tspd import fastlinear

    fastlinear.onednn_head_is_faster.cache_clear()
    first = fastlinear.onednn_head_is_faster(64, 16, 256)
    assert isinstance(first, bool)
    assert fastlinear.onednn_head_is_faster(64, 16, 256) is first
    assert fastlinear.onednn_head_is_faster.cache_info().hits == 1
