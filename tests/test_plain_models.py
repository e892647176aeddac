"""Plain PyTorch targets whose forward takes another route than the one tspd stands in for: each is
either handled (masks applied, every mask 1 gives the target) or refused with a message that says why."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tspd
from tspd.components import SiteError
from tspd.masks import Pass, stochastic_masks

from conftest import make_cfg

D = 8


def mse_cfg(sites, **sections) -> tspd.RunConfig:
    return make_cfg(sites, output={"divergence": "mse"}, masks={"delta_component": True}, **sections)


def zero_pass(ci: dict[str, torch.Tensor]) -> Pass:
    return Pass(masks={s: torch.zeros_like(g) for s, g in ci.items()})


@pytest.mark.parametrize("padded", [False, True])
def test_transformer_encoder_fast_path_does_not_bypass_the_masks(padded):
    """nn.TransformerEncoder in eval mode takes torch's fused kernel when no hook is attached: it read
    the weights without calling the site modules, so every mask was silently ignored in the passes."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=True), 2).eval()
    x = torch.randn(4, 5, D)
    batch = x
    if padded:
        pad = torch.zeros(4, 5, dtype=torch.bool)
        pad[:, -2:] = True
        batch = {"src": x, "src_key_padding_mask": pad}
    dec = tspd.Decomposition(enc, mse_cfg([("layers.*.linear1", 4)]))
    assert torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad():
        target, _ = dec.run_target(batch)
        ci = dec.causal_importance(batch)
        dec.run_target(batch)
        ones = dec.run_pass(batch, dec.ones_pass(ci))
        dec.run_target(batch)
        zero = dec.run_pass(batch, zero_pass(ci))
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            plain = enc(**batch) if padded else enc(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    real = slice(0, 3)  # the unpadded positions
    torch.testing.assert_close(ones[:, real], target[:, real], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(target[:, real], plain[:, real], rtol=1e-5, atol=1e-6)
    assert (zero[:, real] - target[:, real]).abs().max() > 0.1  # the masks act
    assert torch.backends.mha.get_fastpath_enabled()  # torch's setting restored


def test_a_site_a_pass_never_calls_is_an_error():
    class Sneaky(nn.Module):  # calls the site in the target run (no grad), bypasses it with gradients on
        def __init__(self):
            super().__init__()
            self.lin, self.out = nn.Linear(D, D), nn.Linear(D, 3)

        def forward(self, x):
            h = nn.functional.linear(x, self.lin.weight, self.lin.bias) if torch.is_grad_enabled() else self.lin(x)
            return self.out(torch.tanh(h))

    dec = tspd.Decomposition(Sneaky(), mse_cfg([("lin", 4)]))
    x = torch.randn(4, D)
    ci = dec.causal_importance(x)
    dec.run_target(x)
    with pytest.raises(SiteError, match="'lin'|lin were called in the target run but not in a masked pass"):
        dec.run_pass(x, zero_pass(ci))


def test_hooks_on_a_site_module_are_refused():
    model = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, 3))
    handle = model[0].register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(SiteError, match="site '0' has 1 hook"):
        tspd.Decomposition(model, mse_cfg([("0", 4)]))
    handle.remove()
    dec = tspd.Decomposition(model, mse_cfg([("0", 4)]))
    model[0].register_forward_pre_hook(lambda m, i: (i[0] + 1,))  # added after: seen at the next target run
    with pytest.raises(SiteError, match="hook"):
        dec.run_target(torch.randn(2, D))


def test_old_weight_norm_on_a_site_is_accepted():
    torch.manual_seed(0)
    model = nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(D, D)), nn.Tanh(), nn.Linear(D, 3)).eval()
    dec = tspd.Decomposition(model, mse_cfg([("0", 4)]))
    x = torch.randn(3, D)
    with torch.no_grad():
        target, _ = dec.run_target(x)
        ci = dec.causal_importance(x)
        out = dec.run_pass(x, dec.ones_pass(ci))
    torch.testing.assert_close(out, target, rtol=1e-5, atol=1e-6)


class Twice(nn.Module):
    def __init__(self, second):
        super().__init__()
        self.lin, self.out, self.second = nn.Linear(D, D), nn.Linear(D, 3), second

    def forward(self, x):
        return self.out(torch.tanh(self.lin(self.second(torch.tanh(self.lin(x))))))


def test_a_site_called_twice_with_other_shapes_is_refused_and_with_the_same_shape_warned_about():
    x = torch.randn(4, 5, D)
    with pytest.raises(SiteError, match=r"called 2 times per forward with inputs of shapes \[\(4, 5, 8\), \(4, 8\)\]"):
        tspd.Decomposition(Twice(lambda h: h.mean(1)), mse_cfg([("lin", 4)])).run_target(x)
    dec = tspd.Decomposition(Twice(lambda h: h), mse_cfg([("lin", 4)]))
    with pytest.warns(UserWarning, match="called 2 times per forward"):
        dec.run_target(x)


class SeqFirst(nn.Module):
    """(seq, batch, d) in, a causal-free mixing over dim 0 (the positions)."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(h + h.mean(0, keepdim=True))


class BatchNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.bn, self.out = nn.Linear(D, D), nn.BatchNorm1d(D, track_running_stats=False), nn.Linear(D, 3)

    def forward(self, x):
        return self.out(self.bn(self.inp(x)))


@pytest.mark.parametrize("model, shape", [(SeqFirst, (5, 4, D)), (BatchNormed, (6, D))])
def test_targets_whose_examples_see_each_other_run_their_passes_one_by_one(model, shape):
    """Stacking passes along dim 0 is sound only if the target treats dim 0's entries independently;
    a sequence-first layout or batch statistics do not (stacked passes were silently off by 0.07-0.70)."""
    torch.manual_seed(0)
    dec = tspd.Decomposition(model().eval(), mse_cfg([("inp", 4), ("out", 3)]))
    x = torch.randn(*shape)
    with pytest.warns(UserWarning, match="not independent"):
        target, _ = dec.run_target(x)
    ci = dec.causal_importance(x)
    passes = [Pass(masks=stochastic_masks({"inp": ci["inp"]}, "continuous", torch.Generator().manual_seed(0))), dec.ones_pass(ci)]
    with torch.no_grad():
        dec.run_target(x)
        stacked = dec.run_passes(x, passes, stack=True)
        dec.run_target(x)
        alone = dec.run_passes(x, passes, stack=False)
    torch.testing.assert_close(stacked[0], alone[0])
    torch.testing.assert_close(stacked[1], target, rtol=1e-5, atol=1e-6)


def test_independent_examples_keep_stacking(tokens):
    from conftest import make_gpt2

    dec = tspd.Decomposition(make_gpt2(0), make_cfg([("transformer.h.0.mlp.c_fc", 4)]))
    dec.run_target(tokens)
    assert dec._stackable


def test_the_batch_size_of_keyword_inputs_is_the_dim_most_tensors_share():
    from tspd.decomposition import batch_size

    assert batch_size({"tgt": torch.zeros(4, 8, 8), "memory": torch.zeros(4, 3, 8), "tgt_mask": torch.zeros(8, 8)}) == 4
    assert batch_size({"x": torch.zeros(4, 5, 8), "mask": torch.zeros(5, 5)}) == 4  # a tie: the first tensor's
    assert batch_size({"ids": torch.zeros(3, 5), "position_ids": torch.zeros(1, 5)}) == 3
    assert batch_size({"inputs_embeds": torch.zeros(2, 9, 4), "mask": torch.zeros(9, 9), "m2": torch.zeros(9, 9)}) == 2


def test_batches_that_are_not_tensors_or_dicts_get_a_clear_error(tmp_path):
    model = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, 3))
    cfg = mse_cfg([("0", 4)], train={"steps": 2, "batch_size": 4})
    with pytest.raises(TypeError, match=r"got a tuple. Yield the model's inputs only \(e.g. x, not \(x, y\)\)"):
        tspd.decompose(model, lambda step: (torch.randn(4, D), torch.zeros(4)), cfg, progress=False)
    finite = [torch.randn(4, D) for _ in range(3)]
    with pytest.raises(RuntimeError, match=r"ran out at step 0, after the first 3 batches went to evaluation \(train.eval_batches\)"):
        tspd.decompose(model, finite, cfg, progress=False)


def test_mixed_dtype_sites_are_refused():
    model = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, 3).double())
    with pytest.raises(SiteError, match="site '2' has a torch.float64 weight but the model's first parameter is torch.float32"):
        tspd.Decomposition(model, mse_cfg([("2", 4)]))


def test_a_target_that_cannot_be_saved_fails_before_training(tmp_path):
    class Unpicklable(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.act = nn.Linear(D, 3), (lambda t: t * 2)

        def forward(self, x):
            return self.act(self.lin(x))

    cfg = mse_cfg([("lin", 4)], train={"steps": 50, "batch_size": 4})
    with pytest.raises(TypeError, match="the target cannot be saved with torch.save"):
        tspd.decompose(Unpicklable(), lambda step: torch.randn(4, D), cfg, run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or (tmp_path / "run" / "metrics.jsonl").read_text() == ""


def test_torchscript_modules_are_refused_with_the_reason():
    model = nn.Sequential(torch.jit.script(nn.Linear(D, D)), nn.Tanh(), nn.Linear(D, 3))
    with pytest.raises(SiteError, match="a TorchScript module .* decompose the eager model before scripting it"):
        tspd.Decomposition(model, mse_cfg([("0", 4)]))


def test_a_target_changing_its_buffers_in_forward_is_warned_about():
    class Running(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(D, D), nn.Linear(D, 3)
            self.register_buffer("ema", torch.zeros(D))

        def forward(self, x):
            h = self.a(x)
            self.ema.mul_(0.9).add_(0.1 * h.detach().mean(0))
            return self.b(h - self.ema)

    dec = tspd.Decomposition(Running(), mse_cfg([("a", 4)]))
    with pytest.warns(UserWarning, match="changes its buffer.s. ema in its forward"):
        dec.run_target(torch.randn(4, D))


def test_pruned_sites_are_accepted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, 3)).eval()
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.5)
    dec = tspd.Decomposition(model, mse_cfg([("0", 4)]))
    x = torch.randn(3, D)
    with torch.no_grad():
        target, _ = dec.run_target(x)
        out = dec.run_pass(x, dec.ones_pass(dec.causal_importance(x)))
    torch.testing.assert_close(out, target, rtol=1e-5, atol=1e-6)


def test_tokens_flattened_in_the_output_keep_stacking():
    """(B*T, V) logits, in example order: the examples are independent, so passes still stack."""
    import warnings

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.out = nn.Linear(D, D), nn.Linear(D, 5)

        def forward(self, x):
            return self.out(torch.tanh(self.inp(x))).reshape(-1, 5)

    dec = tspd.Decomposition(Flat(), mse_cfg([("inp", 4)]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dec.run_target(torch.randn(4, 6, D))
    assert dec._stackable


def test_the_fast_path_flag_comes_back_when_the_last_decomposition_leaves():
    from tspd.decomposition import _fastpath_off

    assert torch.backends.mha.get_fastpath_enabled()
    _fastpath_off(True)
    _fastpath_off(True)  # a second decomposition (another thread) inside
    _fastpath_off(False)
    assert not torch.backends.mha.get_fastpath_enabled()  # the other is still inside
    _fastpath_off(False)
    assert torch.backends.mha.get_fastpath_enabled()


def test_a_buffer_made_in_inference_mode_is_no_crash():
    class Lazy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(D, D), nn.Linear(D, 3)
            with torch.inference_mode():
                self.register_buffer("scale", torch.ones(D))

        def forward(self, x):
            return self.b(self.a(x) * self.scale)

    dec = tspd.Decomposition(Lazy(), mse_cfg([("a", 4)]))
    dec.run_target(torch.randn(4, D))


def test_encoder_decoder_batches_do_not_read_the_encoders_mask_as_the_outputs():
    from tspd.decomposition import position_mask

    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 3:] = 0
    assert position_mask({"input_ids": torch.zeros(2, 6), "attention_mask": mask}) is not None
    assert position_mask({"input_ids": torch.zeros(2, 6), "attention_mask": mask, "decoder_input_ids": torch.zeros(2, 6)}) is None
    additive = torch.zeros(2, 6)
    additive[0, 3:] = -1e9
    assert position_mask({"input_ids": torch.zeros(2, 6), "attention_mask": additive}) is None
