"""A run folder under concurrent use, kills between dependent writes, and damaged files: nothing lost
silently, every error names the file and the fix."""

from __future__ import annotations

import os

import pytest
import torch

import tspd
from conftest import assert_same_state
from tspd import cli
from tspd.decomposition import LOCK_NAME, RunFolderBusy

SETS = ["--set", "train.steps=4", "--set", "target.train_steps=10", "--set", "train.batch_size=64",
        "--set", "train.faithfulness_warmup_steps=5", "--set", "train.checkpoint_every=2"]


def run(out, *extra) -> int:
    return cli.main(["decompose", "tms-5-2", "--out", str(out), *SETS, *extra])


@pytest.fixture
def finished(tmp_path):
    out = tmp_path / "run"
    assert run(out) == 0
    return out


def test_a_second_process_writing_the_same_folder_is_refused(tmp_path, capsys):
    """Two runs in one folder: the second deleted the first's live checkpoint and replaced its
    metrics, and both exited 0 with one run's results lost."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT)  # as another process holding the folder
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"4242")
    try:
        assert run(out) == 2
        assert "another tspd process (pid 4242) is writing to" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written, nothing moved
        cfg = tspd.RunConfig.from_yaml(cli._recipe("tms-5-2"), ["train.steps=2", "train.batch_size=8"])
        from tspd.data.tms import TMSData
        from tspd.targets.tms import TMSModel

        with pytest.raises(RunFolderBusy):
            tspd.decompose(TMSModel(5, 2), TMSData(5, 0.05, 8), cfg, run_dir=out, progress=False)
    finally:
        os.close(fd)
    assert run(out) == 0  # released: the folder is usable again


def test_the_target_settings_never_describe_weights_they_did_not_make(tmp_path, monkeypatch):
    """target.yaml goes before and comes back after target.safetensors: a kill in between left
    the new weights under the old settings, which a later fresh run silently reused."""
    from tspd import experiments

    out = tmp_path / "run"
    cfg = tspd.RunConfig.from_yaml(cli._recipe("tms-5-2"), ["target.train_steps=10"])
    out.mkdir()
    experiments._target_for(cfg, out)
    assert (out / "target.yaml").exists()

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiments, "atomic_write_bytes", killed)  # the kill: after the weights, before the settings
    with pytest.raises(KeyboardInterrupt):
        experiments._target_for(cfg.with_overrides(["target.train_steps=11"]), out)
    assert (out / "target.safetensors").exists() and not (out / "target.yaml").exists()


def test_a_set_aside_cut_short_is_completed_by_the_next_run(finished, capsys, monkeypatch):
    """A kill while the earlier run's files were moved left half of them in one previous- folder
    and half in another, and neither loaded."""
    from pathlib import Path

    from tspd import experiments

    first = tspd.load(finished)
    moved = []
    real = Path.rename

    def rename(self, target):
        if len(moved) == 3:
            raise KeyboardInterrupt
        moved.append(self.name)
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        experiments.set_aside_earlier_outputs(finished)
    monkeypatch.undo()
    assert (finished / experiments.PARTIAL_ASIDE).is_dir()
    assert run(finished, "--set", "seed=3") == 0
    aside = [p for p in finished.iterdir() if p.name.startswith("previous-")]
    assert len(aside) == 1 and not (finished / experiments.PARTIAL_ASIDE).exists()
    assert_same_state(first.state_dict(), tspd.load(aside[0]).state_dict())


@pytest.mark.parametrize("damage", [b"", b"\x00garbage" * 10, "truncate"])
def test_a_damaged_checkpoint_is_named_with_the_fix(finished, capsys, damage):
    ckpt = finished / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:2000] if damage == "truncate" else damage)
    assert cli.main(["decompose", "--resume", "--out", str(finished)]) == 2
    err = capsys.readouterr().err
    assert f"{ckpt} cannot be read" in err and "Delete it and start the run afresh" in err


def test_damaged_run_files_are_named(finished, capsys):
    (finished / "decomposition.safetensors").write_bytes(b"\x10\x00")
    assert cli.main(["eval", str(finished)]) == 2
    assert "decomposition.safetensors cannot be read" in capsys.readouterr().err
    # a damaged cached target is made again (the same settings make the same target)
    (finished / "target.safetensors").write_bytes(b"xx")
    assert run(finished) == 0
    assert "target.safetensors cannot be read" in capsys.readouterr().err
    (finished / "target.yaml").write_text("a: [unclosed")
    assert run(finished) == 0


def test_an_unfinished_run_says_to_resume(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tspd.RunConfig.from_yaml(cli._recipe("tms-5-2"), ["train.steps=4", "target.train_steps=10", "train.batch_size=64",
                                                           "train.faithfulness_warmup_steps=5", "train.checkpoint_every=2"])
    from tspd.experiments import decompose_from_config

    decompose_from_config(cfg, out, progress=False, stop_after=2)
    assert cli.main(["eval", str(out)]) == 2
    assert "the run has not finished; finish it with the same command and --resume" in capsys.readouterr().err


def test_resume_with_another_recipe_names_the_difference(finished, capsys):
    assert cli.main(["decompose", "tms-40-10", "--out", str(finished), *SETS, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "holds a run of a different config" in err and "size mismatch" not in err


def test_temporary_files_a_kill_left_are_removed(finished):
    for name in (".decomposition.safetensors.ab12cd34.tmp", ".results.json.x1y2z3_4.tmp", ".tms_subcomponents.png.qqqqqqqq.tmp"):
        (finished / name).write_bytes(b"half")
    (finished / ".keep.me").write_text("not ours")
    assert cli.main(["decompose", "--resume", "--out", str(finished)]) == 0
    assert sorted(p.name for p in finished.glob(".*")) == [".keep.me", LOCK_NAME]


def test_metrics_with_bytes_that_are_not_utf8_drop_that_line(tmp_path):
    from tspd.train import metric_records

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 0}\n{"step": 1, "x": "\xec\x00"\n{"step": 2}\n')
    records, damaged = metric_records(path)
    assert [r["step"] for _, r in records] == [0, 2] and damaged == 1


def test_out_that_is_a_file_is_named(tmp_path, capsys):
    out = tmp_path / "afile"
    out.write_text("x")
    assert run(out) == 2
    assert "is a file, not a folder: give the run a folder (--out DIR)" in capsys.readouterr().err


def test_a_lock_is_reentrant_and_released(tmp_path):
    from tspd.decomposition import run_folder_lock

    with run_folder_lock(tmp_path / "f"):
        with run_folder_lock(tmp_path / "f"):
            pass
        assert (tmp_path / "f" / LOCK_NAME).read_text() == str(os.getpid())
    with run_folder_lock(tmp_path / "f"):  # released: taken again
        pass



def test_harvest_waits_for_no_one_and_refuses_a_folder_being_written(finished, capsys):
    import fcntl

    fd = os.open(finished / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert cli.main(["harvest", str(finished), "--n-examples", "64"]) == 2
        assert "another tspd process" in capsys.readouterr().err
        assert not (finished / "dashboard.sqlite").exists()
    finally:
        os.close(fd)
    assert cli.main(["harvest", str(finished), "--n-examples", "64"]) == 0


def test_a_forked_child_does_not_keep_the_folder(tmp_path):
    """DataLoader workers are forked while a run holds its folder: the lock must stay the parent's
    (a second decompose() in the same process was refused, naming its own pid)."""
    import time

    from tspd.decomposition import run_folder_lock

    folder = tmp_path / "f"
    ready_r, ready_w = os.pipe()
    with run_folder_lock(folder):
        pid = os.fork()
        if pid == 0:  # the child: may not enter, and must not hold the folder once the parent leaves
            code = 1
            try:
                with run_folder_lock(folder):
                    pass
            except RunFolderBusy:
                code = 0
            os.write(ready_w, b"x")  # (the fork handlers have run by now)
            time.sleep(1.0)
            os._exit(code)
        os.read(ready_r, 1)
    try:
        with run_folder_lock(folder):  # the child still lives: the parent takes the folder again
            pass
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


def test_another_thread_is_refused(tmp_path):
    import threading

    from tspd.decomposition import run_folder_lock

    seen = []

    def other():
        try:
            with run_folder_lock(tmp_path / "f"):
                seen.append("entered")
        except RunFolderBusy as e:
            seen.append(str(e))

    with run_folder_lock(tmp_path / "f"):
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen and "another thread of this process" in seen[0]


def test_a_refused_start_leaves_the_holders_new_folder_alone(tmp_path):
    """A run refused at the lock must not clean up a folder another process has just made."""
    import fcntl

    from tspd.experiments import decompose_from_config

    out = tmp_path / "new"
    out.mkdir()
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        cfg = tspd.RunConfig.from_yaml(cli._recipe("tms-5-2"), ["train.steps=2"])
        with pytest.raises(RunFolderBusy):
            decompose_from_config(cfg, out, progress=False)
        assert (out / LOCK_NAME).exists()
    finally:
        os.close(fd)


def test_only_tspds_own_temporary_files_are_removed(tmp_path):
    from tspd.decomposition import remove_leftover_temps

    ours = [".decomposition.safetensors.ab12cd_9.tmp", ".results.json.k3j5h2l1.tmp"]
    theirs = [".notes.md.tmp", ".db.sqlite.tmp", ".env.local.tmp"]
    for name in ours + theirs:
        (tmp_path / name).write_text("x")
    assert sorted(p.name for p in remove_leftover_temps(tmp_path)) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs)


def test_a_python_target_is_written_once_per_run(tmp_path, monkeypatch):
    from tspd import train
    from tspd.data.tms import TMSData
    from tspd.targets.tms import TMSModel

    written = []
    real = train.atomic_write_bytes

    def counting(path, write):
        if path.name == "target_module.pt":
            written.append(path)
        return real(path, write)

    monkeypatch.setattr(train, "atomic_write_bytes", counting)
    cfg = tspd.RunConfig.model_validate({"sites": [{"pattern": "linear*", "C": 4}], "output": {"divergence": "mse"},
                                         "train": {"steps": 4, "batch_size": 8, "checkpoint_every": 2}})
    tspd.decompose(TMSModel(5, 2), TMSData(5, 0.1, 8), cfg, run_dir=tmp_path / "r", progress=False, stop_after=2)
    tspd.decompose(TMSModel(5, 2), TMSData(5, 0.1, 8), cfg, run_dir=tmp_path / "r", progress=False, resume=True)
    assert len(written) == 1 and tspd.load(tmp_path / "r").target is not None


def test_an_unwritable_folder_is_named(tmp_path, monkeypatch):
    from tspd import decomposition
    from tspd.decomposition import run_folder_lock

    real = os.open

    def refused(path, flags, *a):
        if str(path).endswith(LOCK_NAME):
            raise PermissionError(13, "Permission denied")
        return real(path, flags, *a)

    monkeypatch.setattr(decomposition.os, "open", refused)
    (tmp_path / "ro").mkdir()
    with pytest.raises(PermissionError, match="cannot write in .*ro .Permission denied.: give the run a folder you can write to"):
        with run_folder_lock(tmp_path / "ro"):
            pass


def test_tspd_run_holds_the_folder_through_its_analysis(tmp_path, monkeypatch):
    """The analysis after training writes results.json and figures: a run starting in the folder
    meanwhile set this run's decomposition aside and got its results written next to its own."""
    import fcntl

    from tspd import experiments

    out = tmp_path / "run"
    seen = []
    real = experiments.evaluate_run

    def probing(run_dir):
        fd = os.open(out / LOCK_NAME, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append("free")
        except OSError:
            seen.append("held")
        finally:
            os.close(fd)
        return real(run_dir)

    monkeypatch.setattr(experiments, "evaluate_run", probing)
    experiments.run_experiment(cli._recipe("tms-5-2"), out, ["train.steps=4", "target.train_steps=10", "train.batch_size=64",
                                                              "train.faithfulness_warmup_steps=5"])
    assert seen == ["held"] and (out / "results.json").exists()


def test_a_cut_target_copy_in_the_partial_set_aside_is_dropped(finished):
    from tspd import experiments

    partial = finished / experiments.PARTIAL_ASIDE
    partial.mkdir()
    (partial / ".target.safetensors.abcd1234.tmp").write_bytes(b"half")
    aside = experiments.set_aside_earlier_outputs(finished)
    assert aside is not None and not list(aside.glob(".*.tmp"))
    assert tspd.load(aside) is not None


def test_an_additive_mask_without_padding_is_not_read_as_all_padding():
    from tspd.decomposition import position_mask

    assert position_mask({"input_ids": torch.zeros(2, 4), "attention_mask": torch.zeros(2, 4)}) is None
    assert position_mask({"input_ids": torch.zeros(2, 4), "attention_mask": torch.ones(2, 4)}) is None
