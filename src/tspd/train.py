"""The training loop: schedules, clipping, logging, evaluation, atomic checkpoints, exact resume.

Example:
    >>> import tspd
    >>> from tspd.targets.tms import train_tms
    >>> from tspd.data.tms import TMSData
    >>> target = train_tms(5, 2, 0.05, steps=200)
    >>> cfg = tspd.RunConfig.model_validate({"sites": [{"pattern": "linear*", "C": 10}],
    ...                                      "output": {"divergence": "mse"}, "train": {"steps": 20}})
    >>> dec = tspd.decompose(target, TMSData(5, 0.05, 256), cfg, progress=False)
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import inspect
import itertools
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from tqdm import tqdm

from tspd import distributed
from tspd.analysis.metrics import evaluate
from tspd.config import RunConfig
from tspd.decomposition import (
    Batch, Decomposition, _key, atomic_write_bytes, check_target_matches_config, position_mask, remove_leftover_temps,
    run_folder_lock, unreadable,
)
from tspd.losses import annealed_p, compute_losses, l0, model_device, pin_fast_bf16, resolve_autocast
from tspd.seeding import generator, legacy_streams, use_legacy_streams

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is left untouched."""


class DataStream:
    """Batches by step from a callable `data(step)` (or `data()`), or from an iterable.

    A callable of the step is exactly resumable, and its evaluation batches are steps -1, -2, ...
    (never used for training). From an iterable, the first `n_eval` batches are held out for
    evaluation and training reads on from there; a resume skips the batches already used, which is
    exact when the iterable replays the same sequence.
    """

    def __init__(self, data: Callable[..., Batch] | Iterable[Batch], n_eval: int, start_step: int = 0):
        self._call: Callable[[int], Batch] | None = None
        if callable(data) and not hasattr(data, "__iter__"):
            n_params = len(inspect.signature(data).parameters)
            self._call = (lambda step: data(step)) if n_params >= 1 else (lambda step: data())
            self.eval_batches = [self._call(-(i + 1)) for i in range(n_eval)]
            return
        self._iter = iter(data)
        self.eval_batches = list(itertools.islice(self._iter, n_eval))
        self._n_eval = len(self.eval_batches)
        for i in range(start_step):
            if next(self._iter, None) is None:
                raise RuntimeError(
                    f"the data iterable ran out at batch {i} while skipping the {start_step} batches a resumed run "
                    f"already used; resume with the same (or a longer) data source"
                )

    def held_out(self, n: int | None) -> list[Batch]:
        """`n` batches never used for training: the evaluation batches, continued with steps
        -(n_eval + 1), -(n_eval + 2), ... of a callable source (an iterable has only its evaluation
        batches). None: the evaluation batches."""
        if n is None or self._call is None or n <= len(self.eval_batches):
            return self.eval_batches if n is None else self.eval_batches[:n]
        return self.eval_batches + [self._call(-(i + 1)) for i in range(len(self.eval_batches), n)]

    def batch(self, step: int) -> Batch:
        if self._call is not None:
            return self._call(step)
        try:
            return next(self._iter)
        except StopIteration:
            raise RuntimeError(
                f"the data iterable ran out at step {step}, after the first {self._n_eval} batches went to evaluation "
                "(train.eval_batches); make it longer or infinite (e.g. itertools.cycle, or a callable data(step))") from None


def tune_cpu_allocator() -> None:
    """Keep freed memory in glibc's heap instead of returning large blocks to the OS, so the big
    per-step tensors reuse pages rather than fault in fresh ones (measured: 217 -> 157 ms per step
    on the induction vector_mlp benchmark). A no-op where glibc is absent."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve blocks up to 1 GiB from the heap
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: trim the heap only above 2 GiB free
    except (OSError, AttributeError):
        pass


def restore_cpu_allocator() -> None:
    """After a run: the free heap handed back to the OS, and thresholds that keep a notebook or
    server process from holding gigabytes it freed. glibc's own dynamic thresholds cannot be turned
    back on once set (fixing them at their 128 KiB start made every later 1 MiB tensor an mmap: 26x
    slower in a loop), so they are set to the ceilings the dynamic ones rise to (32 MiB mmap, 64 MiB trim)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def _process_settings_kept() -> Iterator[None]:
    """What a run sets for its whole process (torch's thread count, the malloc thresholds, the
    random streams' mixer and the bf16 measurement a resumed checkpoint pins) put back when it
    returns, so that later work in the same process (a notebook, a server, the next run) is as
    before it."""
    from tspd import seeding
    from tspd import losses as losses_module

    threads, legacy, bf16 = torch.get_num_threads(), seeding._legacy, losses_module._PINNED_FAST_BF16
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        use_legacy_streams(legacy)
        pin_fast_bf16(bf16)
        restore_cpu_allocator()


def lr_at(cfg: RunConfig, step: int) -> float:
    t = cfg.train
    warm = int(t.warmup_frac * t.steps)
    if step < warm:
        return t.lr * (step + 1) / warm
    frac = (step - warm) / max(t.steps - warm, 1)
    cos = 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    return t.lr * (t.final_lr_frac + (1 - t.final_lr_frac) * cos)


def make_optimizer(dec: Decomposition) -> torch.optim.Optimizer:
    """Adam or AdamW over U, V and the CI parameters, with torch's fused kernel where it takes
    them (one loop per step: 253 vs 941 us for the tiny GPT-2 benchmark's 0.8 M parameters, 2
    threads), else the default (foreach) one."""
    t = dec.config.train
    kind, kw = (torch.optim.AdamW, {"weight_decay": t.weight_decay}) if t.optimizer == "adamw" else (torch.optim.Adam, {})
    params = list(dec.parameters())
    # torch checks devices and dtypes only at the first step(), so check them here.
    fusable = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
    if fusable:
        try:
            return kind(params, lr=t.lr, fused=True, **kw)
        except (RuntimeError, ValueError):
            pass
    return kind(params, lr=t.lr, **kw)


def faithfulness_warmup(dec: Decomposition) -> None:
    """Fit V U to W on the faithfulness loss alone, with its own optimiser (not checkpointed)."""
    t = dec.config.train
    params = [p for c in dec.factors.values() for p in c.parameters()]
    opt = torch.optim.AdamW(params, lr=t.faithfulness_warmup_lr, weight_decay=0.1)
    for _ in range(t.faithfulness_warmup_steps):
        loss = dec.faithfulness()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def optimizer_step(dec: Decomposition, opt: torch.optim.Optimizer, total: torch.Tensor) -> None:
    """Backward, optional clipping, one optimiser step."""
    opt.zero_grad(set_to_none=True)
    total.backward()
    if dec.config.train.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(dec.parameters(), dec.config.train.grad_clip)
    opt.step()


class _Step(torch.nn.Module):
    """One step's losses as a module call, so DistributedDataParallel can all-reduce its gradients."""

    def __init__(self, dec: Decomposition):
        super().__init__()
        self.dec = dec

    def forward(self, batch: Batch, step: int, gen: torch.Generator):
        return compute_losses(self.dec, batch, step, gen)


def _step_fn(dec: Decomposition, w: distributed.World, device: torch.device) -> torch.nn.Module:
    if not w.parallel:
        return _Step(dec)
    from torch.nn.parallel import DistributedDataParallel

    # The constructor broadcasts rank 0's parameters; the target is outside the module tree.
    return DistributedDataParallel(
        _Step(dec), device_ids=[device] if device.type == "cuda" else None, forward_sync_buffers=False
    )


def _consolidate(
    dec: Decomposition, opt: torch.optim.Optimizer, stream: "DataStream", device: torch.device, w: distributed.World,
    final: bool = False,
) -> list[dict]:
    """Merge co-active subcomponents (tspd.consolidate) on `consolidate.batches` held-out batches,
    which every rank draws alike, so all ranks make the same merges (checked). The rewritten pieces (their V
    columns, U rows and CI output bias) restart their first Adam moment from zero and take their second from the mean
    of the untouched entries of the same tensor: zeroing both under a bias correction near 1 (the step count is the
    tensor's) made their steps up to ~6x lr for hundreds of steps."""
    from tspd.consolidate import consolidate

    c = dec.config.consolidate
    batches = [distributed.to_device(b, device) for b in stream.held_out(c.batches)]
    merges = consolidate(dec, batches, c.tol, c.overlap, c.max_increase, c.prune, final=final)
    for m in merges:
        comp, idx = dec.component(m.site), torch.tensor(m.slots)
        for p, along_columns in ((comp.V, True), (comp.U, False), (dec.ci_fns[_key(m.site)].output_bias(), False)):
            state = opt.state.get(p, {})
            if "exp_avg" not in state:
                continue
            # Pieces along dim 0 (V's columns through a transposed view, which writes through).
            m1, m2 = (state[k].T if along_columns else state[k] for k in ("exp_avg", "exp_avg_sq"))
            keep = torch.ones(m2.shape[0], dtype=torch.bool, device=m2.device)
            keep[idx] = False
            m1[idx] = 0
            if bool(keep.any()):
                m2[idx] = m2[keep].mean(0, keepdim=True)
    distributed.check_in_sync(list(dec.parameters()), w)
    return [m.to_dict() for m in merges]


def _save_checkpoint(run_dir: Path, dec: Decomposition, opt: torch.optim.Optimizer, step: int) -> None:
    state = {
        "step": step,
        "decomposition": dec.state_dict(),
        "optimizer": opt.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "config": dec.config.model_dump(mode="json"),
        # What train.autocast resolved to: 'auto' times matmuls at start-up, and a resumed run must
        # use the dtype the checkpointed run used, whatever the new process measures.
        "autocast": resolve_autocast(dec.config.train.autocast, model_device(dec.target).type),
        # Likewise what train.fp32_matmul resolved to (another summation order: resume stays exact).
        "fp32_matmul_onednn": dec.onednn,
        "head_onednn": dec.head_onednn,  # and the fused head's own choice
        "legacy_streams": legacy_streams(),  # the random streams' mixer (tspd.seeding)
    }
    atomic_write_bytes(run_dir / CHECKPOINT, lambda p: torch.save(state, p))


def _load_checkpoint(run_dir: Path, dec: Decomposition, opt: torch.optim.Optimizer) -> int:
    # Onto the CPU: load_state_dict copies each tensor to its parameter's device (a run may resume on
    # another device, and under DDP every rank would otherwise load onto the saving rank's GPU).
    try:
        state = torch.load(run_dir / CHECKPOINT, weights_only=False, map_location="cpu")
        state["config"], state["step"]
    except Exception as e:
        raise unreadable(run_dir / CHECKPOINT, e, "Delete it and start the run afresh (without --resume), or restore "
                         "it from a copy") from e
    saved = RunConfig.model_validate(state["config"])
    diff = _first_difference(saved.with_absolute_paths().model_dump(exclude={"train"}),  # a run from before paths were
                             dec.config.with_absolute_paths().model_dump(exclude={"train"}))  # made absolute: the same files
    if diff is not None:
        raise ValueError(
            f"{run_dir / CHECKPOINT} was written with a different config ({diff}); resume with the run's own "
            f"config.yaml, or start a new run folder"
        )
    # A checkpoint from before the streams' mixer was fixed (2026-12-03) drew from the legacy one.
    use_legacy_streams(bool(state.get("legacy_streams", True)))
    if dec.config.train.autocast == "auto" and model_device(dec.target).type == "cpu" and "autocast" in state:
        pin_fast_bf16(state["autocast"] == "bf16")
    if dec.config.train.fp32_matmul == "auto" and "fp32_matmul_onednn" in state:
        dec.set_onednn(state["fp32_matmul_onednn"])
        # A checkpoint from before the head had its own choice: its head followed the layers'.
        dec.set_head_onednn(state.get("head_onednn", False))
    dec.load_state_dict(state["decomposition"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """'key: X in the checkpoint, Y now' for the first dotted key where two config dumps differ, else None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            d = _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
            if d is not None:
                return d
        return None
    return None if a == b else f"{path}: {a!r} in the checkpoint, {b!r} now"


def require_checkpoint(run_dir: Path) -> None:
    """Raise the error a --resume without a checkpoint in `run_dir` gets."""
    if not (run_dir / CHECKPOINT).exists():
        raise FileNotFoundError(f"--resume given but {run_dir / CHECKPOINT} does not exist; drop --resume to start")


def metric_records(path: Path) -> tuple[list[tuple[str, dict]], int]:
    """The (line, record) pairs of a metrics.jsonl (none if it is absent), and how many of its
    non-empty lines are not JSON records (a write cut short, or being written by a running run)."""
    records, damaged = [], 0
    # (bytes that are not UTF-8, from outside damage: that line is then not JSON, dropped like a cut one)
    for ln in path.read_text(errors="replace").splitlines() if path.exists() else []:
        if not ln:
            continue
        try:
            row = json.loads(ln)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            records.append((ln, row))
        else:
            damaged += 1
    return records, damaged


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines from steps a resumed run will redo, and lines that are not JSON (a run killed
    mid-write, a full disk), with a warning naming the file."""
    if not path.exists():
        return
    records, damaged = metric_records(path)
    keep = [ln for ln, row in records if row.get("step", 0) < step]
    if damaged:
        warnings.warn(f"{path}: dropped {damaged} line(s) that are not JSON records (a write cut short?)", stacklevel=2)
    atomic_write_bytes(path, lambda p: Path(p).write_text("".join(k + "\n" for k in keep)))


def _check_trainable_dtype(target: torch.nn.Module) -> None:
    """Refuse an fp16 target: the factors, the CI and Adam's state take the target's dtype, and
    fp16's range underflows Adam's second moment (a tiny Llama in fp16 diverged within 3-8 steps,
    and its faithfulness warm-up went NaN in one)."""
    if any(p.dtype == torch.float16 for p in target.parameters()):
        raise ValueError(
            "the target is in float16, which tspd cannot train in (the factors, CI and optimizer state take the "
            "target's dtype, and fp16's range makes Adam's state underflow): give the model in float32 "
            "(model.float(); add train.autocast: bf16 for bf16 speed) or in bfloat16 (model.to(torch.bfloat16))")


def _holding_the_run_folder(fn):
    """`fn(target, data, config, run_dir, ...)` with `run_dir` held for writing (`run_folder_lock`,
    by rank 0) while it runs, once the target is known to match the config (before the folder is made)."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if not a["resume"]:
            a["config"].check_new_run()
        check_target_matches_config(a["target"], a["config"])  # else the saved run could not be loaded
        _check_trainable_dtype(a["target"])
        hold = a["run_dir"] is not None and distributed.world().main
        # Training needs autograd whatever the caller's context (a notebook cell under no_grad).
        with (run_folder_lock(a["run_dir"]) if hold else contextlib.nullcontext(), torch.inference_mode(False), torch.enable_grad(),
              _process_settings_kept()):
            return fn(*args, **kwargs)

    return run


@_holding_the_run_folder
def decompose(
    target: torch.nn.Module,
    data: Callable[..., Batch] | Iterable[Batch],
    config: RunConfig,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> Decomposition:
    """Decompose `target`'s sites (config.sites) on batches from `data`; returns the Decomposition.

    With `run_dir`, writes config.yaml, metrics.jsonl, eval.json, checkpoints and the final
    decomposition there; `resume=True` continues from the last checkpoint, bit-identically on CPU.
    `stop_after=k` stops (after checkpointing) once step k is done, as a kill would.
    Under torchrun (several processes) it trains data-parallel: see tspd.distributed; rank 0
    writes every file and every rank returns the same Decomposition; the run folder is held for
    writing meanwhile (a second process writing a run there fails at once).
    """
    device = model_device(target)
    w = distributed.init(device)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    distributed.agree_on_autocast(config.train.autocast, device, w)  # after the thread count: it times matmuls
    tune_cpu_allocator()
    torch.manual_seed(config.seed)
    dec = Decomposition(target, config)
    distributed.agree_on_onednn(dec, device, w)
    opt = make_optimizer(dec)
    run_path = Path(run_dir) if run_dir is not None else None
    writes = run_path is not None and w.main
    start = 0
    use_legacy_streams(None)  # a fresh run: the environment's mixer (a resume takes its checkpoint's)
    if run_path is not None:
        if resume and (run_path / CHECKPOINT).exists():
            start = _load_checkpoint(run_path, dec, opt)
            if start > config.train.steps:
                raise ValueError(f"{run_path / CHECKPOINT} is at step {start}, past train.steps={config.train.steps}: "
                                 f"resume with train.steps >= {start}, or start a new run folder")
        elif resume:
            require_checkpoint(run_path)
        elif w.main and (run_path / CHECKPOINT).exists():
            # A fresh run in a used folder: an earlier run's checkpoint must not be what a later
            # --resume of this run picks up (the config check ignores the train section).
            print(f"tspd: starting afresh in {run_path}; removing the earlier run's {CHECKPOINT}", file=sys.stderr)
            (run_path / CHECKPOINT).unlink()
    if writes:
        run_path.mkdir(parents=True, exist_ok=True)
        remove_leftover_temps(run_path)  # writes cut off by a kill (checkpoint, decomposition, figures, ...)
        atomic_write_bytes(run_path / "config.yaml", lambda p: Path(p).write_text(config.to_yaml()))
        if config.target is None and not (start > 0 and (run_path / "target_module.pt").exists()):
            # A model from Python: saved once, now, so one that cannot be fails before training, not after.
            try:
                atomic_write_bytes(run_path / "target_module.pt", lambda p: torch.save(target, p))
            except Exception as e:
                raise TypeError(
                    f"the target cannot be saved with torch.save ({type(e).__name__}: {e}), and {run_path} must hold it "
                    "for the run to be loaded again: keep lambdas, local classes and open handles out of the model's "
                    "attributes, or decompose without run_dir") from e
        _truncate_metrics(run_path / METRICS, start)
    if start == 0:
        faithfulness_warmup(dec)
    step_fn = _step_fn(dec, w, device)
    stream = DataStream(data, config.train.eval_batches, start)
    eval_batches = [distributed.to_device(b, device) for b in stream.eval_batches] if w.main else []
    metrics_file = open(run_path / METRICS, "a") if writes else None
    t = config.train
    merge_steps = config.consolidate.steps(t.steps)
    last_good = start
    bar = tqdm(
        range(start, t.steps), initial=start, total=t.steps, disable=not (progress and w.main), desc="spd", dynamic_ncols=True
    )

    def consolidate_and_log(step: int) -> None:
        merged = _consolidate(dec, opt, stream, device, w, final=step == t.steps)
        if metrics_file:
            metrics_file.write(json.dumps({"step": step, "consolidate": merged}) + "\n")
            metrics_file.flush()

    def evaluate_and_log(step: int) -> None:
        ev = evaluate(dec, eval_batches)
        if metrics_file:
            metrics_file.write(json.dumps({"step": step, "eval": ev}) + "\n")
            metrics_file.flush()
            atomic_write_bytes(run_path / "eval.json", lambda p: Path(p).write_text(json.dumps(ev, indent=2)))

    # Each rank draws its own masks; a 1-process run keeps the stream it always had.
    rank_stream = (w.rank,) if w.parallel else ()
    try:
        for step in bar:
            if step in merge_steps:
                consolidate_and_log(step)
            lr = lr_at(config, step)
            for group in opt.param_groups:
                group["lr"] = lr
            batch = distributed.to_device(distributed.shard(stream.batch(step), w), device)
            total, terms, ci = step_fn(batch, step, generator(config.seed, step, 202, *rank_stream))
            loss = distributed.mean_over_ranks({"loss": float(total.detach())}, w, device)["loss"]
            if not math.isfinite(loss):
                has_ckpt = run_path is not None and (run_path / CHECKPOINT).exists()
                where = f"; the last good checkpoint (step {last_good}) in {run_path} is intact" if has_ckpt else ""
                raise TrainingDiverged(
                    f"loss became {loss} at step {step} (terms: {terms}){where}. Lower train.lr, set "
                    "train.grad_clip, or check the data for NaN/Inf, then "
                    + ("resume with --resume." if has_ckpt else "start again.")
                )
            optimizer_step(dec, opt, total)
            done = step + 1
            if step % t.log_every == 0 or done == t.steps:
                keep = position_mask(batch)
                l0s = {s: float(l0(g.detach(), config.eval.active_threshold, keep)) for s, g in ci.items()}
                terms = distributed.mean_over_ranks(terms, w, device)
                row: dict[str, Any] = {"step": step, "lr": lr, "p": annealed_p(config, step), "loss": loss, **terms}
                row["l0"] = distributed.mean_over_ranks(l0s, w, device)
                bar.set_postfix({k: f"{v:.3g}" for k, v in terms.items()} | {"L0": f"{sum(row['l0'].values()):.1f}"})
                if metrics_file:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
            if w.main and (done % t.eval_every == 0 or done == t.steps):
                evaluate_and_log(step)
            if writes and (done % t.checkpoint_every == 0 or done == t.steps or done == stop_after):
                _save_checkpoint(run_path, dec, opt, done)
                last_good = done
            if stop_after is not None and done >= stop_after:
                distributed.check_in_sync(list(dec.parameters()), w)
                return dec
        if t.steps in merge_steps:  # at_frac 1.0: after the last step (the final checkpoint is from before it,
            # so a resumed finished run redoes this same deterministic merge)
            consolidate_and_log(t.steps)
            if w.main:
                evaluate_and_log(t.steps)
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    distributed.check_in_sync(list(dec.parameters()), w)
    if writes:
        dec.save(run_path, target=config.target is not None)  # (a Python model was saved at the start)
    if w.parallel:  # every rank returns once rank 0's files are written
        torch.distributed.barrier()
    return dec
