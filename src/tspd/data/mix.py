"""Decomposition data for language models: general text, optionally mixed with facts sentences.

A batch of `text` data is (batch, seq_len) token ids. With `facts_fraction` f > 0, round(f * batch)
rows are chunks of "<template with a discovery athlete> <sport>." sentences and the rest are
general text (SPEC §6.3: decomposing on facts alone leaves subcomponents unconstrained on other
text). Held-out athletes never appear in the facts sentences of training; general text may name
some (the shipped wiki source's training documents name 5 of the 104 held-out athletes under seed 0:
Evert, Ashe, Messi, Cruyff and Gretzky, once each; counted 2026-12-03).

Example:
    >>> from tspd.config import TextDataConfig, HuggingFaceTargetConfig
    >>> data = text_data(TextDataConfig(source="notes.txt", facts_fraction=0.25),
    ...                  HuggingFaceTargetConfig(model="tiny-gpt2"), batch_size=8, seed=0)  # doctest: +SKIP
    >>> data(0).shape  # doctest: +SKIP
    torch.Size([8, 64])
"""

from __future__ import annotations

import torch
from torch import Tensor

from tspd.data.facts import fact_sentences, load_facts, split_athletes
from tspd.data.text import TextChunks, TextData, chunk, load_text


class MixedData:
    """Rows from `facts` then rows from `text`, each drawn by its own resumable stream."""

    def __init__(self, text: TextChunks, facts: TextChunks, batch_size: int, fraction: float, seed: int):
        n_facts = round(fraction * batch_size)
        sizes = [(facts, n_facts, seed + 1), (text, batch_size - n_facts, seed)]
        self.parts = [TextData(chunks, n, s) for chunks, n, s in sizes if n > 0]
        self.eval_text = TextData(text, batch_size, seed)

    def __call__(self, step: int) -> Tensor:
        if step < 0:  # evaluation batches: held-out general text only
            return self.eval_text(step)
        return torch.cat([d(step) for d in self.parts])


def facts_chunks(tokenizer, seq_len: int, seed: int = 0) -> TextChunks:
    """Discovery athletes' sentences as training chunks; held-out athletes' as held-out chunks."""
    facts = load_facts()
    discovery, heldout = split_athletes(facts, seed=seed)
    g = torch.Generator().manual_seed(seed)

    def chunks(athletes) -> Tensor:
        sentences = fact_sentences(facts, athletes)
        order = torch.randperm(len(sentences), generator=g).tolist()
        return chunk([sentences[i] for i in order], tokenizer, seq_len)

    return TextChunks(chunks(discovery), chunks(heldout), "facts", getattr(tokenizer, "name_or_path", ""), seq_len,
                      len(discovery), len(heldout))


def text_data(cfg, target_cfg, batch_size: int, seed: int):
    """The `text` data source a config names (see the module docstring)."""
    from tspd.targets.huggingface import load_tokenizer

    tokenizer = load_tokenizer(target_cfg.model)
    text = load_text(cfg.source, tokenizer, cfg.seq_len, cfg.heldout_fraction)
    if cfg.facts_fraction == 0:
        return TextData(text, batch_size, seed)
    # The athletes are split with the run's seed, the split `tspd facts ablate` judges the run by.
    return MixedData(text, facts_chunks(tokenizer, cfg.seq_len, seed), batch_size, cfg.facts_fraction, seed)
