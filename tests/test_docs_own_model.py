"""docs/own-model.md runs as written: its blocks in order, on its stand-in model, with a few training
steps instead of thousands (the --set below) and the shipped facts sentences standing in for the
Wikipedia sample (no download in the default tests)."""

from __future__ import annotations

import re
import runpy
import shlex
from pathlib import Path

import pytest

from tspd import cli
from tspd.data.facts import fact_sentences, load_facts

DOC = Path(__file__).resolve().parents[1] / "docs" / "own-model.md"
QUICK = ["--set", "train.steps=4", "--set", "train.faithfulness_warmup_steps=2", "--set", "train.batch_size=4",
         "--set", "train.eval_every=2", "--set", "train.eval_batches=1", "--set", "train.checkpoint_every=2",
         "--set", "train.compile=false", "--set", "train.threads=1"]


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.M | re.S)]


def test_the_own_model_walkthrough_runs_as_written(tmp_path, monkeypatch, capsys):
    import tspd.data.text

    texts = [" ".join(fact_sentences(load_facts())[i : i + 6]) for i in range(0, 480, 6)]
    monkeypatch.setattr(tspd.data.text, "wiki_documents", lambda cache=None: texts)
    monkeypatch.chdir(tmp_path)
    found = blocks(DOC.read_text())
    assert [lang for lang, _ in found].count("python") == 2 and any(lang == "yaml" for lang, _ in found)
    printed: list[tuple[str, str]] = []  # (command, what it printed) for the output blocks that follow
    for k, (lang, body) in enumerate(found):
        first = body.splitlines()[0]
        if lang == "python":
            name = first.removeprefix("# ").strip()
            code = body.replace("range(600)", "range(3)")  # the stand-in's training: a minute in the docs
            Path(name).write_text(code)
            runpy.run_path(name, run_name="__main__")
            printed.append((name, capsys.readouterr().out))
        elif lang == "yaml":
            Path(first.removeprefix("# ").strip()).write_text(body)
        elif lang == "bash":
            for line in body.splitlines():
                argv = shlex.split(line, comments=True)
                if not argv or argv[:2] == ["tspd", "serve"]:  # serve blocks until stopped
                    continue
                assert argv[0] == "tspd", line
                extra = QUICK if argv[1] == "decompose" and "--resume" not in argv else []
                assert cli.main(argv[1:] + extra) == 0, line
                printed.append((line, capsys.readouterr().out))
        elif lang == "":  # what the command before printed (```text blocks: a measured run's output, not rerun) (with the doc's stand-in: names and shapes)
            command, out = printed[-1]
            for row in body.splitlines():
                name = row.split()[0]
                if re.fullmatch(r"transformer\.h\.\d\.(mlp|attn)\.\w+", name):
                    assert row in out.splitlines(), f"{command}: {row!r} not printed as in the doc"
                elif name.startswith(("transformer.", "lm_head")):
                    assert any(o.split()[:1] == [name] for o in out.splitlines()), f"{command}: {name} not listed"

    ran = dict(printed)
    assert "transformer.h.1.mlp.c_proj" in ran["tspd sites my-model --pattern 'transformer.h.1.mlp.*' --C 256"]
    assert (tmp_path / "runs/mine/decomposition.safetensors").exists() and (tmp_path / "runs/mine/dashboard.sqlite").exists()
    explore = ran["explore.py"].splitlines()
    from tspd.targets.huggingface import load_tokenizer

    tok = load_tokenizer("my-model")
    n = len(tok("The river flows through the city of", add_special_tokens=False).input_ids)
    longest = max(len(tok(t, add_special_tokens=False).input_ids) for t in ["The river flows", "A small town in the north of"])
    assert len([r for r in explore if r.strip().startswith(("'", '"'))]) == n  # one row per token of the prompt
    assert "off at the last token: KL" in ran["explore.py"] and "it writes towards" in ran["explore.py"] and "with h = " in ran["explore.py"]
    shapes = f"{{'transformer.h.1.mlp.c_fc': (2, {longest}, 256), 'transformer.h.1.mlp.c_proj': (2, {longest}, 256)}}"
    assert shapes in ran["explore.py"]


@pytest.mark.parametrize("key", ["train.steps", "train.faithfulness_warmup_steps", "train.compile"])
def test_the_docs_config_sets_what_the_test_shortens(key):
    """The shortening above only makes sense for keys the doc's config sets itself."""
    section, name = key.split(".")
    yaml = next(body for lang, body in blocks(DOC.read_text()) if lang == "yaml")
    assert re.search(rf"^\s+{name}:", yaml, re.M), f"{key} not in the doc's config"
