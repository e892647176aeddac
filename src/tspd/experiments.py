"""Experiments end to end, as library functions the CLI calls.

Example:
    >>> from tspd.experiments import run_experiment
    >>> run_experiment("configs/tms-5-2.yaml", "runs/tms-5-2")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file

from tspd.config import RunConfig, apply_overrides
from tspd.decomposition import Decomposition, atomic_write_bytes, load, save_state
from tspd.targets import build_data, build_target
from tspd.train import DataStream, decompose


def _target_for(cfg: RunConfig, out: Path):
    """Reuse the run folder's target when it exists (resume), else build it and save it first."""
    if cfg.target is None:
        raise ValueError("the config has no `target` section; the CLI needs one (the Python API takes a model)")
    path = out / "target.safetensors"
    if path.exists():
        target = build_target(cfg.target, train=False)
        target.load_state_dict(load_file(path))
        return target
    target = build_target(cfg.target)
    save_state(target, path)
    return target


def decompose_from_config(cfg: RunConfig, out: str | Path, resume: bool = False, progress: bool = True) -> Decomposition:
    """Build the config's target and data, then decompose into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = _target_for(cfg, out)
    if cfg.data is None:
        raise ValueError("the config has no `data` section; the CLI needs one (the Python API takes a data source)")
    data = build_data(cfg.data, cfg.target, cfg.train.batch_size, cfg.seed)
    return decompose(target, data, cfg, run_dir=out, resume=resume, progress=progress)


def train_target(recipe: str | Path, out: str | Path, seed: int | None = None, overrides: list[str] | None = None) -> Path:
    """Train the target of a recipe (name in configs/ or path) and save it with its settings."""
    from tspd.cli import _recipe

    raw = yaml.safe_load(Path(_recipe(str(recipe))).read_text())
    target_raw = apply_overrides(raw["target"], overrides or [])
    if seed is not None:
        target_raw["seed"] = seed
    target_raw.pop("path", None)
    cfg = RunConfig.from_dict({**raw, "target": target_raw})
    out = Path(out)
    if cfg.target.kind == "induction":
        target = _train_induction_target(cfg.target, out)
    else:
        target = build_target(cfg.target)
    save_state(target, out / "target.safetensors")
    atomic_write_bytes(out / "target.yaml", lambda p: Path(p).write_text(yaml.safe_dump(cfg.target.model_dump())))
    return out / "target.safetensors"


def _train_induction_target(tcfg, out: Path):
    """Train the induction target, writing its history and the loss-curve figure beside it."""
    from tspd.data.induction import InductionTask
    from tspd.report.figures import loss_curve_figure
    from tspd.targets.induction import phase_change_step, train_induction

    task = InductionTask(tcfg.n_tokens, tcfg.seq_len)
    model, history = train_induction(
        task, tcfg.d_model, tcfg.batch_size, tcfg.lr, tcfg.weight_decay, tcfg.warmup_steps, tcfg.max_steps,
        tcfg.target_accuracy, seed=tcfg.seed, progress=True,
    )
    final = history[-1] if history else {}
    summary = {"phase_change_step": phase_change_step(history), "final": final, "history": history}
    atomic_write_bytes(out / "target_history.json", lambda p: Path(p).write_text(json.dumps(summary, indent=1)))
    loss_curve_figure(history, summary["phase_change_step"], out / "target_loss_curve.png")
    if final.get("accuracy", 0.0) < tcfg.target_accuracy:
        raise RuntimeError(
            f"the induction target reached accuracy {final.get('accuracy')} < {tcfg.target_accuracy} in "
            f"{tcfg.max_steps} steps; raise target.max_steps or change target.seed"
        )
    return model


def evaluate_run(run_dir: str | Path) -> dict:
    """Re-evaluate a finished run: the training evaluation plus, for TMS targets, MMCS/ML2R."""
    from tspd.analysis.metrics import evaluate

    run_dir = Path(run_dir)
    dec = load(run_dir)
    cfg = dec.config
    data = build_data(cfg.data, cfg.target, cfg.train.batch_size, cfg.seed)
    batches = DataStream(data, cfg.train.eval_batches).eval_batches
    result = {"eval": evaluate(dec, batches)}
    if cfg.target is not None and cfg.target.kind == "tms":
        from tspd.analysis.tms import tms_metrics
        from tspd.report.figures import tms_figure

        result["tms"] = tms_metrics(dec, batches, "linear1")
        tms_figure(dec, batches, run_dir / "tms_subcomponents.png")
    atomic_write_bytes(run_dir / "results.json", lambda p: Path(p).write_text(json.dumps(result, indent=2)))
    return result


def run_experiment(recipe: str | Path, out: str | Path, overrides: list[str] | None = None, resume: bool = False) -> dict:
    """Target, decomposition, metrics and figures for one recipe; returns the results with timings."""
    cfg = RunConfig.from_yaml(recipe, overrides)
    t0 = time.time()
    decompose_from_config(cfg, out, resume=resume)
    t1 = time.time()
    result = evaluate_run(out)
    result["seconds"] = {"decomposition": round(t1 - t0, 1), "analysis": round(time.time() - t1, 1)}
    atomic_write_bytes(Path(out) / "results.json", lambda p: Path(p).write_text(json.dumps(result, indent=2)))
    return result
