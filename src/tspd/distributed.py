"""Data-parallel training under torchrun: process group, batch shards, metric reduction.

`torchrun --nproc_per_node=N -m tspd decompose CONFIG --out DIR` starts N processes; each calls
`tspd.train.decompose`, which finds the torchrun environment here, joins the process group (gloo
on CPU, NCCL on CUDA), wraps the step in DistributedDataParallel and takes rank `r`'s slice of
every global batch. Every rank builds the same global batch from the step number, so a run with
N ranks sees exactly the data of a 1-process run with the same `train.batch_size`; only the mask
draws differ (each rank has its own stream). Outside torchrun every function here is a no-op.

Example (2 CPU processes on one machine):
    torchrun --standalone --nproc_per_node=2 -m tspd decompose induction --out runs/ddp
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from tspd.decomposition import Batch, batch_size, per_example


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The rank that writes files and shows the progress bar."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's place in the torchrun job (rank 0 of 1 outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    size = int(os.environ.get("WORLD_SIZE", 1))
    return World(int(os.environ.get("RANK", 0)), size, int(os.environ.get("LOCAL_RANK", 0)))


def device_for(requested: str) -> torch.device:
    """`train.device` as a torch device; under torchrun, CUDA means this rank's local GPU."""
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device is 'cuda' but torch sees no CUDA device; set train.device=cpu")
        return torch.device("cuda", world().local_rank)
    return torch.device("cpu")


def init(device: torch.device) -> World:
    """Join the torchrun process group if this process is one of several and has not joined yet."""
    w = world()
    if not w.parallel or dist.is_initialized():
        return w
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return world()


def agree_on_autocast(autocast: str | None, device: torch.device, w: World) -> None:
    """train.autocast 'auto' on CPU measures bf16 against fp32 in each process; under torchrun the
    ranks could disagree (timings are noisy when processes share cores), so every rank takes rank
    0's answer. A collective: every rank calls it at the same point (start of training)."""
    from tspd.losses import cpu_has_fast_bf16, pin_fast_bf16

    if not w.parallel or autocast != "auto" or device.type != "cpu":
        return
    flag = torch.tensor([int(cpu_has_fast_bf16())])
    dist.broadcast(flag, src=0)
    pin_fast_bf16(bool(flag.item()))


def agree_on_onednn(dec, device: torch.device, w: World) -> None:
    """train.fp32_matmul 'auto' measures oneDNN against torch's products in each process; under
    torchrun every rank takes rank 0's answer (as `agree_on_autocast`). A collective."""
    if not w.parallel or dec.config.train.fp32_matmul != "auto" or device.type != "cpu":
        return
    flag = torch.tensor([int(dec.onednn), int(dec.head_onednn)])
    dist.broadcast(flag, src=0)
    dec.set_onednn(bool(flag[0].item()))
    dec.set_head_onednn(bool(flag[1].item()))


def leave(wait: bool = False) -> None:
    """Leave the process group, if this process joined one (the CLI calls it on exit). `wait`: on a
    successful exit, first wait for every rank to get here, so that no rank tears its connections
    down while another is still writing (a gloo rank leaving early aborted once under load). Never
    on an error path: a peer may never arrive."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            if dist.get_backend() == "gloo":  # rank 0 may still be analysing (e.g. `tspd run`): no 30-min limit
                dist.monitored_barrier(timeout=datetime.timedelta(days=1))
            else:
                dist.barrier()
        dist.destroy_process_group()


def check_split(n: int, w: World) -> None:
    """Raise the error for a global batch of n that does not split evenly over the ranks."""
    if w.parallel and n % w.size:
        raise ValueError(
            f"train.batch_size {n} does not split evenly over {w.size} processes; "
            f"use a multiple of {w.size} (the global batch is divided among the ranks)"
        )


def shard(batch: Batch, w: World) -> Batch:
    """Rank `w.rank`'s contiguous slice of a global batch (the whole batch outside torchrun)."""
    if not w.parallel:
        return batch
    n = batch_size(batch)
    check_split(n, w)
    per = n // w.size
    lo = w.rank * per
    if isinstance(batch, Tensor):
        return batch[lo : lo + per]
    return {k: v[lo : lo + per] if per_example(v, n) else v for k, v in batch.items()}


def to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if not isinstance(batch, dict):
        raise TypeError(f"a batch must be a Tensor or a dict of keyword inputs; got a {type(batch).__name__}. Yield the "
                        "model's inputs only (e.g. x, not (x, y)), or a dict of its keyword arguments")
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def mean_over_ranks(values: dict[str, float], w: World, device: torch.device) -> dict[str, float]:
    """Average scalar metrics over the ranks (identity outside torchrun). Every rank must call it."""
    if not w.parallel or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / w.size for k, v in zip(keys, t.tolist())}


def check_in_sync(params: list[Tensor], w: World) -> None:
    """Raise if the ranks' parameters have drifted apart (they must stay bit-identical under DDP)."""
    if not w.parallel:
        return
    local = torch.stack([p.detach().double().sum() for p in params]).cpu()
    gathered: list[Tensor | None] = [None] * w.size
    dist.all_gather_object(gathered, local)
    for r, other in enumerate(gathered):
        if not torch.equal(other, local):
            raise RuntimeError(f"rank {w.rank}'s parameters differ from rank {r}'s: the DDP replicas drifted apart")
