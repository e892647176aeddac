"""The training loop: exact resume, divergence handling, run folder contents, data sources."""

from __future__ import annotations

import json
import math

import pytest
import torch

import tspd
from conftest import TwoLayer, assert_same_state, make_cfg, make_gpt2, snapshot_state
from tspd.data.tms import TMSData
from tspd.targets.tms import TMSModel
from tspd.train import CHECKPOINT, METRICS, DataStream, lr_at


def _tms_target(seed: int = 0) -> TMSModel:
    torch.manual_seed(seed)
    return TMSModel(5, 2)


def _resume_cfg(**train) -> tspd.RunConfig:
    return make_cfg(
        [("linear1", 6), ("linear2", 6)],
        seed=3,
        masks={"delta_component": True, "subset_granularity": "per_example"},
        losses={
            "faithfulness": 1.0,
            "stochastic_recon": 1.0,
            "stochastic_recon_layerwise": 1.0,
            "stochastic_recon_subset": 1.0,
            "ci_masked_recon": 0.5,
            "importance_minimality": 1e-2,
            "adversarial_recon": 0.5,
        },
        minimality={"p_start": 1.0, "p_end": 0.5},
        adversarial={"n_steps": 2},
        output={"divergence": "mse"},
        train={
            "steps": 12,
            "batch_size": 32,
            "lr": 1e-2,
            "warmup_frac": 0.25,
            "grad_clip": 1.0,
            "faithfulness_warmup_steps": 5,
            "eval_every": 4,
            "eval_batches": 2,
            "checkpoint_every": 5,
            "log_every": 1,
            **train,
        },
    )


def _metric_lines(run_dir):
    return [json.loads(ln) for ln in (run_dir / METRICS).read_text().splitlines() if ln]


# ---- 8. exact resume ---------------------------------------------------------------------------
def test_resume_is_bit_identical(tmp_path):
    cfg = _resume_cfg()
    data = TMSData(5, 0.2, 32, seed=0)
    full = tspd.decompose(_tms_target(), data, cfg, run_dir=tmp_path / "full", progress=False)

    part_dir = tmp_path / "part"
    stopped = tspd.decompose(_tms_target(), data, cfg, run_dir=part_dir, progress=False, stop_after=6)
    ckpt = torch.load(part_dir / CHECKPOINT, weights_only=False)
    assert ckpt["step"] == 6
    assert not (part_dir / "decomposition.safetensors").exists()  # a kill leaves no final save
    # the stopped run really is different from the finished one
    assert not torch.equal(stopped.component("linear1").V, full.component("linear1").V)

    resumed = tspd.decompose(_tms_target(), data, cfg, run_dir=part_dir, progress=False, resume=True)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and len(a) > 4
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    # the run folders agree too: same metric lines (steps, losses, evals), same final checkpoint step
    assert _metric_lines(part_dir) == _metric_lines(tmp_path / "full")
    assert [r["step"] for r in _metric_lines(part_dir) if "eval" not in r] == list(range(12))
    assert torch.load(part_dir / CHECKPOINT, weights_only=False)["step"] == 12
    assert (part_dir / "decomposition.safetensors").exists()


def test_resume_is_bit_identical_gpt2(tmp_path):
    """Conv1D + Embedding sites, attention CI, per-position binomial subset routing, delta, KL at the last position."""
    cfg = make_cfg(
        [("transformer.h.*.attn.c_attn", 4), ("transformer.wte", 4)],
        seed=1,
        ci={"kind": "attention", "attention": {"max_len": 16, "d_attn": 4}},
        losses={"stochastic_recon_subset": 1.0, "ci_masked_recon": 1.0, "adversarial_recon": 0.3},
        masks={"delta_component": True, "subset_granularity": "per_position", "kind": "binomial"},
        output={"positions": [-1]},
        train={"steps": 6, "batch_size": 4, "eval_batches": 1, "eval_every": 2, "checkpoint_every": 100,
               "warmup_frac": 0.3, "grad_clip": 1.0, "faithfulness_warmup_steps": 3},
    )

    def data(step):
        return torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(1000 + step))

    full = tspd.decompose(make_gpt2(0), data, cfg, run_dir=tmp_path / "a", progress=False)
    tspd.decompose(make_gpt2(0), data, cfg, run_dir=tmp_path / "b", progress=False, stop_after=3)
    resumed = tspd.decompose(make_gpt2(0), data, cfg, run_dir=tmp_path / "b", progress=False, resume=True)
    b = resumed.state_dict()
    for k, v in full.state_dict().items():
        assert torch.equal(v, b[k]), k
    assert _metric_lines(tmp_path / "a") == _metric_lines(tmp_path / "b")


def test_resume_with_iterable_data(tmp_path):
    cfg = _resume_cfg(steps=8, eval_every=100, checkpoint_every=100)
    src = TMSData(5, 0.2, 32, seed=1)

    def batches():
        i = 0
        while True:
            yield src(i)
            i += 1

    full = tspd.decompose(_tms_target(), batches(), cfg, run_dir=tmp_path / "a", progress=False)
    tspd.decompose(_tms_target(), batches(), cfg, run_dir=tmp_path / "b", progress=False, stop_after=3)
    resumed = tspd.decompose(_tms_target(), batches(), cfg, run_dir=tmp_path / "b", progress=False, resume=True)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_resume_errors(tmp_path):
    cfg = _resume_cfg(steps=2)
    data = TMSData(5, 0.2, 32)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tspd.decompose(_tms_target(), data, cfg, run_dir=tmp_path / "none", progress=False, resume=True)
    tspd.decompose(_tms_target(), data, cfg, run_dir=tmp_path / "r", progress=False, stop_after=1)
    other = cfg.with_overrides(["losses.faithfulness=3"])
    with pytest.raises(ValueError, match=r"different config \(losses.faithfulness: 1.0 in the checkpoint, 3.0 now\)"):
        tspd.decompose(_tms_target(), data, other, run_dir=tmp_path / "r", progress=False, resume=True)


def test_resume_past_a_damaged_metrics_line(tmp_path):
    """A metrics line cut short (a kill mid-write, a full disk) is dropped with a warning naming
    the file; the resume goes on, and the run's records are whole again."""
    cfg = _resume_cfg(steps=6)
    data = TMSData(5, 0.2, 32)
    tspd.decompose(_tms_target(), data, cfg, run_dir=tmp_path, progress=False, stop_after=5)
    with open(tmp_path / METRICS, "a") as f:
        f.write('{"step": 5, "lr": 0.00')
    stale = tmp_path / f".{CHECKPOINT}.abc12345.tmp"  # a checkpoint write a kill cut off (mkstemp: 8 random characters)
    stale.write_bytes(b"half")
    with pytest.warns(UserWarning, match=r"metrics.jsonl: dropped 1 line"):
        tspd.decompose(_tms_target(), data, cfg, run_dir=tmp_path, progress=False, resume=True)
    steps = [r["step"] for r in _metric_lines(tmp_path) if "loss" in r or "total" in r]
    assert steps and steps == sorted(set(steps)) and steps[-1] == 5
    assert not stale.exists()
    with pytest.raises(ValueError, match=r"at step 6, past train.steps=4: resume with train.steps >= 6"):
        tspd.decompose(_tms_target(), data, cfg.with_overrides(["train.steps=4"]), run_dir=tmp_path, progress=False, resume=True)


def test_fresh_run_in_a_used_folder_drops_the_earlier_checkpoint(tmp_path):
    """A fresh run killed before its first checkpoint must not leave the earlier run's checkpoint
    for a later --resume to pick up."""
    cfg = _resume_cfg(steps=8)
    src = TMSData(5, 0.2, 32)
    tspd.decompose(_tms_target(), src, cfg, run_dir=tmp_path, progress=False, stop_after=6)
    assert (tmp_path / CHECKPOINT).exists()

    def killed_at_step_1(step):
        if step >= 1:
            raise KeyboardInterrupt
        return src(step)

    with pytest.raises(KeyboardInterrupt):
        tspd.decompose(_tms_target(), killed_at_step_1, cfg, run_dir=tmp_path, progress=False)
    assert not (tmp_path / CHECKPOINT).exists()
    assert all(m["step"] < 1 for m in _metric_lines(tmp_path))  # the earlier run's lines are gone too


def test_resume_keeps_the_autocast_the_run_started_with(tmp_path):
    """train.autocast 'auto' measures bf16 against fp32 per process; a resumed run must use the
    checkpointed run's choice even where the new process measures otherwise."""
    from tspd.losses import cpu_has_fast_bf16, pin_fast_bf16

    cfg = _resume_cfg(steps=8, autocast="auto")
    data = TMSData(5, 0.2, 32)
    try:
        pin_fast_bf16(False)
        full = tspd.decompose(_tms_target(), data, cfg, run_dir=tmp_path / "a", progress=False)
        tspd.decompose(_tms_target(), data, cfg, run_dir=tmp_path / "b", progress=False, stop_after=3)
        pin_fast_bf16(True)  # the resuming process "measures" fast bf16
        resumed = tspd.decompose(_tms_target(), data, cfg, run_dir=tmp_path / "b", progress=False, resume=True)
        assert cpu_has_fast_bf16() is True  # the run's pin is put back when it returns
    finally:
        pin_fast_bf16(None)
    assert_same_state(full.state_dict(), resumed.state_dict())


def test_iterable_shorter_than_the_resume_step_is_named():
    with pytest.raises(RuntimeError, match="ran out at batch 2 while skipping the 5 batches"):
        DataStream(iter([1, 2]), 0, start_step=5)


def test_same_seed_same_result_without_run_dir():
    cfg = _resume_cfg(steps=4)
    data = TMSData(5, 0.2, 32)
    a = tspd.decompose(_tms_target(), data, cfg, progress=False)
    b = tspd.decompose(_tms_target(), data, cfg, progress=False)
    assert_same_state(a.state_dict(), b.state_dict())
    c = tspd.decompose(_tms_target(), data, cfg.with_overrides(["seed=4"]), progress=False)
    assert not torch.equal(a.component("linear1").V, c.component("linear1").V)


# ---- 9. divergence --------------------------------------------------------------------------------
def test_nan_loss_raises_training_diverged_and_keeps_checkpoint(tmp_path):
    src = TMSData(5, 0.2, 16)

    def data(step):
        x = src(step)
        if step == 3:
            x[0, 0] = float("nan")
        return x

    cfg = _resume_cfg(steps=10, checkpoint_every=2)
    run_dir = tmp_path / "run"
    with pytest.raises(tspd.TrainingDiverged) as err:
        tspd.decompose(_tms_target(), data, cfg, run_dir=run_dir, progress=False)
    msg = str(err.value)
    assert "step 3" in msg and "intact" in msg and "step 2" in msg
    state = torch.load(run_dir / CHECKPOINT, weights_only=False)
    assert state["step"] == 2
    dec = tspd.Decomposition(_tms_target(), cfg)
    dec.load_state_dict(state["decomposition"])
    assert all(torch.isfinite(v).all() for v in dec.state_dict().values())
    # and the run continues from it once the data is fixed
    resumed = tspd.decompose(_tms_target(), src, cfg, run_dir=run_dir, progress=False, resume=True)
    assert all(torch.isfinite(v).all() for v in resumed.state_dict().values())
    assert torch.load(run_dir / CHECKPOINT, weights_only=False)["step"] == 10


def test_inf_loss_without_run_dir():
    def data(step):
        return torch.full((8, 5), float("inf")) if step == 1 else torch.rand(8, 5)

    cfg = _resume_cfg(steps=4)
    with pytest.raises(tspd.TrainingDiverged, match="step 1") as err:
        tspd.decompose(_tms_target(), data, cfg, progress=False)
    assert "intact" not in str(err.value)


# ---- run folder and schedule ------------------------------------------------------------------------
def test_run_folder_contents_and_load(tmp_path):
    cfg = _resume_cfg(steps=6, eval_every=3, log_every=2)
    dec = tspd.decompose(_tms_target(), TMSData(5, 0.2, 32), cfg, run_dir=tmp_path, progress=False)
    for name in ("config.yaml", METRICS, "eval.json", CHECKPOINT, "decomposition.safetensors", "target_module.pt"):
        assert (tmp_path / name).exists(), name
    assert tspd.RunConfig.from_yaml(tmp_path / "config.yaml") == cfg
    rows = _metric_lines(tmp_path)
    assert [r["step"] for r in rows if "eval" not in r] == [0, 2, 4, 5]
    assert [r["step"] for r in rows if "eval" in r] == [2, 5]
    first = rows[0]
    for key in ("loss", "lr", "p", "faithfulness", "stochastic_recon_subset", "adversarial_recon", "l0"):
        assert key in first
    ev = json.loads((tmp_path / "eval.json").read_text())
    for key in ("l0", "alive", "ci_masked_recon", "stochastic_recon", "faithfulness"):
        assert key in ev
    assert ev["faithfulness"] == pytest.approx(float(dec.faithfulness().detach()), rel=1e-5)
    loaded = tspd.load(tmp_path)
    assert_same_state(dec.state_dict(), loaded.state_dict())


def test_lr_schedule_warmup_and_cosine():
    cfg = make_cfg([("a", 1)], train={"steps": 100, "lr": 1.0, "warmup_frac": 0.1, "final_lr_frac": 0.1})
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 55) == pytest.approx(0.1 + 0.9 * 0.5)
    lrs = [lr_at(cfg, s) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    # the last step's cosine: frac 89/90 of the way down
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)), rel=1e-12)
    const = make_cfg([("a", 1)], train={"steps": 10, "lr": 0.3, "final_lr_frac": 1.0})
    assert all(lr_at(const, s) == pytest.approx(0.3) for s in range(10))


def test_faithfulness_warmup_fits_weights():
    cfg = make_cfg(
        [("linear*", 6)],
        losses={"faithfulness": 1.0, "stochastic_recon": 0.0, "stochastic_recon_layerwise": 0.0, "importance_minimality": 0.0},
        output={"divergence": "mse"},
        train={"steps": 0, "faithfulness_warmup_steps": 300, "faithfulness_warmup_lr": 3e-2},
    )
    torch.manual_seed(0)
    target = TwoLayer(6, 4, 6)
    before = float(tspd.Decomposition(target, cfg).faithfulness().detach())
    dec = tspd.decompose(target, lambda step: torch.randn(8, 6), cfg, progress=False)
    assert float(dec.faithfulness().detach()) < 0.05 * before


def test_target_untouched_by_training(tmp_path):
    target = _tms_target()
    target.linear2.bias.requires_grad_(False)
    flags = [(n, p.requires_grad) for n, p in target.named_parameters()]
    before = snapshot_state(target)
    modules = dict(target.named_modules())
    tspd.decompose(target, TMSData(5, 0.2, 16), _resume_cfg(steps=3), run_dir=tmp_path, progress=False)
    assert_same_state(before, snapshot_state(target))
    assert [(n, p.requires_grad) for n, p in target.named_parameters()] == flags
    after = dict(target.named_modules())
    assert after.keys() == modules.keys() and all(after[k] is modules[k] for k in modules)
    assert all(p.grad is None for p in target.parameters())


def test_datastream_callable_and_iterable():
    calls = []

    def f(step):
        calls.append(step)
        return torch.tensor([step])

    ds = DataStream(f, n_eval=2)
    assert [int(b) for b in ds.eval_batches] == [-1, -2]
    assert int(ds.batch(5)) == 5
    ds0 = DataStream(lambda: torch.tensor([7]), n_eval=1)
    assert int(ds0.batch(3)) == 7
    it = DataStream(iter([torch.tensor([i]) for i in range(6)]), n_eval=2, start_step=1)
    assert [int(b) for b in it.eval_batches] == [0, 1]
    assert [int(it.batch(s)) for s in (1, 2, 3)] == [3, 4, 5]
    with pytest.raises(RuntimeError, match="ran out"):
        it.batch(4)


def test_held_out_batches_continue_the_evaluation_batches():
    ds = DataStream(lambda step: torch.tensor([step]), n_eval=2)
    assert [int(b) for b in ds.held_out(None)] == [-1, -2]
    assert [int(b) for b in ds.held_out(1)] == [-1]
    assert [int(b) for b in ds.held_out(5)] == [-1, -2, -3, -4, -5]  # never a training step (>= 0)
    it = DataStream(iter([torch.tensor([i]) for i in range(6)]), n_eval=2)
    assert [int(b) for b in it.held_out(5)] == [0, 1]  # an iterable has only its evaluation batches


def test_divergence_before_first_checkpoint_does_not_claim_one(tmp_path):
    def data(step):
        return torch.full((8, 5), float("nan")) if step == 1 else torch.rand(8, 5)

    cfg = _resume_cfg(steps=10, checkpoint_every=5)
    with pytest.raises(tspd.TrainingDiverged) as err:
        tspd.decompose(_tms_target(), data, cfg, run_dir=tmp_path, progress=False)
    assert not (tmp_path / CHECKPOINT).exists()
    assert "intact" not in str(err.value)


def test_decompose_applies_the_lr_schedule_and_clips_gradients(monkeypatch):
    """The optimiser sees lr_at(step) at every step, and the gradient it steps on has norm <= grad_clip."""
    import tspd.train as T

    seen = []
    real = T.make_optimizer

    def spy(dec):
        opt = real(dec)
        step = opt.step

        def recording_step(*args, **kwargs):
            norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in dec.parameters() if p.grad is not None))
            seen.append((opt.param_groups[0]["lr"], float(norm)))
            return step(*args, **kwargs)

        opt.step = recording_step
        return opt

    monkeypatch.setattr(T, "make_optimizer", spy)
    cfg = _resume_cfg(steps=8, grad_clip=1e-3, eval_every=100)
    tspd.decompose(_tms_target(), TMSData(5, 0.2, 32), cfg, progress=False)
    assert [lr for lr, _ in seen] == pytest.approx([T.lr_at(cfg, s) for s in range(8)], rel=1e-12)
    assert len({lr for lr, _ in seen}) > 4  # warm-up and decay, not a constant
    norms = [n for _, n in seen]
    assert max(norms) <= 1e-3 * (1 + 1e-5) and min(norms) > 0.9e-3, norms  # clipped, and clipping was active


def test_resume_keeps_the_fused_heads_product_route(tmp_path, monkeypatch):
    """The fused head's own oneDNN choice (measured per process under fp32_matmul auto) comes from
    the checkpoint on resume; a checkpoint without it (older) means the head followed the layers'."""
    import tspd.decomposition as decomposition
    from tspd import fastlinear
    from tspd.train import _load_checkpoint, _save_checkpoint, make_optimizer

    if not fastlinear.onednn_available():
        pytest.skip("no oneDNN in this torch build")
    monkeypatch.setattr(decomposition, "use_onednn", lambda setting: False)  # the layers: torch's route

    def make(measured: bool):
        monkeypatch.setattr(decomposition, "onednn_head_is_faster", lambda *shape: measured)
        dec = tspd.Decomposition(make_gpt2(0), make_cfg([("transformer.h.0.mlp.c_fc", 4)], train={"fuse_head": True}))
        return dec, make_optimizer(dec)

    dec, opt = make(True)
    assert dec.head_onednn and not dec.onednn
    _save_checkpoint(tmp_path, dec, opt, 3)
    new, new_opt = make(False)
    assert not new.head_onednn
    assert _load_checkpoint(tmp_path, new, new_opt) == 3 and new.head_onednn
    state = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    del state["head_onednn"]
    torch.save(state, tmp_path / CHECKPOINT)
    old, old_opt = make(True)
    _load_checkpoint(tmp_path, old, old_opt)
    assert not old.head_onednn
