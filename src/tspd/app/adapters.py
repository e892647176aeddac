"""How the dashboard talks to one kind of target: parse a prompt, label inputs and outputs, map a
subcomponent's output direction to the model's outputs, and draw a dataset sample.

Adding a target kind is one Adapter subclass (or an instance of CausalLMAdapter) and one entry in
ADAPTERS, a factory `(decomposition, run_dir) -> Adapter`. For a Hugging Face LM kind whose config
names a tokenizer, that entry is of the form
`lambda dec, run_dir: CausalLMAdapter(dec.target, load_tokenizer(dec.config.target), texts=corpus)`.

Example:
    >>> from tspd.app.adapters import InductionAdapter
    >>> from tspd.data.induction import InductionTask
    >>> a = InductionAdapter(InductionTask(n_tokens=8, seq_len=8))
    >>> a.encode("3 S 5 S").tolist()               # BOS is put in front when missing
    [[8, 3, 9, 5, 9]]
    >>> a.input_labels(a.encode("3 S 5 S")[0])
    ['BOS', '3', 'S', '5', 'S']
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from tspd.decomposition import Decomposition
from tspd.seeding import generator

HARVEST_STREAM = 808  # seed stream of the harvest sample: training and the census never use it


class PromptError(ValueError):
    """A prompt the run cannot take; the message names the problem and what to type instead."""


MAX_INT_DIGITS = 100  # far above any id, count or seed; far below Python's int-from-text limit (4300)
_INT_TEXT = re.compile(rf"-?[0-9]{{1,{MAX_INT_DIGITS}}}")
_NAT_TEXT = re.compile(rf"[0-9]{{1,{MAX_INT_DIGITS}}}")
# A decimal number in ASCII (no '_' separators, no other scripts' digits), or nan/inf, which the
# caller refuses with its own message.
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?:nan|inf|infinity)", re.IGNORECASE)


def parse_int(text: str, negative: bool = True) -> int | None:
    """The integer `text` spells in ASCII digits (a leading '-' only when `negative`), or None.

    Nothing else is read as a number: no spaces, '+', '_' separators ('1_1'), other scripts' digits
    ('²', '١', which str.isdigit and int() accept), or more than MAX_INT_DIGITS digits.
    """
    if not isinstance(text, str):
        return None
    return int(text) if (_INT_TEXT if negative else _NAT_TEXT).fullmatch(text) else None


def parse_float(text: str) -> float | None:
    """The number `text` spells in ASCII ('0.5', '-1e-3', 'nan', 'inf'), or None ('1_000', '١')."""
    return float(text) if isinstance(text, str) and len(text) <= 400 and _FLOAT_TEXT.fullmatch(text) else None


class Adapter:
    """One target kind, as the dashboard sees it.

    input_kind: 'tokens' (a sequence, CI per position) or 'features' (one input vector, one position).
    output_kind: 'distribution' (logits: softmax, KL) or 'values' (regression outputs: MSE).
    """

    input_kind = "tokens"
    output_kind = "distribution"
    context_length: int | None = None
    example_prompt = ""
    prompt_help = ""
    harvest_examples = 1000

    def encode(self, prompt: str) -> Tensor:
        """The model input for a prompt: (1, T) token ids or (1, n_features) values."""
        raise NotImplementedError

    def input_labels(self, example: Tensor) -> list[str]:
        """One label per position of one example (a single label for a feature vector)."""
        raise NotImplementedError

    def output_label(self, i: int) -> str:
        """The name of output i (a vocabulary entry, or an output feature)."""
        raise NotImplementedError

    def readout(self, site: str) -> Tensor | None:
        """(d_out of the site, n_outputs): the direct linear path from the site's output to the
        model's outputs, or None when the site's output does not reach them linearly."""
        return None

    def sample(self, n: int, seed: int) -> Tensor:
        """n dataset examples, deterministic in `seed`."""
        raise NotImplementedError

    def prompt_of(self, example: Tensor) -> str:
        """The prompt text that encodes to `example` (for "random example" in the page)."""
        return " ".join(self.input_labels(example))

    def example(self, seed: int) -> Tensor:
        """One dataset example for the page's "random example", deterministic in `seed`."""
        return self.sample(1, seed)[0]

    def check_length(self, n_tokens: int) -> None:
        if self.context_length is not None and n_tokens > self.context_length:
            raise PromptError(
                f"the prompt has {n_tokens} tokens but the model's context is {self.context_length}; shorten it"
            )


class InductionAdapter(Adapter):
    """The toy induction transformer: ordinary tokens 0..n-1, BOS and the special token S."""

    def __init__(self, task, model: nn.Module | None = None):
        self.task, self.model = task, model
        self.context_length = task.seq_len
        # An induction pattern (S, then its follower, ..., S again) inside this task's vocabulary and
        # context: "BOS 7 3 S 42 11 5 9 S" on the paper's task (128 tokens, context 64).
        words = ["BOS"] + [str(t % task.n_tokens) for t in (7, 3)] + ["S"] + [str(t % task.n_tokens) for t in (42, 11, 5, 9)]
        self.example_prompt = " ".join(words[: max(task.seq_len - 1, 1)] + ["S"])
        self.prompt_help = (
            f"tokens separated by spaces: 0..{task.n_tokens - 1}, S (the special token), BOS (put in front "
            f"when missing); at most {task.seq_len}"
        )
        self.harvest_examples = 2000

    def _token(self, word: str, pos: int) -> int:
        upper = word.upper()
        if upper == "BOS":
            return self.task.bos
        if upper == "S":
            return self.task.special
        token = parse_int(word, negative=False)  # ASCII digits only: '²'.isdigit() is True
        if token is not None and token < self.task.n_tokens:
            return token
        raise PromptError(f"token {word!r} (word {pos + 1}) is not in the vocabulary; use {self.prompt_help}")

    def encode(self, prompt: str) -> Tensor:
        words = [w for w in re.split(r"[\s,]+", prompt.strip()) if w]
        if not words:
            raise PromptError(f"the prompt is empty; type {self.prompt_help}, e.g. {self.example_prompt!r}")
        ids = [self._token(w, i) for i, w in enumerate(words)]
        if ids[0] != self.task.bos:
            ids.insert(0, self.task.bos)  # every training sequence starts with BOS
        self.check_length(len(ids))
        return torch.tensor([ids])

    def output_label(self, i: int) -> str:
        return {self.task.bos: "BOS", self.task.special: "S"}.get(i, str(i))

    def input_labels(self, example: Tensor) -> list[str]:
        return [self.output_label(int(t)) for t in example]

    def readout(self, site: str) -> Tensor | None:
        # v_proj writes through the same block's o_proj into the residual stream; q/k only steer attention.
        if self.model is None:
            return None
        unembed = self.model.unembed.weight.T  # d_model x vocab
        block, _, proj = site.rpartition(".")
        if proj == "o_proj":
            return unembed
        if proj == "v_proj":
            return self.model.get_submodule(block).o_proj.weight.T @ unembed
        return None

    def sample(self, n: int, seed: int) -> Tensor:
        return self.task.sample(n, generator(seed, 0, HARVEST_STREAM))[0]


class FeatureAdapter(Adapter):
    """Models of a feature vector (TMS): the prompt lists active features as `index:value` (value 1
    when omitted); outputs are regression values, one per output feature."""

    input_kind = "features"
    output_kind = "values"

    def __init__(self, n_features: int, sample_fn: Callable[[int, torch.Generator], Tensor], model: nn.Module | None = None,
                 readout_fn: Callable[[str], Tensor | None] | None = None):
        self.n_features, self.sample_fn, self.model = n_features, sample_fn, model
        self.readout_fn = readout_fn
        self.example_prompt = "0:1 3:0.5"
        self.prompt_help = f"active features as index:value separated by spaces, index 0..{n_features - 1} (value 1 when omitted)"
        self.harvest_examples = 20000

    def encode(self, prompt: str) -> Tensor:
        x = torch.zeros(1, self.n_features)
        seen: dict[int, str] = {}
        for word in (w for w in re.split(r"[\s,]+", prompt.strip()) if w):
            index, _, value = word.partition(":")
            # ASCII digits only: int() and float() also read '1_1' (as 11) and other scripts' digits.
            i, v = parse_int(index), parse_float(value) if value else 1.0
            if i is None or v is None:
                raise PromptError(f"{word!r} is not index:value; type {self.prompt_help}")
            if not math.isfinite(v) or abs(v) > torch.finfo(torch.float32).max:
                raise PromptError(f"feature value {value!r} in {word!r} is not a finite fp32 number; give e.g. {index}:0.5")
            if not 0 <= i < self.n_features:
                raise PromptError(f"feature index {i} is out of range: the model has features 0..{self.n_features - 1}")
            if i in seen:
                raise PromptError(f"feature {i} is given twice ({seen[i]!r} and {word!r}); give each feature once")
            seen[i] = word
            x[0, i] = v
        return x

    def input_labels(self, example: Tensor) -> list[str]:
        active = [f"{i}:{float(v):.2g}" for i, v in enumerate(example) if float(v) != 0.0]
        return [" ".join(active) or "(all zero)"]

    def output_label(self, i: int) -> str:
        return f"x̂{i}"

    def prompt_of(self, example: Tensor) -> str:
        return " ".join(f"{i}:{float(v):.3g}" for i, v in enumerate(example) if float(v) != 0.0)

    def readout(self, site: str) -> Tensor | None:
        return self.readout_fn(site) if self.readout_fn is not None else None

    def sample(self, n: int, seed: int) -> Tensor:
        return self.sample_fn(n, generator(seed, 0, HARVEST_STREAM))

    def example(self, seed: int) -> Tensor:
        """The first example with some feature on among 256 drawn from `seed` (sparse data is mostly
        all zero: 77 % of TMS 5-2's examples), else the first."""
        batch = self.sample(256, seed)
        on = batch.ne(0).any(-1).nonzero()
        return batch[int(on[0]) if len(on) else 0]


# Module names of projections that write into the residual stream in common Hugging Face causal LMs
# (GPT-2 attn/mlp c_proj, Llama o_proj/down_proj, OPT/NeoX-style out_proj/fc2/dense_4h_to_h).
RESIDUAL_WRITERS = {"c_proj", "o_proj", "down_proj", "out_proj", "fc2", "dense_4h_to_h"}


class CausalLMAdapter(Adapter):
    """A Hugging Face causal LM with its tokenizer: any object with `encode(text) -> list[int]` and
    `decode(ids) -> str` (a `transformers` tokenizer, or a hand-made one).

    `texts` is the corpus the harvest draws windows of `window` tokens from. The readout of a site
    writing into the residual stream is the unembedding (the direct path; the final norm is ignored).
    """

    def __init__(self, model: nn.Module, tokenizer, texts: list[str] | None = None, window: int = 64,
                 bos_id: int | None = None, example_prompt: str = "The capital of France is"):
        self.model, self.tokenizer, self.texts, self.bos_id = model, tokenizer, texts or [], bos_id
        from tspd.targets.huggingface import max_positions

        self.context_length = max_positions(getattr(model, "config", None))
        self.window = min(window, self.context_length or window)
        self.example_prompt = example_prompt
        self.prompt_help = f"any text (at most {self.context_length} tokens)"
        self.harvest_examples = 512
        self.texts_missing: str | None = None  # why there is no corpus, when its source could not be read

    def _ids(self, text: str) -> list[int]:
        """The text's token ids without the tokenizer's own special tokens (as the training chunks are
        cut, tspd.data.text.chunk): a tokenizer that adds BOS itself would otherwise give two."""
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        except TypeError:  # a tokenizer without the option
            return list(self.tokenizer.encode(text))

    def encode(self, prompt: str) -> Tensor:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as err:  # e.g. a lone surrogate from a JSON "\ud800"
            raise PromptError(f"the prompt is not valid Unicode text ({err.reason} at character {err.start}); "
                              "remove that character") from None
        ids = self._ids(prompt)
        if self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        if not ids:
            raise PromptError("the prompt is empty; type some text")
        self.check_length(len(ids))
        return torch.tensor([ids])

    def output_label(self, i: int) -> str:
        return self.tokenizer.decode([i])

    def input_labels(self, example: Tensor) -> list[str]:
        return [self.output_label(int(t)) for t in example]

    def prompt_of(self, example: Tensor) -> str:
        ids = example.tolist()
        return self.tokenizer.decode(ids[1:] if self.bos_id is not None and ids[:1] == [self.bos_id] else ids)

    def readout(self, site: str) -> Tensor | None:
        if site.rpartition(".")[2] not in RESIDUAL_WRITERS:
            return None
        return self.model.get_output_embeddings().weight.T  # d_model x vocab

    def sample(self, n: int, seed: int) -> Tensor:
        if not self.texts and self.texts_missing:
            raise ValueError(self.texts_missing)
        stream = []
        for text in self.texts:
            stream += self._ids(text)
        if len(stream) < self.window:
            raise ValueError(
                f"the harvest corpus has {len(stream)} tokens, fewer than one window of {self.window}; pass more texts"
            )
        starts = torch.randint(0, len(stream) - self.window + 1, (n,), generator=generator(seed, 0, HARVEST_STREAM))
        ids = torch.tensor(stream)
        return torch.stack([ids[s : s + self.window] for s in starts.tolist()])


def _induction(dec: Decomposition, run_dir: Path) -> Adapter:
    from tspd.data.induction import InductionTask

    t = dec.config.target
    return InductionAdapter(InductionTask(t.n_tokens, t.seq_len), dec.target)


def _tms(dec: Decomposition, run_dir: Path) -> Adapter:
    from tspd.data.tms import sparse_features

    t, model = dec.config.target, dec.target
    p = dec.config.data.feature_probability if dec.config.data is not None else t.feature_probability

    def readout(site: str) -> Tensor | None:
        # linear1's output (the bottleneck) reaches the outputs through linear2 (before the ReLU).
        return {"linear1": model.linear2.weight.T, "linear2": torch.eye(t.n_features)}.get(site)

    return FeatureAdapter(t.n_features, lambda n, gen: sparse_features(n, t.n_features, p, gen), model, readout)


def _huggingface(dec: Decomposition, run_dir: Path) -> Adapter:
    """Harvest windows come from held-out documents of the run's text source, plus the facts
    sentences when the run mixed them in."""
    from tspd.data.text import SEPARATOR, documents, split_documents
    from tspd.targets.huggingface import load_tokenizer

    tokenizer = load_tokenizer(dec.config.target.model)
    data = dec.config.data
    texts: list[str] = []
    missing = None
    if data is not None and data.kind == "text":
        # Joined as training joins them (`data.text.chunk`: a blank line after each), so the windows
        # read like training text (without it a third of them ran two paragraphs together, and pieces
        # firing at paragraph breaks looked ~45x rarer than they are).
        try:
            texts = [d + SEPARATOR for d in split_documents(documents(data.source), data.heldout_fraction)[1][:200]]
        except FileNotFoundError as err:  # the run's text moved: every view but the harvest and random examples works
            missing = f"{err} (the run's data.source; the harvest and random examples need it)"
        if data.facts_fraction > 0:
            from tspd.data.facts import fact_sentences, load_facts

            texts.append(" ".join(fact_sentences(load_facts())))
    bos = getattr(tokenizer, "bos_token_id", None) if getattr(tokenizer, "add_bos_token", False) else None
    adapter = CausalLMAdapter(dec.target, tokenizer, texts, window=data.seq_len if data is not None else 64, bos_id=bos,
                              example_prompt="Tiger Woods plays the sport of")
    adapter.texts_missing = missing
    return adapter


ADAPTERS: dict[str, Callable[[Decomposition, Path], Adapter]] = {
    "induction": _induction, "tms": _tms, "huggingface": _huggingface,
}


def adapter_for(dec: Decomposition, run_dir: str | Path) -> Adapter:
    """The adapter for a run's target kind (config `target.kind`)."""
    kind = dec.config.target.kind if dec.config.target is not None else None
    if kind not in ADAPTERS:
        raise ValueError(
            f"the dashboard has no adapter for target kind {kind!r} (known: {', '.join(ADAPTERS)}; a run made with the "
            "Python API has no target section); from Python, pass one: tspd.app.serve(run_dir, adapter=...) with "
            "CausalLMAdapter(model, tokenizer, texts) for a language model, FeatureAdapter(n_features, sample_fn, model) "
            "for a model of feature vectors, or a subclass of tspd.app.adapters.Adapter"
        )
    return ADAPTERS[kind](dec, Path(run_dir))
