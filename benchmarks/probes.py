"""One-off probes behind benchmarks/README.md's "2026-12-01 (night)" section, on induction-shared-64.

    python -m benchmarks.probes scaling      # ms/step at batch 1, 4, 16, 64 (2 threads) and 1 vs 2 threads at 64
    python -m benchmarks.probes attention    # the toy target's attention shape: flash vs math vs bmm, 1 or 2 threads
    python -m benchmarks.probes threads      # two Python threads (1 intra-op thread each) on half batches
    python -m benchmarks.probes compiled-kl  # train.compile off vs on
"""

from __future__ import annotations

import statistics
import sys
import threading
import time

import torch
import torch.nn.functional as F

from tspd import bench
from tspd.decomposition import Decomposition
from tspd.losses import compute_losses
from tspd.seeding import generator
from tspd.train import faithfulness_warmup, make_optimizer, optimizer_step, tune_cpu_allocator


def _setup(batch_size: int, compile_kl: bool = False):
    sites = [{"pattern": f"blocks.*.attn.{p}_proj", "C": 100} for p in "qkv"]
    extra = {"train": {"compile": True}} if compile_kl else None
    cfg = bench._reference_config(sites, {"kind": "shared_mlp", "hidden": [16]}, batch_size, extra)
    torch.manual_seed(0)
    dec = Decomposition(bench._induction_target(), cfg)
    opt = make_optimizer(dec)
    faithfulness_warmup(dec)
    return dec, bench._induction_batch(batch_size), cfg, opt


def _median_ms(step, n: int = 25, warmup: int = 5) -> float:
    ts = []
    for i in range(n):
        t = time.perf_counter()
        step(i)
        ts.append(time.perf_counter() - t)
    return 1000 * statistics.median(ts[warmup:])


def _step_ms(batch_size: int, threads: int, compile_kl: bool = False) -> float:
    torch.set_num_threads(threads)
    dec, batch, cfg, opt = _setup(batch_size, compile_kl)

    def step(i):
        total, _, _ = compute_losses(dec, batch, i, generator(cfg.seed, i, 202))
        optimizer_step(dec, opt, total)

    return _median_ms(step, n=30 if compile_kl else 25, warmup=10 if compile_kl else 5)


def scaling() -> None:
    for bs in (1, 4, 16, 64):
        print(f"batch {bs}, 2 threads: {_step_ms(bs, 2):.1f} ms/step")
    print(f"batch 64, 1 thread: {_step_ms(64, 1):.1f} ms/step")


def attention() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(256, 1, 64, 16, requires_grad=True) for _ in range(3))
    causal = torch.ones(64, 64, dtype=torch.bool).tril()

    def flash():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    def math():
        with sdpa_kernel(SDPBackend.MATH):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    def bmm():
        s = (q @ k.transpose(-1, -2)) * 0.25
        (s.masked_fill(~causal, float("-inf")).softmax(-1) @ v).sum().backward()

    for threads in (1, 2):
        torch.set_num_threads(threads)
        print(threads, "thread(s):", ", ".join(f"{f.__name__} {_median_ms(lambda i, f=f: f(), 35):.2f} ms" for f in (flash, math, bmm)))


def threads() -> None:
    torch.set_num_threads(1)
    halves = [_setup(32) for _ in range(2)]

    def work(j, i):
        dec, batch, cfg, _ = halves[j]
        compute_losses(dec, batch, i, generator(cfg.seed, i, 202 + j))[0].backward()

    def step(i):
        ts = [threading.Thread(target=work, args=(j, i)) for j in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        for _, _, _, opt in halves:
            opt.step()
            opt.zero_grad()

    print(f"2 Python threads x half batch (32), 1 intra-op thread each: {_median_ms(step):.1f} ms/step")


def compiled_kl() -> None:
    print(f"train.compile off: {_step_ms(64, 2):.1f} ms/step, on: {_step_ms(64, 2, compile_kl=True):.1f} ms/step")


PROBES = {"scaling": scaling, "attention": attention, "threads": threads, "compiled-kl": compiled_kl}

if __name__ == "__main__":
    tune_cpu_allocator()
    names = sys.argv[1:] or list(PROBES)
    unknown = [n for n in names if n not in PROBES]
    if unknown:
        sys.exit(f"unknown probe(s) {unknown}; choose from {list(PROBES)}")
    for n in names:
        PROBES[n]()
