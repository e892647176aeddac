"""Data-parallel training: two CPU processes under torchrun (gloo)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tspd.config import RunConfig
from tspd.data.tms import TMSData

WORKER = Path(__file__).with_name("ddp_worker.py")
RECIPE = Path(__file__).resolve().parents[1] / "configs" / "tms-5-2.yaml"


def torchrun(out: Path, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), str(out), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp-full")
    torchrun(out, "12")
    return out


def test_ranks_share_parameters_but_not_masks_or_data(full_run):
    r0, r1 = (torch.load(full_run / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), f"{k} differs between ranks"
    assert any(not torch.equal(r0["masks"][s], r1["masks"][s]) for s in r0["masks"]), "both ranks drew the same masks"
    # Each rank trains on its half of the 1-process global batch of step 0.
    cfg = RunConfig.from_yaml(RECIPE)
    data = TMSData(cfg.target.n_features, cfg.data.feature_probability, cfg.train.batch_size, cfg.seed)
    global_batch = data(0)
    half = cfg.train.batch_size // 2
    assert torch.equal(r0["batch"], global_batch[:half]) and torch.equal(r1["batch"], global_batch[half:])


def test_ranks_agree_on_autocast_auto(full_run):
    # the worker makes rank 0 measure "bf16 is fast" and rank 1 "it is not": both use rank 0's answer
    assert [torch.load(full_run / f"rank{r}.pt")["fast_bf16"] for r in (0, 1)] == [True, True]


def test_rank0_alone_writes_files(full_run):
    steps_logged = [line for line in (full_run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    cfg = RunConfig.from_yaml(RECIPE)
    assert len(steps_logged) == len(range(0, 12, cfg.train.log_every)) + (11 % cfg.train.log_every != 0)
    assert (full_run / "decomposition.safetensors").exists() and (full_run / "checkpoint.pt").exists()


def test_logged_metrics_are_the_mean_over_ranks(full_run):
    import json

    r0, r1 = (torch.load(full_run / f"rank{r}.pt")["terms"] for r in (0, 1))
    rows = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert rows and set(r0) == set(r1) == set(range(12))
    differ = 0
    for row in rows:
        a, b = r0[row["step"]], r1[row["step"]]
        for k in a:
            assert row[k] == pytest.approx((a[k] + b[k]) / 2, rel=1e-12, abs=1e-15), (row["step"], k)
            differ += a[k] != b[k]
    assert differ > len(rows)  # the ranks' own values differ (their data halves), so this checks the mean


def test_resume_under_ddp_matches_an_uninterrupted_run(full_run, tmp_path):
    torchrun(tmp_path, "12", "7")
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 7
    torchrun(tmp_path, "12", "--resume")
    resumed, straight = torch.load(tmp_path / "rank0.pt"), torch.load(full_run / "rank0.pt")
    for k, v in straight["params"].items():
        assert torch.equal(v, resumed["params"][k]), f"{k} differs after resume"


def test_drift_between_ranks_is_caught(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER.with_name("ddp_sync_worker.py")), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        lines = (tmp_path / f"sync{rank}.txt").read_text().splitlines()
        assert lines[0] == "equal: ok"
        assert lines[1].startswith("drifted: rank") and "drifted apart" in lines[1], lines


def test_batch_must_split_over_ranks():
    from tspd.distributed import World, shard

    with pytest.raises(ValueError, match="multiple of 3"):
        shard(torch.zeros(10, 4), World(rank=0, size=3))
    assert torch.equal(shard(torch.arange(6), World(rank=1, size=2)), torch.arange(3, 6))
