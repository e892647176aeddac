"""Experiments end to end, as library functions the CLI calls.

Example:
    >>> from tspd.experiments import run_experiment
    >>> run_experiment("configs/tms-5-2.yaml", "runs/tms-5-2")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from tspd import distributed
from tspd.components import resolve_sites
from tspd.config import ConfigError, RunConfig
from tspd.decomposition import (
    Decomposition, atomic_write_bytes, load, remove_leftover_temps, run_folder_lock, save_state, write_json,
)
from tspd.targets import build_data, build_target, saved_with_run
from tspd.train import DataStream, decompose, require_checkpoint


ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TARGET_EXTRAS = ("target_history.json", "target_loss_curve.png")



def _target_settings(tcfg) -> dict:
    return {k: v for k, v in tcfg.model_dump().items() if k != "path"}


def shipped_target(tcfg) -> Path | None:
    """The shipped trained target (src/tspd/assets/<kind>-seed<N>/) whose saved settings equal
    `tcfg`'s (ignoring `path`), or None."""
    for folder in sorted(ASSETS_DIR.glob(f"{tcfg.kind}-*")):
        meta = folder / "target.yaml"
        if meta.exists() and yaml.safe_load(meta.read_text()) == _target_settings(tcfg):
            return folder
    return None


def _target_for(cfg: RunConfig, out: Path, resume: bool = False):
    """Reuse the run folder's target when resuming or when it was made with the same target
    settings (recorded in the folder's target.yaml); else load target.path, else a shipped target
    with the same settings, else train one; save it and its settings in the run folder first."""
    import shutil

    if cfg.target is None:
        raise ConfigError("the config has no `target` section; the CLI needs one (the Python API takes a model)")
    if not saved_with_run(cfg.target):
        return build_target(cfg.target)
    path, meta = out / "target.safetensors", out / "target.yaml"
    settings = cfg.target.model_dump(mode="json")
    if path.exists():
        try:
            recorded = yaml.safe_load(meta.read_text()) if meta.exists() else None
        except yaml.YAMLError:
            recorded = None  # damaged: treated as other settings
        if resume or recorded == settings:
            target = build_target(cfg.target, train=False)
            try:
                target.load_state_dict(load_file(path))
                return target
            except Exception as e:  # cut short or overwritten: made again (the same settings make the same target)
                print(f"tspd: {path} cannot be read ({type(e).__name__}); making the target afresh", file=sys.stderr)
        else:
            print(f"tspd: {path} was made with other target settings; making the target afresh", file=sys.stderr)
        if distributed.world().main:
            for name in TARGET_EXTRAS:
                (out / name).unlink(missing_ok=True)
    if cfg.target.kind == "induction" and cfg.target.path is None:
        folder = shipped_target(cfg.target)
        if folder is not None:
            print(f"using the shipped induction target {folder.name} (settings match)")
            target = build_target(cfg.target, train=False)
            target.load_state_dict(load_file(folder / "target.safetensors"))
            for name in TARGET_EXTRAS:
                if (folder / name).exists() and distributed.world().main:
                    shutil.copyfile(folder / name, out / name)
        else:
            target = _train_induction_target(cfg.target, out)
    else:
        target = build_target(cfg.target)
    if distributed.world().main:
        save_target_pair(target, path, settings)
    return target


def save_target_pair(target, path: Path, settings: dict) -> None:
    """The target's weights and the settings they were made with: the settings file goes first
    and comes back last, so a kill in between never leaves weights under settings they lack."""
    meta = path.with_name("target.yaml")
    meta.unlink(missing_ok=True)
    save_state(target, path)
    atomic_write_bytes(meta, lambda p: Path(p).write_text(yaml.safe_dump(settings)))


def decompose_from_config(
    cfg: RunConfig, out: str | Path, resume: bool = False, progress: bool = True, stop_after: int | None = None
) -> Decomposition:
    """Build the config's target and data, then decompose into `out` (see tspd.train.decompose)."""
    out = Path(out)
    cfg = cfg.with_absolute_paths()
    # Bad input fails before any slow work (training a toy target takes minutes) and before writes.
    if resume:
        require_checkpoint(out)
    else:
        cfg.check_new_run()
    if cfg.data is None:
        raise ValueError("the config has no `data` section; the CLI needs one (the Python API takes a data source)")
    distributed.check_split(cfg.train.batch_size, distributed.world())  # under torchrun
    if cfg.target is not None and cfg.target.kind in ("tms", "induction"):
        resolve_sites(build_target(cfg.target, train=False), [(s.pattern, s.C) for s in cfg.sites])  # untrained: instant
    device = distributed.device_for(cfg.train.device)  # no GPU for train.device=cuda: named before a target trains
    if resume:
        check_resume_config(cfg, out)
    if cfg.data.kind == "text" and cfg.target is not None and cfg.target.kind == "huggingface":
        from tspd.targets.huggingface import context_length

        _check_context(cfg, context_length(cfg.target.model))  # from config.json: before anything in `out` moves
    # Built before anything in `out` moves: a text source too short, a missing file, fail first.
    data = build_data(cfg.data, cfg.target, cfg.train.batch_size, cfg.seed)
    main = distributed.world().main
    # Held from here to the end: a second process writing a run into `out` fails at once (and a run
    # that fails before writing anything leaves no folder it made: see run_folder_lock).
    with run_folder_lock(out) if main else contextlib.nullcontext():
        out.mkdir(parents=True, exist_ok=True)
        if not resume and main:
            set_aside_earlier_outputs(out, keep=_paths_in_config(cfg))
        target = _target_for(cfg, out, resume).to(device)
        if cfg.data.kind == "text":  # again on the model itself (a model not yet fetched had no config.json to read)
            from tspd.targets.huggingface import max_positions

            _check_context(cfg, max_positions(getattr(target, "config", None)))
        return decompose(target, data, cfg, run_dir=out, resume=resume, progress=progress, stop_after=stop_after)


def _check_context(cfg: RunConfig, ctx: int | None) -> None:
    if isinstance(ctx, int) and cfg.data.seq_len > ctx:
        raise ValueError(f"data.seq_len {cfg.data.seq_len} is longer than the model's context ({ctx} positions); "
                         f"set data.seq_len <= {ctx}")


def check_resume_config(cfg: RunConfig, out: Path) -> None:
    """A --resume whose config differs from the run's own (its config.yaml) outside `train` is
    refused before anything loads (the target of another recipe would fail with a shape error)."""
    from tspd.train import _first_difference

    own = out / "config.yaml"
    if not own.exists():
        return
    try:
        saved = RunConfig.from_yaml(own)
    except Exception:
        return  # the checkpoint's own copy of the config is compared when it loads
    diff = _first_difference(saved.with_absolute_paths().model_dump(exclude={"train"}),
                             cfg.with_absolute_paths().model_dump(exclude={"train"}))
    if diff is not None:
        raise ValueError(f"{out} holds a run of a different config ({diff}); resume with the run's own config "
                         "(its config.yaml), or start a new run folder")
    old, new = saved.train.model_dump(), cfg.train.model_dump()
    changed = [f"train.{k} {old[k]!r} -> {new[k]!r}" for k in old if old[k] != new[k]]
    if changed and distributed.world().main:  # allowed (a longer run, other threads), but said: config.yaml keeps the new values
        print(f"tspd: resuming {out} with {', '.join(changed)} (steps before the checkpoint ran with the earlier values; "
              "metrics.jsonl has each step's lr)", file=sys.stderr)


def _paths_in_config(cfg: RunConfig) -> set[Path]:
    """Files the config reads (a text source, a target path): never moved aside."""
    paths = [getattr(cfg.data, "source", None), getattr(cfg.target, "path", None), getattr(cfg.target, "model", None)]
    return {Path(p).resolve() for p in paths if isinstance(p, (str, Path)) and p}


# The files a fresh decomposition leaves in place in a folder holding an earlier run: its target
# (reused when the settings match, see _target_for; set_aside_earlier_outputs copies it along).
KEPT_ON_FRESH_START = ("target.safetensors", "target.yaml", *TARGET_EXTRAS)
PREVIOUS_PREFIX = "previous-"
PARTIAL_ASIDE = ".previous-partial"


def set_aside_earlier_outputs(out: Path, keep: set[Path] = frozenset()) -> Path | None:
    """Before a fresh decomposition in a folder that holds an earlier run (its config.yaml or
    checkpoint), move that run's files (results, figures, harvest, reports, its decomposition) into
    `out/previous-<UTC time>/`, with a copy of its target, so nothing stale is read as this run's,
    nothing is lost, and the earlier run still loads from there. Subfolders, hidden files and the
    files in `keep` (what the new config reads) stay. The files gather in `out/.previous-partial/`,
    renamed to its final name once all are in: a kill midway leaves that folder, which the next
    fresh run completes (no half of a run in one folder and half in another). Returns the folder
    they went to (None: nothing to move)."""
    partial = out / PARTIAL_ASIDE
    if not ((out / "config.yaml").exists() or (out / "checkpoint.pt").exists() or partial.is_dir()):
        return None
    if partial.is_dir():
        remove_leftover_temps(partial)  # a target copy a kill cut short there
    moving = [p for p in out.iterdir() if p.is_file() and not p.name.startswith(".")
              and p.name not in KEPT_ON_FRESH_START and p.resolve() not in keep]
    if not moving and not partial.is_dir():
        return None
    partial.mkdir(exist_ok=True)
    for name in KEPT_ON_FRESH_START:  # the earlier run's target, so that the set-aside run loads
        if (out / name).is_file() and not (partial / name).exists():
            atomic_write_bytes(partial / name, lambda tmp, name=name: shutil.copy2(out / name, tmp))
    for p in moving:
        p.rename(partial / p.name)
    aside = out / (PREVIOUS_PREFIX + time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    n = 1
    while aside.exists():
        n += 1
        aside = aside.with_name(f"{aside.name.split('.')[0]}.{n}")
    partial.rename(aside)
    count = sum(1 for p in aside.iterdir() if p.name not in KEPT_ON_FRESH_START)
    print(f"tspd: starting afresh in {out}; the earlier run's {count} files moved to {aside}", file=sys.stderr)
    return aside


def train_target(recipe: str | Path, out: str | Path, seed: int | None = None, overrides: list[str] | None = None) -> Path:
    """Train the target of a recipe (name in configs/ or path) and save it with its settings."""
    from tspd.cli import _recipe
    from tspd.config import read_yaml

    raw = read_yaml(_recipe(str(recipe)))
    raw["target"].pop("path", None)
    # --set keys are the target's (train_steps=2000); target.train_steps=2000 is taken too, and errors
    # name every key in that full form.
    full = []
    for item in overrides or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        full.append(f"{key if key.startswith('target.') else 'target.' + key}{sep}{value}" if sep else item)
    if seed is not None:
        full.append(f"target.seed={seed}")
    cfg = RunConfig.from_dict(raw, full, source=str(recipe))
    out = Path(out)
    if out.exists() and not out.is_dir():  # before the training (minutes), not after
        raise ConfigError(f"{out} is a file, not a folder: give the target a folder (--out DIR)")
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        target = _train_induction_target(cfg.target, out) if cfg.target.kind == "induction" else build_target(cfg.target)
    except BaseException:
        if made and not any(out.iterdir()):
            out.rmdir()  # a failed start leaves no empty folder behind
        raise
    save_target_pair(target, out / "target.safetensors", _target_settings(cfg.target))
    return out / "target.safetensors"


def _train_induction_target(tcfg, out: Path):
    """Train the induction target, writing its history and the loss-curve figure beside it."""
    from tspd.report.figures import loss_curve_figure
    from tspd.targets.induction import phase_change_step, train_from_config

    model, history = train_from_config(tcfg, progress=True)
    final = history[-1] if history else {}
    summary = {"phase_change_step": phase_change_step(history), "final": final, "history": history}
    if distributed.world().main:  # every rank trains the same target; one writes it
        write_json(out / "target_history.json", summary)
        loss_curve_figure(history, summary["phase_change_step"], out / "target_loss_curve.png")
    if final.get("accuracy", 0.0) < tcfg.target_accuracy:
        raise RuntimeError(
            f"the induction target reached accuracy {final.get('accuracy')} < {tcfg.target_accuracy} in "
            f"{tcfg.max_steps} steps; raise target.max_steps, change target.seed, or lower target.target_accuracy "
            f"(the bar before decomposing; 0.99 by default)"
        )
    return model


def evaluate_run(run_dir: str | Path) -> dict:
    """Re-evaluate a finished run: the training evaluation plus, for TMS targets, MMCS/ML2R."""
    from tspd.analysis.metrics import evaluate

    run_dir = Path(run_dir)
    dec = load(run_dir)
    cfg = dec.config
    if cfg.target is None or cfg.data is None:
        raise ConfigError(
            f"{run_dir} was made with the Python API (its config has no target/data section), so the CLI cannot "
            "rebuild its data; from Python: tspd.analysis.metrics.evaluate(tspd.load(run_dir), batches)"
        )
    data = build_data(cfg.data, cfg.target, cfg.train.batch_size, cfg.seed)
    batches = DataStream(data, cfg.train.eval_batches).eval_batches
    result = {"eval": evaluate(dec, batches)}
    if cfg.target is not None and cfg.target.kind == "induction":
        result["induction"] = induction_analysis(run_dir, dec)
    if cfg.target is not None and cfg.target.kind == "tms":
        from tspd.analysis.tms import tms_metrics
        from tspd.report.figures import tms_figure

        result["tms"] = tms_metrics(dec, batches, "linear1")
        tms_figure(dec, batches, run_dir / "tms_subcomponents.png")
    write_json(run_dir / "results.json", result)
    return result


def census_run(run_dir: str | Path, dec: Decomposition | None = None, n_sequences: int = 2000) -> dict:
    """The circuit census of an induction run: writes census.json and census_heatmap.png."""
    from tspd.analysis.induction import census
    from tspd.report.figures import census_figure

    run_dir = Path(run_dir)
    dec = dec or load(run_dir)
    table = census(dec, n_sequences=n_sequences, seed=dec.config.seed)
    write_json(run_dir / "census.json", table)
    census_figure(table, run_dir / "census_heatmap.png")
    return table


def causal_run(run_dir: str | Path, dec: Decomposition | None = None, table: dict | None = None) -> dict:
    """Ablate each site's active subcomponents: writes causal.json and causal_check.png."""
    from tspd.analysis.induction import causal_check, task_of
    from tspd.report.figures import causal_figure

    run_dir = Path(run_dir)
    dec = dec or load(run_dir)
    task_of(dec)  # an induction run, or a clear error naming its kind
    if table is None:
        if not (run_dir / "census.json").exists():
            raise ConfigError(f"{run_dir} has no census.json; run `tspd census {run_dir}` first")
        table = json.loads((run_dir / "census.json").read_text())
    check = causal_check(dec, table, seed=dec.config.seed)
    write_json(run_dir / "causal.json", check)
    causal_figure(check, run_dir / "causal_check.png")
    return check


def baseline_run(run_dir: str | Path, dec: Decomposition | None = None, table: dict | None = None) -> dict:
    """The greedy rank-1 SVD baseline at SPD's CI-masked KL: writes baseline.json and baseline.png.
    Runs the census first when the run folder has no census.json."""
    from tspd.analysis.induction import svd_baseline
    from tspd.report.figures import baseline_figure

    run_dir = Path(run_dir)
    dec = dec or load(run_dir)
    if table is None:
        census_path = run_dir / "census.json"
        table = json.loads(census_path.read_text()) if census_path.exists() else census_run(run_dir, dec)
    result = svd_baseline(dec, seed=dec.config.seed, progress=True)  # the bar: SPD's KL on the baseline's own sequences
    result["spd_kl_census"] = table["recon_kl_ci_masked"]
    result["spd_active_per_token"] = table["active_per_token"]
    result["spd_active_per_input"] = table["active_per_input"]
    result["spd_total_distinct"] = table["total_distinct"]
    needed = result["pieces_needed"]
    result["spd_fewer_per_input"] = needed is None or table["active_per_input"] < needed
    write_json(run_dir / "baseline.json", result)
    baseline_figure(result, table, run_dir / "baseline.png")
    return result


def induction_analysis(run_dir: str | Path, dec: Decomposition | None = None) -> dict:
    """Census, causal check, SVD baseline and report.html for an induction run."""
    from tspd.analysis.induction import check_circuit
    from tspd.report.induction import induction_report

    run_dir = Path(run_dir)
    dec = dec or load(run_dir)
    table = census_run(run_dir, dec)
    check = causal_run(run_dir, dec, table)
    baseline = baseline_run(run_dir, dec, table)
    checks = check_circuit(table)
    induction_report(run_dir)
    return {
        "circuit_checks": checks,
        "circuit_recovered": all(checks.values()),
        "total_distinct": table["total_distinct"],
        "accuracy": table["accuracy"],
        "svd_pieces_needed": baseline["pieces_needed"],
        "spd_active_per_input": table["active_per_input"],
        "causal_accuracy_after_ablation": {s: r["active"]["accuracy"] for s, r in check["sites"].items()},
    }


def run_experiment(recipe: str | Path, out: str | Path, overrides: list[str] | None = None, resume: bool = False) -> dict:
    """Target, decomposition, metrics and figures for one recipe; returns the results with timings."""
    cfg = RunConfig.from_yaml(recipe, overrides)
    t0 = time.time()
    if not distributed.world().main:
        decompose_from_config(cfg, out, resume=resume)
        return {}
    # The folder is held through the analysis too: a run starting there meanwhile would set this
    # run's decomposition aside and have its results written next to the other's.
    with run_folder_lock(out):
        decompose_from_config(cfg, out, resume=resume)
        if cfg.train.threads:  # the analysis on the run's thread count too (decompose puts the process's back)
            torch.set_num_threads(cfg.train.threads)
        t1 = time.time()
        result = evaluate_run(out)
        result["seconds"] = {"decomposition": round(t1 - t0, 1), "analysis": round(time.time() - t1, 1)}
        write_json(Path(out) / "results.json", result)
    return result
