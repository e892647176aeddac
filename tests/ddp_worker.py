"""One rank of the 2-process DDP test (tests/test_distributed.py launches it with torchrun).

Runs the tms-5-2 recipe through the library the CLI calls and saves what this rank saw: its final
parameters, its step-0 batch slice, its step-0 stochastic masks and its loss terms per step, in OUT/rank<r>.pt.
usage: ddp_worker.py OUT STEPS [STOP_AFTER] [--resume]
"""

import os
import sys
from pathlib import Path

import torch

import tspd.losses
import tspd.train
from tspd import distributed
from tspd.config import RunConfig
from tspd.experiments import decompose_from_config

out, steps = Path(sys.argv[1]), int(sys.argv[2])
stop_after = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] != "--resume" else None
resume = "--resume" in sys.argv
seen: dict[str, object] = {}

real_masks, real_losses = tspd.losses.stochastic_masks, tspd.train.compute_losses


def recording_masks(ci, kind, gen):
    masks = real_masks(ci, kind, gen)
    seen.setdefault("masks", {s: m.detach().clone() for s, m in masks.items()})
    return masks


def recording_losses(dec, batch, step, gen):
    seen.setdefault("batch", batch.clone())
    seen.setdefault("fast_bf16", tspd.losses.cpu_has_fast_bf16())  # what the run uses (put back when it returns)
    total, terms, ci = real_losses(dec, batch, step, gen)
    seen.setdefault("terms", {})[step] = {**terms, "loss": float(total.detach())}  # this rank's own values
    return total, terms, ci


tspd.losses.stochastic_masks = recording_masks
# train.autocast 'auto': the ranks "measure" different answers; the run must use rank 0's on both.
tspd.losses.measure_fast_bf16 = lambda: os.environ.get("RANK") == "0"
tspd.train.compute_losses = recording_losses
recipe = Path(__file__).resolve().parents[1] / "configs" / "tms-5-2.yaml"
cfg = RunConfig.from_yaml(recipe, [f"train.steps={steps}", "train.checkpoint_every=5", "train.eval_every=1000",
                                    "train.autocast=auto"])
dec = decompose_from_config(cfg, out, resume=resume, progress=False, stop_after=stop_after)
w = distributed.world()
state = {"params": {k: v.detach().clone() for k, v in dec.state_dict().items()}, **seen, "world": w.size}
torch.save(state, out / f"rank{w.rank}.pt")
distributed.leave(wait=True)
