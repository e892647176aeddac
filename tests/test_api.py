"""Public API: save/load, ablation, evaluation and TMS metrics, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import tspd
from conftest import TwoLayer, assert_same_state, make_cfg, make_gpt2, set_exact_factors, snapshot_state
from tspd import cli
from tspd.analysis.metrics import evaluate
from tspd.analysis.tms import tms_metrics
from tspd.data.tms import TMSData, sparse_features
from tspd.targets.tms import TMSModel, train_tms


def _trained_dec(target, cfg, tmp_path, data):
    return tspd.decompose(target, data, cfg, run_dir=tmp_path, progress=False)


# ---- 4 (continued). the target survives decompose / save / load -------------------------------------
def test_save_load_roundtrip_keeps_target_and_outputs(tmp_path):
    torch.manual_seed(0)
    target = TwoLayer(6, 4, 6)
    before = snapshot_state(target)
    modules = dict(target.named_modules())
    cfg = make_cfg([("linear*", 5)], ci={"kind": "shared_mlp", "hidden": [8, 8]}, output={"divergence": "mse"}, train={"steps": 3})
    dec = _trained_dec(target, cfg, tmp_path / "run", lambda step: torch.randn(8, 6))
    dec.save(tmp_path / "copy")

    x = torch.randn(4, 6)
    ci = dec.causal_importance(x)
    out = dec.run_pass(x, dec.ones_pass(ci))
    for folder in ("run", "copy"):
        for loaded in (tspd.load(tmp_path / folder), tspd.load(tmp_path / folder, target=target)):
            assert loaded.site_names == dec.site_names
            assert loaded.config == cfg
            assert_same_state(dec.state_dict(), loaded.state_dict())
            ci2 = loaded.causal_importance(x)
            assert all(torch.equal(ci[s], ci2[s]) for s in ci)
            torch.testing.assert_close(loaded.run_pass(x, loaded.ones_pass(ci2)), out, rtol=0, atol=0)

    assert_same_state(before, snapshot_state(target))
    after = dict(target.named_modules())
    assert after.keys() == modules.keys() and all(after[k] is modules[k] for k in modules)
    assert all(p.requires_grad and p.grad is None for p in target.parameters())
    # the state dict of a Decomposition holds only its own tensors
    assert all(k.startswith(("factors.", "ci_fns.")) for k in dec.state_dict())


def test_gpt2_target_untouched_by_decompose(tmp_path, tokens):
    model = make_gpt2(0)
    before = snapshot_state(model)
    modules = dict(model.named_modules())
    ref = model(tokens).logits
    cfg = make_cfg(
        [("transformer.h.0.mlp.c_fc", 4), ("transformer.wte", 4)],
        ci={"kind": "attention", "attention": {"max_len": 16, "d_attn": 4}},
        losses={"stochastic_recon_subset": 1.0, "ci_masked_recon": 1.0},
        masks={"delta_component": True, "subset_granularity": "per_position"},
        train={"steps": 2, "eval_batches": 1},
    )
    g = torch.Generator().manual_seed(0)
    dec = tspd.decompose(model, lambda step: torch.randint(0, 100, (2, 8), generator=g), cfg, run_dir=tmp_path, progress=False)
    loaded = tspd.load(tmp_path, target=model)
    assert_same_state(dec.state_dict(), loaded.state_dict())
    assert_same_state(before, snapshot_state(model))
    after = dict(model.named_modules())
    assert after.keys() == modules.keys() and all(after[k] is modules[k] for k in modules)
    torch.testing.assert_close(model(tokens).logits, ref, rtol=0, atol=0)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="decomposition.safetensors"):
        tspd.load(tmp_path)


# ---- ablation -------------------------------------------------------------------------------------
def test_forward_with_ablation_matches_manual_masks():
    torch.manual_seed(0)
    target = TwoLayer(6, 4, 6)
    dec = tspd.Decomposition(target, make_cfg([("linear*", 5)]))
    x = torch.randn(3, 7, 6)
    ci = dec.causal_importance(x)
    masks = {s: torch.ones_like(g) for s, g in ci.items()}
    masks["linear1"][:, [1, -1], 2] = 0.0
    masks["linear1"][:, [1, -1], 4] = 0.0
    manual = dec.run_pass(x, tspd.masks.Pass(masks=masks))
    out = dec.forward_with_ablation(x, {"linear1": [2, 4]}, positions=[1, -1])
    torch.testing.assert_close(out, manual, rtol=0, atol=0)
    # base='ci' starts from the CI instead of ones
    masks_ci = {s: g.clone() for s, g in ci.items()}
    masks_ci["linear2"][..., 0] = 0.0
    out_ci = dec.forward_with_ablation(x, {"linear2": [0]}, base="ci")
    torch.testing.assert_close(out_ci, dec.run_pass(x, tspd.masks.Pass(masks=masks_ci)), rtol=0, atol=0)
    with pytest.raises(KeyError):
        dec.forward_with_ablation(x, {"linear7": [0]})
    with pytest.raises(ValueError, match="base"):
        dec.forward_with_ablation(x, {"linear1": [0]}, base="zeros")


def test_ablating_all_but_nothing_is_identity_with_exact_factors():
    torch.manual_seed(0)
    target = TwoLayer(6, 4, 6)
    dec = tspd.Decomposition(target, make_cfg([("linear*", 6)]))
    for s in dec.site_names:
        set_exact_factors(dec, s)
    x = torch.randn(5, 6)
    torch.testing.assert_close(dec.forward_with_ablation(x, {}), target(x), rtol=0, atol=1e-5)
    # removing the dead (V = 0) subcomponents changes nothing; removing a live one does
    torch.testing.assert_close(dec.forward_with_ablation(x, {"linear1": [4, 5]}), target(x), rtol=0, atol=1e-5)
    assert (dec.forward_with_ablation(x, {"linear1": [0]}) - target(x)).abs().max() > 1e-3


# ---- evaluation and TMS metrics -----------------------------------------------------------------------
def _tms_exact(C: int, alive: bool = True):
    torch.manual_seed(0)
    target = TMSModel(5, 2)
    dec = tspd.Decomposition(target, make_cfg([("linear1", C)], output={"divergence": "mse"}))
    W = target.linear1.weight.detach()  # 2 x 5
    comps = dec.component("linear1")
    with torch.no_grad():
        comps.V.copy_(torch.eye(5, C))  # subcomponent c < 5 reads feature c
        comps.U.zero_()
        comps.U[:5] = W.T
        net = dec.ci_fns["linear1"].net
        net.w2.zero_()
        net.b2.fill_(5.0 if alive else -5.0)
    return target, dec


def test_tms_metrics_known_answer():
    target, dec = _tms_exact(C=8)
    batches = [TMSData(5, 0.1, 64)(0)]
    m = tms_metrics(dec, batches, "linear1")
    assert m["mmcs"] == pytest.approx(1.0, abs=1e-6)
    assert m["ml2r"] == pytest.approx(1.0, abs=1e-6)
    assert m["alive"] == 8 and m["n_features"] == 5
    # scaling one subcomponent's U by 2 moves ML2R by (2 - 1) / 5, not MMCS
    with torch.no_grad():
        dec.component("linear1").U[0] *= 2
    m2 = tms_metrics(dec, batches, "linear1")
    assert m2["mmcs"] == pytest.approx(1.0, abs=1e-6)
    assert m2["ml2r"] == pytest.approx(1.2, abs=1e-6)


def test_evaluate_reports_consistent_metrics():
    target, dec = _tms_exact(C=6)
    batches = [TMSData(5, 0.1, 64)(i) for i in range(2)]
    ev = evaluate(dec, batches)
    assert ev["l0"]["linear1"] == pytest.approx(6.0)  # CI = 1 everywhere
    assert ev["alive"]["linear1"] == 6 and ev["alive_total"] == 6
    assert ev["faithfulness"] < 1e-12
    for k in ("ci_masked_recon", "stochastic_recon", "ones_recon"):
        assert ev[k] < 1e-10, k
    _, dead = _tms_exact(C=6, alive=False)
    ev_dead = evaluate(dead, batches)
    assert ev_dead["l0_total"] == 0 and ev_dead["alive_total"] == 0
    assert ev_dead["ci_masked_recon"] > 1e-4  # mask 0 everywhere loses linear1


def test_tms_metrics_with_no_alive_subcomponent():
    _, dec = _tms_exact(C=6, alive=False)
    m = tms_metrics(dec, [TMSData(5, 0.1, 64)(0)], "linear1")
    assert m["alive"] == 0 and m["mmcs"] == 0.0 and m["ml2r"] == 0.0 and m["n_features"] == 5


def test_tms_figure_with_no_alive_subcomponent(tmp_path):
    from tspd.report.figures import tms_figure

    _, dec = _tms_exact(C=6, alive=False)
    path = tms_figure(dec, [TMSData(5, 0.1, 64)(0)], tmp_path / "f.png")
    assert path.exists()


def test_tms_data_and_target():
    a = TMSData(5, 0.3, 128, seed=1)
    x = a(3)
    assert x.shape == (128, 5)
    assert torch.equal(x, TMSData(5, 0.3, 128, seed=1)(3))
    assert not torch.equal(x, a(4))
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert abs(float((x > 0).float().mean()) - 0.3) < 0.06
    xs = sparse_features(4000, 5, 0.05, torch.Generator().manual_seed(0))
    assert abs(float((xs > 0).float().mean()) - 0.05) < 0.01
    model = train_tms(5, 2, 0.05, steps=30, batch_size=64, seed=0)
    torch.testing.assert_close(model.linear2.weight, model.linear1.weight.T)  # tied
    x = torch.rand(3, 5)
    torch.testing.assert_close(model(x), torch.relu(x @ model.linear1.weight.T @ model.linear1.weight + model.linear2.bias))


# ---- 11. CLI --------------------------------------------------------------------------------------------
def test_cli_run_tms_smoke(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(
        [
            "run",
            "tms-5-2",
            "--out",
            str(out),
            "--set",
            "train.steps=20",
            "--set",
            "target.train_steps=50",
            "--set",
            "train.batch_size=256",
        ]
    )
    assert rc == 0
    for name in ("results.json", "decomposition.safetensors", "tms_subcomponents.png", "config.yaml", "target.safetensors"):
        assert (out / name).exists(), name
    assert (out / "tms_subcomponents.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["tms"]["mmcs"] <= 1.0 + 1e-6
    assert "l0" in results["eval"] and "seconds" in results
    cfg = tspd.RunConfig.from_yaml(out / "config.yaml")
    assert cfg.train.steps == 20 and cfg.target.train_steps == 50
    # the finished run loads through the Python API, target included
    dec = tspd.load(out)
    assert dec.site_names == ["linear1", "linear2"]
    # and `tspd eval` re-evaluates it
    capsys.readouterr()
    assert cli.main(["eval", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["tms"]["n_features"] == 5


def test_cli_errors(tmp_path, capsys):
    assert cli.main(["decompose", "does-not-exist", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "does-not-exist" in err and "tms-5-2" in err
    assert cli.main(["run", "tms-5-2", "--out", str(tmp_path / "y"), "--set", "train.stepz=3"]) == 2
    assert "unknown key" in capsys.readouterr().err
    assert not (tmp_path / "y" / "decomposition.safetensors").exists()
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])


def test_cli_bad_input_is_named_before_any_work(tmp_path, capsys, monkeypatch):
    """Input errors found by review: each is exit 2 with a message naming the problem, and nothing is
    trained or written first."""
    out = tmp_path / "z"
    # data of another kind than the target's: named by the config check, before the target is trained
    assert cli.main(["decompose", "tms-5-2", "--out", str(out), "--set", "data={kind: induction}"]) == 2
    err = capsys.readouterr().err
    assert "data.kind 'induction' does not suit target.kind 'tms'" in err and "Traceback" not in err
    assert not out.exists()
    # YAML that does not parse, in a file or a --set value
    bad = tmp_path / "bad.yaml"
    bad.write_text("sites: [\n")
    assert cli.main(["decompose", str(bad), "--out", str(out)]) == 2
    assert f"{bad} is not valid YAML" in capsys.readouterr().err
    assert cli.main(["decompose", "tms-5-2", "--out", str(out), "--set", "train.steps=[1"]) == 2
    assert "'train.steps=[1': the value '[1' is not valid YAML" in capsys.readouterr().err
    # a whole-config check names its keys and does not print the config
    assert cli.main(["decompose", "tms-5-2", "--out", str(out), "--set", "minimality.anneal_start_frac=0.8",
                     "--set", "minimality.anneal_end_frac=0.5"]) == 2
    err = capsys.readouterr().err
    assert "minimality.anneal_end_frac must be >= minimality.anneal_start_frac" in err and "'sites'" not in err
    assert not out.exists()
    # under torchrun, a batch that does not split over the ranks (WORLD_SIZE read before joining)
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert cli.main(["decompose", "tms-5-2", "--out", str(out), "--set", "train.batch_size=64"]) == 2
    assert "train.batch_size 64 does not split evenly over 3 processes" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.delenv("WORLD_SIZE")
    # a folder named like a recipe (a run's --out) does not hide the recipe
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tms-5-2").mkdir()
    assert cli._recipe("tms-5-2") == cli.CONFIGS_DIR / "tms-5-2.yaml"


def test_cli_decompose_then_resume_and_train_target(tmp_path, capsys):
    out = tmp_path / "dec"
    sets = ["--set", "train.steps=4", "--set", "target.train_steps=10", "--set", "train.batch_size=64",
            "--set", "train.faithfulness_warmup_steps=5", "--set", "train.checkpoint_every=2"]
    assert cli.main(["decompose", "tms-5-2", "--out", str(out), *sets]) == 0
    first = tspd.load(out)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 4
    # --resume with no config reads the run folder's own config; the run is already finished
    assert cli.main(["decompose", "--resume", "--out", str(out)]) == 0
    assert_same_state(first.state_dict(), tspd.load(out).state_dict())
    # decompose with neither a config nor --resume is a usage error
    assert cli.main(["decompose", "--out", str(tmp_path / "none")]) == 2
    assert "CONFIG" in capsys.readouterr().err
    # a fresh run in the used folder moves the earlier run's outputs aside (nothing stale read as its
    # own, nothing lost) and keeps the target, which the same settings reuse
    (out / "results.json").write_text("{}")
    (out / "inside").mkdir()  # a subfolder (e.g. facts ablate --out RUN/inside) stays
    before = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith(("target", ".")))
    assert cli.main(["decompose", "tms-5-2", "--out", str(out), *sets, "--set", "target.seed=7"]) == 0
    aside = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert len(aside) == 1 and "moved to" in capsys.readouterr().err
    assert sorted(p.name for p in aside[0].iterdir() if not p.name.startswith("target")) == before
    assert not (out / "results.json").exists() and (out / "inside").is_dir()
    # the earlier run still loads from there, with its own target (the new run made another)
    assert_same_state(first.state_dict(), tspd.load(aside[0]).state_dict())
    assert not torch.equal(tspd.load(aside[0]).target.linear1.weight, tspd.load(out).target.linear1.weight)
    # a command that fails before writing anything leaves no empty folder
    assert cli.main(["decompose", "tms-5-2", "--out", str(tmp_path / "bad"), *sets, "--set", "train.device=cuda"]) == (2 if not torch.cuda.is_available() else 0)
    if not torch.cuda.is_available():
        assert not (tmp_path / "bad").exists()  # named before the target trains

    tdir = tmp_path / "target"
    assert cli.main(["train-target", "tms-5-2", "--out", str(tdir), "--seed", "3", "--set", "train_steps=10"]) == 0
    assert (tdir / "target.safetensors").exists() and (tdir / "target.yaml").exists()
    import yaml

    saved = yaml.safe_load((tdir / "target.yaml").read_text())
    assert saved["seed"] == 3 and saved["train_steps"] == 10
    # the target.-prefixed form (what an error's suggestion names) is taken too; errors use it
    assert cli.main(["train-target", "tms-5-2", "--out", str(tdir), "--set", "target.train_steps=12"]) == 0
    assert yaml.safe_load((tdir / "target.yaml").read_text())["train_steps"] == 12
    assert cli.main(["train-target", "tms-5-2", "--out", str(tdir), "--set", "train_step=2"]) == 2
    assert "unknown key 'target.train_step'" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["census", "RUN", "--n-sequences", "0"], "argument --n-sequences: must be at least 1, got 0"),
    (["circuit-check", "RUN", "--n-sequences", "-5"], "argument --n-sequences: must be at least 1, got -5"),
    (["harvest", "RUN", "--top-k", "-1"], "argument --top-k: must be at least 1, got -1"),
    (["serve", "RUN", "--port", "99999"], "argument --port: must be between 0 and 65535, got 99999"),
    (["facts", "ablate", "RUN", "--k", "-1"], "argument --k: must be at least 1, got -1"),
    (["facts", "ablate", "RUN", "--collateral-weight", "nan"], "argument --collateral-weight: must be at least 0, got nan"),
])
def test_numeric_options_out_of_range_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_a_failed_run_leaves_no_empty_folder(tmp_path, monkeypatch):
    from tspd import experiments

    def fail(*a, **k):
        raise ValueError("no such model")

    monkeypatch.setattr(experiments, "_target_for", fail)
    cfg = tspd.RunConfig.from_yaml(cli._recipe("tms-5-2"))
    with pytest.raises(ValueError, match="no such model"):
        experiments.decompose_from_config(cfg, tmp_path / "new" / "run")
    assert not (tmp_path / "new" / "run").exists()
    (tmp_path / "kept").mkdir()  # a folder that was there before stays
    with pytest.raises(ValueError):
        experiments.decompose_from_config(cfg, tmp_path / "kept")
    assert (tmp_path / "kept").is_dir()


def test_fresh_run_remakes_a_target_made_with_other_settings(tmp_path, capsys):
    """A fresh run in a used folder reuses the folder's target only when its recorded settings
    match; a resume always reuses it (the checkpoint's config check guards the rest)."""
    from safetensors.torch import load_file

    from tspd.experiments import _target_for

    out = tmp_path / "run"
    out.mkdir()
    base = tspd.RunConfig.from_yaml(cli._recipe("tms-5-2"), ["target.train_steps=10"])
    seed1, seed2 = (base.with_overrides([f"target.seed={s}"]) for s in (1, 2))
    w1 = _target_for(seed1, out).linear1.weight.detach().clone()
    assert torch.equal(load_file(out / "target.safetensors")["linear1.weight"], w1)
    assert _target_for(seed1, out).linear1.weight.equal(w1)  # same settings: reused
    w2 = _target_for(seed2, out).linear1.weight.detach().clone()
    assert not torch.equal(w1, w2) and "other target settings" in capsys.readouterr().err
    assert yaml_seed(out) == 2
    assert _target_for(seed1, out, resume=True).linear1.weight.equal(w2)  # resume: the folder's target


def yaml_seed(out):
    import yaml

    return yaml.safe_load((out / "target.yaml").read_text())["seed"]


def test_cli_prints_user_errors_without_a_traceback(tmp_path, capsys, monkeypatch, tms_run, induction_run):
    import shutil

    bad = tmp_path / "bad.json"
    bad.write_text('{"templates": ["{name} plays"]}')
    assert cli.main(["facts", "screen", "--facts", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tspd: error:") and "missing key" in err and "Traceback" not in err
    assert cli.main(["facts", "screen", str(tmp_path)]) == 2
    assert "takes no RUN_DIR" in capsys.readouterr().err
    assert cli.main(["causal", str(tms_run)]) == 2
    err = capsys.readouterr().err
    assert "needs an induction run" in err and "got tms" in err
    run = tmp_path / "induction"
    shutil.copytree(induction_run, run)
    (run / "census.json").unlink()
    assert cli.main(["causal", str(run)]) == 2
    assert "has no census.json; run `tspd census" in capsys.readouterr().err
    monkeypatch.setenv("TSPD_TRACEBACK", "1")
    with pytest.raises(ValueError, match="missing key"):
        cli.main(["facts", "screen", "--facts", str(bad)])


def test_training_curves_skip_the_line_a_running_training_is_writing(tmp_path, tms_run):
    from tspd.report.figures import training_curves_figure

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text((tms_run / "metrics.jsonl").read_text() + '{"step": 6, "loss": 0.1, "l0/linear1')
    out = training_curves_figure(metrics, tmp_path / "curves.png")
    assert out.exists() and out.stat().st_size > 1000


def test_cli_user_mistakes_fail_early_and_clearly(tmp_path, capsys, tms_run):
    # a misspelt --set key: blamed on the override, with the closest key
    assert cli.main(["run", "tms-5-2", "--out", str(tmp_path / "a"), "--set", "train.setps=3"]) == 2
    err = capsys.readouterr().err
    assert "(from --set train.setps=3)" in err and "did you mean 'train.steps'" in err
    assert cli.main(["run", "tms-5-2", "--out", str(tmp_path / "a"), "--set", "target.train_step=3"]) == 2
    assert "unknown key 'target.train_step'" in capsys.readouterr().err  # no internal 'tms' in the path
    # --resume on an empty folder, and a site pattern that matches nothing: refused before any target
    # is trained or file written
    assert cli.main(["run", "induction", "--out", str(tmp_path / "b"), "--resume"]) == 2
    assert "does not exist; drop --resume" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert cli.main(["run", "tms-5-2", "--out", str(tmp_path / "c"), "--set", "sites=[{pattern: 'nope*', C: 4}]"]) == 2
    assert "matches no module" in capsys.readouterr().err and not (tmp_path / "c").exists()
    # --resume without CONFIG but with overrides: the run folder's own config, overrides on top
    assert cli.main(["decompose", "--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "which does not exist" in capsys.readouterr().err
    # tspd report on a missing folder or a TMS run: an error, and no folder made
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "missing").exists()
    assert cli.main(["report", str(tms_run)]) == 2
    assert "is a 'tms' run" in capsys.readouterr().err and not (tms_run / "report.html").exists()
    assert cli.main(["census", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_resume_from_the_run_folder_config_with_overrides(tmp_path, capsys):
    out = tmp_path / "dec"
    sets = ["--set", "train.steps=4", "--set", "target.train_steps=10", "--set", "train.batch_size=64",
            "--set", "train.faithfulness_warmup_steps=5", "--set", "train.checkpoint_every=2"]
    assert cli.main(["decompose", "tms-5-2", "--out", str(out), *sets]) == 0
    assert cli.main(["decompose", "--out", str(out), "--resume", "--set", "train.steps=6"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 6
    assert "steps: 6" in (out / "config.yaml").read_text()


def test_api_run_refused_by_eval_with_a_message(tmp_path, capsys):
    cfg = make_cfg([("linear*", 4)], train={"steps": 2, "batch_size": 16, "faithfulness_warmup_steps": 1},
                   output={"divergence": "mse"})
    torch.manual_seed(0)
    tspd.decompose(TwoLayer(5, 3, 5), lambda step: torch.randn(16, 5), cfg, run_dir=tmp_path / "api", progress=False)
    assert cli.main(["eval", str(tmp_path / "api")]) == 2
    assert "made with the Python API" in capsys.readouterr().err


def test_written_files_follow_the_umask(tmp_path):
    import os
    import stat

    from tspd.decomposition import _FILE_MODE, write_json

    write_json(tmp_path / "x.json", {"a": 1})
    assert stat.S_IMODE(os.stat(tmp_path / "x.json").st_mode) == _FILE_MODE
    mask = os.umask(0)
    os.umask(mask)
    assert _FILE_MODE == 0o666 & ~mask and _FILE_MODE & 0o044 == 0o044 & ~mask  # group/other read unless umasked


def test_a_model_the_config_target_does_not_describe(tmp_path):
    """Python API: a config `target` that describes another model than the one given is refused
    before training (toy kinds: the saved run could not be loaded); a Hugging Face target, rebuilt
    from the config on load, is checked against the decomposed model's fingerprint."""
    from tspd.data.tms import TMSData
    from tspd.targets.huggingface import load_lm
    from tspd.targets.tms import TMSModel

    cfg = tspd.RunConfig.from_yaml(cli._recipe("tms-5-2"), ["train.steps=2", "train.faithfulness_warmup_steps=1"])
    with pytest.raises(ValueError, match=r"does not describe the model given \(linear1.weight: \(2, 6\) in the model, \(2, 5\)"):
        tspd.decompose(TMSModel(6, 2), TMSData(6, 0.1, 16), cfg, run_dir=tmp_path / "tms", progress=False)
    assert not (tmp_path / "tms").exists()

    model, _ = load_lm("tiny-gpt2", 0)
    raw = {"target": {"kind": "huggingface", "model": "tiny-gpt2"}, "seed": 0,
           "sites": [{"pattern": "transformer.h.0.mlp.c_fc", "C": 4}],
           "train": {"steps": 1, "batch_size": 2, "faithfulness_warmup_steps": 1, "eval_batches": 1}}
    cfg = tspd.RunConfig.from_dict(raw)
    batch = torch.randint(0, model.config.vocab_size, (2, 8))
    tspd.decompose(model, lambda step: batch, cfg, run_dir=tmp_path / "same", progress=False)
    assert tspd.load(tmp_path / "same").site_names == ["transformer.h.0.mlp.c_fc"]  # the same model: loads
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight.mul_(1.5)  # "my fine-tuned model"
    tspd.decompose(model, lambda step: batch, cfg, run_dir=tmp_path / "tuned", progress=False)
    with pytest.raises(ValueError, match="not the model this decomposition was trained on"):
        tspd.load(tmp_path / "tuned")
    dec = tspd.load(tmp_path / "tuned", target=model)
    assert dec.target is model


def test_readme_subpackage_paths_work_after_a_bare_import():
    """`tspd.app.serve(...)` and `tspd.analysis.metrics.evaluate(...)` as the README writes them."""
    import subprocess
    import sys

    code = "import tspd; print(callable(tspd.app.serve), callable(tspd.app.harvest), callable(tspd.analysis.metrics.evaluate))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "True", "True"], out.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tspd.nope  # noqa: B018


def test_ctrl_c_says_how_to_resume(tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    from tspd import experiments

    monkeypatch.setattr(experiments, "decompose_from_config", interrupted)
    assert cli.main(["decompose", "tms-5-2", "--out", str(tmp_path / "r")]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "tspd: interrupted"  # no checkpoint yet: nothing to resume
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "checkpoint.pt").write_bytes(b"")
    assert cli.main(["decompose", "tms-5-2", "--out", str(tmp_path / "r")]) == 130
    err = capsys.readouterr().err
    assert "interrupted; continue from the last checkpoint with the same command and --resume" in err
    assert "Traceback" not in err
    monkeypatch.setattr(experiments, "run_experiment", interrupted)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "tms-5-2").mkdir(parents=True)
    (tmp_path / "runs" / "tms-5-2" / "checkpoint.pt").write_bytes(b"")
    assert cli.main(["run", "tms-5-2"]) == 130  # the default run folder
    assert "--resume (run folder runs/tms-5-2)" in capsys.readouterr().err
