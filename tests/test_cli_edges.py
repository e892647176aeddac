"""CLI input a researcher gets wrong, caught before work is done or files move (2026-12-03 review).
Each test failed before its fix."""

from __future__ import annotations

import shutil

import pytest

import tspd
from tspd import cli


def _finished_run(tms_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tms_run, out)
    return out


def test_a_text_run_longer_than_the_models_context_fails_before_the_earlier_run_moves(tms_run, tmp_path, capsys):
    """The earlier finished run was set aside first, and the folder then held no run."""
    out = _finished_run(tms_run, tmp_path)
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"Paragraph {i} says something about topic {i % 7}." * 20 for i in range(40)))
    cfg = tmp_path / "hf.yaml"
    cfg.write_text(f"target: {{kind: huggingface, model: tiny-gpt2}}\ndata: {{kind: text, source: {text}, seq_len: 100000}}\n"
                   "sites: [{pattern: transformer.h.0.mlp.c_fc, C: 4}]\n")
    assert cli.main(["decompose", str(cfg), "--out", str(out)]) == 2
    assert "data.seq_len 100000 is longer than the model's context (128 positions)" in capsys.readouterr().err
    assert not list(out.glob("previous-*")) and tspd.load(out).site_names == ["linear1", "linear2"]
    cfg.write_text(cfg.read_text().replace("source: " + str(text), "source: " + str(tmp_path / "none.txt")).replace("100000", "16"))
    assert cli.main(["decompose", str(cfg), "--out", str(out)]) == 2  # a missing text source: before the move too
    assert "does not exist" in capsys.readouterr().err and not list(out.glob("previous-*"))


def test_a_folder_whose_run_was_set_aside_says_where_it_went(tms_run, tmp_path):
    out = tmp_path / "run"
    (out / "previous-20261203-101010").mkdir(parents=True)
    for f in tms_run.iterdir():
        if f.is_file():
            shutil.copy(f, out / "previous-20261203-101010" / f.name)
    (out / "config.yaml").write_text((tms_run / "config.yaml").read_text())
    with pytest.raises(FileNotFoundError, match="set aside in .*previous-20261203-101010: load that folder"):
        tspd.load(out)


def test_train_target_into_a_file_fails_before_training(tmp_path, capsys, monkeypatch):
    import tspd.experiments

    trained = []
    monkeypatch.setattr(tspd.experiments, "build_target", lambda *a, **k: trained.append(1))
    monkeypatch.setattr(tspd.experiments, "_train_induction_target", lambda *a, **k: trained.append(1))
    f = tmp_path / "file.yaml"
    f.write_text("x")
    for kind in ("tms-5-2", "induction"):
        assert cli.main(["train-target", kind, "--out", str(f)]) == 2
        assert "is a file, not a folder" in capsys.readouterr().err
    assert not trained


@pytest.mark.parametrize("option, value", [("--min-ci", "5"), ("--min-gap", "nan"), ("--min-ci", "-0.1")])
def test_facts_ci_levels_must_be_fractions(option, value, capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["facts", "ablate", "some-run", option, value])
    assert err.value.code == 2 and "must be in [0, 1]" in capsys.readouterr().err


def test_circuit_check_on_a_tms_target_names_the_kind(tms_run, capsys):
    assert cli.main(["circuit-check", str(tms_run)]) == 2
    err = capsys.readouterr().err
    assert "holds a tms target; circuit-check takes induction targets" in err and "pydantic" not in err


def test_facts_on_another_kind_of_run_names_its_kind(tms_run, capsys):
    assert cli.main(["facts", "ablate", str(tms_run)]) == 2
    assert "its target.kind is tms" in capsys.readouterr().err


def test_serve_on_an_unknown_host_blames_the_host(tms_run, capsys):
    assert cli.main(["serve", str(tms_run), "--host", "nonexistent.invalid", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "'nonexistent.invalid' is not an address of this machine" in err and "pass another --host" in err


def test_a_resume_with_other_train_settings_says_what_changed(tms_run, tmp_path, capsys):
    """Allowed, but config.yaml was silently rewritten with the new values."""
    out = _finished_run(tms_run, tmp_path)
    assert cli.main(["decompose", "--out", str(out), "--resume", "--set", "train.steps=8", "--set", "train.threads=1"]) == 0
    err = capsys.readouterr().err
    assert "resuming" in err and "train.steps 6 -> 8" in err and "train.threads None -> 1" in err


def test_a_target_path_of_another_shape_or_kind_names_the_setting(tms_run, capsys):
    """Before: torch's raw load_state_dict error (missing/unexpected keys, size mismatch)."""
    from tspd.cli import CONFIGS_DIR

    shipped = CONFIGS_DIR.parent / "src" / "tspd" / "assets" / "induction-seed1" / "target.safetensors"
    assert cli.main(["decompose", "induction", "--out", str(tms_run.parent / "x"), "--set", f"target.path={shipped}",
                     "--set", "target.d_model=32"]) == 2
    assert "it was made with target.d_model=16" in capsys.readouterr().err
    assert cli.main(["decompose", "induction", "--out", str(tms_run.parent / "y"), "--set",
                     f"target.path={tms_run / 'target.safetensors'}"]) == 2
    assert "it is a tms target" in capsys.readouterr().err


def test_a_config_no_run_can_use_fails_before_the_earlier_run_moves(tms_run, tmp_path, capsys):
    out = _finished_run(tms_run, tmp_path)
    assert cli.main(["decompose", "tms-5-2", "--out", str(out), "--set", "output.positions=[-1]"]) == 2
    assert "a tms target's output has no positions" in capsys.readouterr().err
    assert not list(out.glob("previous-*")) and tspd.load(out).site_names == ["linear1", "linear2"]


def test_sites_c_without_a_pattern_is_named(capsys):
    assert cli.main(["sites", "tms-5-2", "--C", "8"]) == 2
    assert "--C goes with --pattern" in capsys.readouterr().err


def test_serve_on_an_address_of_another_machine_blames_the_host(tms_run, capsys):
    assert cli.main(["serve", str(tms_run), "--host", "10.255.255.1", "--port", "0"]) == 2
    assert "is not an address of this machine" in capsys.readouterr().err


def test_a_failed_train_target_leaves_no_empty_folder(tmp_path, monkeypatch):
    import tspd.experiments

    def boom(*a, **k):
        raise RuntimeError("training failed")

    monkeypatch.setattr(tspd.experiments, "build_target", boom)
    assert cli.main(["train-target", "tms-5-2", "--out", str(tmp_path / "t")]) == 2
    assert not (tmp_path / "t").exists()


def _text_run_config(tmp_path, text_name="t.txt"):
    text = tmp_path / text_name
    text.write_text("\n\n".join(f"Paragraph {i} tells of place {i % 5} and its river." * 3 for i in range(60)))
    cfg = tmp_path / "hf.yaml"
    cfg.write_text(f"target: {{kind: huggingface, model: tiny-gpt2}}\ndata: {{kind: text, source: {text_name}, seq_len: 16}}\n"
                   "sites: [{pattern: transformer.h.0.mlp.c_fc, C: 4}]\n"
                   "train: {steps: 2, batch_size: 2, eval_batches: 1, threads: 1}\n")
    return cfg


def test_relative_paths_in_a_config_are_saved_absolute_and_resume_still_matches(tmp_path, monkeypatch):
    """A run made with `source: t.txt` could only be loaded, served or harvested from the folder it was made in."""
    monkeypatch.chdir(tmp_path)
    cfg = _text_run_config(tmp_path)
    assert cli.main(["decompose", "hf.yaml", "--out", "run"]) == 0
    saved = tspd.RunConfig.from_yaml(tmp_path / "run" / "config.yaml")
    assert saved.data.source == str(tmp_path / "t.txt")
    monkeypatch.chdir(tmp_path.parent)
    assert tspd.load(tmp_path / "run").config.data.source == str(tmp_path / "t.txt")
    monkeypatch.chdir(tmp_path)
    # a run saved with the relative path (before this change) still resumes with the same relative config
    (tmp_path / "run" / "config.yaml").write_text(saved.model_copy(
        update={"data": saved.data.model_copy(update={"source": "t.txt"})}).to_yaml())
    assert cli.main(["decompose", str(cfg), "--out", "run", "--resume", "--set", "train.steps=3"]) == 0


def test_harvest_windows_join_paragraphs_as_training_does(tmp_path, monkeypatch):
    """The harvest ran held-out paragraphs together ("...period.Baroque..."); training puts a blank line between."""
    from tspd.app.adapters import ADAPTERS
    from tspd.data.text import chunk, documents, split_documents
    from tspd.targets.huggingface import load_tokenizer

    monkeypatch.chdir(tmp_path)
    _text_run_config(tmp_path)
    assert cli.main(["decompose", "hf.yaml", "--out", "run"]) == 0
    dec = tspd.load(tmp_path / "run")
    adapter = ADAPTERS["huggingface"](dec, tmp_path / "run")
    stream = [t for text in adapter.texts for t in adapter._ids(text)]
    held_out = split_documents(documents(dec.config.data.source), dec.config.data.heldout_fraction)[1][:200]
    trained_like = chunk(held_out, load_tokenizer("tiny-gpt2"), 1).flatten().tolist()
    assert stream == trained_like


def test_a_run_whose_text_moved_is_still_served(tmp_path, monkeypatch):
    """The dashboard refused the whole run when its data.source was gone; only the harvest and random
    examples need it."""
    from tspd.app.adapters import ADAPTERS
    from tspd.app.session import AppError, RunSession

    monkeypatch.chdir(tmp_path)
    _text_run_config(tmp_path)
    assert cli.main(["decompose", "hf.yaml", "--out", "run"]) == 0
    (tmp_path / "t.txt").unlink()
    dec = tspd.load(tmp_path / "run")
    session = RunSession(tmp_path / "run", ADAPTERS["huggingface"](dec, tmp_path / "run"))
    assert session.analyse("Paragraph 3 tells")["tokens"]
    with pytest.raises(AppError, match="t.txt does not exist.*the harvest and random examples need it") as err:
        session.sample_prompt(1)
    assert err.value.status == 409
