"""The random streams' seeds (tspd.seeding): unrelated across seeds, steps and stream ids; the
legacy mixer on request and for resumed legacy checkpoints."""

from __future__ import annotations

import torch

import tspd
from tspd import seeding
from tspd.data.tms import TMSData
from tspd.train import CHECKPOINT


def test_streams_of_other_seeds_and_steps_do_not_coincide():
    for salt in (101, 202, 404):
        seen = {seeding.stream_seed(0, s, salt) for s in range(5000)}
        assert not any(seeding.stream_seed(1, s, salt) in seen for s in range(5000))
        assert len(seen) == 5000  # nor within one run
    assert all(0 <= seeding.stream_seed(k, 3, 202) < 2**32 for k in range(100))  # what torch's CPU generator reads


def test_legacy_mixer_on_request(monkeypatch):
    """TSPD_LEGACY_STREAMS=1 reproduces results recorded before the fix, collisions included."""
    monkeypatch.setenv("TSPD_LEGACY_STREAMS", "1")
    assert seeding.legacy_streams()
    assert seeding.stream_seed(1, 64, 202) == seeding.stream_seed(0, 1, 202)  # the old mixer's collision
    assert seeding.stream_seed(0, 0) == 0x7B58C6023E697AA7  # its value, by the pre-fix formula
    monkeypatch.setenv("TSPD_LEGACY_STREAMS", "0")
    assert not seeding.legacy_streams()
    assert seeding.stream_seed(1, 64, 202) != seeding.stream_seed(0, 1, 202)


def test_checkpoint_keeps_its_runs_mixer(tmp_path, monkeypatch):
    """A run started under the legacy mixer resumes under it whatever the environment says, and a
    checkpoint without the record (written before the fix) is taken as legacy."""
    from test_train import _resume_cfg, _tms_target

    cfg = _resume_cfg(steps=6)
    data = TMSData(5, 0.2, 32)
    monkeypatch.setenv("TSPD_LEGACY_STREAMS", "1")
    whole = tspd.decompose(_tms_target(), data, cfg, run_dir=tmp_path / "whole", progress=False)
    tspd.decompose(_tms_target(), data, cfg, run_dir=tmp_path / "cut", progress=False, stop_after=5)
    assert torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=False)["legacy_streams"] is True
    monkeypatch.setenv("TSPD_LEGACY_STREAMS", "0")
    resumed = tspd.decompose(_tms_target(), data, cfg, run_dir=tmp_path / "cut", progress=False, resume=True)
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    # a pre-fix checkpoint: no record
    tspd.decompose(_tms_target(), data, cfg, run_dir=tmp_path / "old", progress=False, stop_after=5)  # env 0 now
    state = torch.load(tmp_path / "old" / CHECKPOINT, weights_only=False)
    assert state["legacy_streams"] is False
    del state["legacy_streams"]
    torch.save(state, tmp_path / "old" / CHECKPOINT)
    pinned = []
    real_pin = tspd.train.use_legacy_streams
    monkeypatch.setattr(tspd.train, "use_legacy_streams", lambda on: (pinned.append(on), real_pin(on)))
    tspd.decompose(_tms_target(), data, cfg, run_dir=tmp_path / "old", progress=False, resume=True)
    assert pinned[:2] == [None, True]  # a fresh start's reset, then the checkpoint's (absent) record read as legacy
    assert not seeding.legacy_streams()  # and the process is back on the environment's mixer once it returns
    seeding.use_legacy_streams(None)
    fresh = tspd.decompose(_tms_target(), data, cfg, progress=False)  # a fresh run: the environment's (new) mixer
    assert not seeding.legacy_streams()
    assert any(not torch.equal(v, fresh.state_dict()[k]) for k, v in whole.state_dict().items())
