"""The athlete -> sport facts study (SPEC §6.3; paper's Figures 3 and 4), on any causal LM.

Prompts are "<template with an athlete's name>" and the answer is the sport's first token (with
a leading space). A prompt is *right* when that token beats the other sports' tokens. The study:
screen which prompts the model gets right, scan which layer holds the facts (remove a layer's
contribution at the name tokens), then, on a decomposition of that layer, pick for each sport the
subcomponents whose CI is high on its discovery athletes' names and low on other sports', ablate
them at the name tokens of held-out athletes, and compare with random subcomponents and top
singular directions of the same matrices at the same number of rank-1 pieces.

Example:
    >>> from tspd.analysis.facts import build_prompts
    >>> # prompts = build_prompts(tokenizer, athletes, ["{name} plays the sport of"])  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterator

import torch
from torch import Tensor, nn

from tspd.components import site_kind, target_weight
from tspd.data.facts import Athlete
from tspd.decomposition import Decomposition, call_target, restore_modules, swap_modules

NAME_PARTS = ("first", "last", "both")
# The per-sport bar: the own-sport drop at least this many times the collateral on other
# sports and the random-subcomponent drop, and general-text KL after the ablation at most TEXT_KL_MAX.
COLLATERAL_RATIO, RANDOM_RATIO, TEXT_KL_MAX = 5.0, 3.0, 0.02


@dataclass
class TokenPrompt:
    athlete: Athlete
    template: str
    ids: list[int]
    first: list[int]  # token positions of the first name
    last: list[int]  # token positions of the last name

    @property
    def text(self) -> str:
        return self.template.format(name=self.athlete.name)


@dataclass
class PromptBatch:
    """Right-padded token ids with the last real position and name-token masks of every prompt."""

    ids: Tensor  # (n, T) long
    last: Tensor  # (n,) long
    names: dict[str, Tensor] = field(default_factory=dict)  # part -> (n, T) bool

    def __len__(self) -> int:
        return self.ids.shape[0]


def _encode(tokenizer, text: str) -> list[int]:
    """`text`'s ids as the model reads them, without tokens the tokenizer appends to every text (an
    EOS some tokenizers add: the prompt must end with its own last token); a leading BOS is kept."""
    ids = list(tokenizer(text)["input_ids"])
    tail = _appended(tokenizer)
    return ids[: len(ids) - len(tail)] if tail and ids[len(ids) - len(tail) :] == tail else ids


@functools.lru_cache(maxsize=8)
def _appended(tokenizer) -> list[int]:
    """The tokens the tokenizer appends after every text (found once per tokenizer): the empty
    text's tokens beyond those it shares, in front, with a one-word text."""
    empty, word = list(tokenizer("")["input_ids"]), list(tokenizer("a")["input_ids"])
    lead = 0
    while lead < min(len(empty), len(word)) and empty[lead] == word[lead]:
        lead += 1
    return empty[lead:]


def sport_tokens(tokenizer, answers: dict[str, str]) -> dict[str, int]:
    """Each sport's answer token: the first token of its answer (" basketball"). Sports must not share it."""
    ids = {s: _first_new_token(tokenizer, a) for s, a in answers.items()}
    sports = list(answers)
    clash = [(a, b) for i, a in enumerate(sports) for b in sports[i + 1 :] if ids[a] == ids[b]]
    if clash:
        raise ValueError(f"sports {clash} start with the same token; give them distinct answer words")
    return ids


def _first_new_token(tokenizer, text: str) -> int:
    """The first token `text` adds (skipping a BOS the tokenizer puts at the start of every text)."""
    empty = _encode(tokenizer, "")
    ids = _encode(tokenizer, text)
    return ids[len(empty)] if ids[: len(empty)] == empty else ids[0]


def build_prompts(tokenizer, athletes: list[Athlete], templates: list[str]) -> list[TokenPrompt]:
    """Every (athlete, template) prompt with the token positions of the first and last name.

    Positions come from tokenising the text up to the end of each name part, which is exact for
    BPE tokenizers that split at spaces (GPT-2, Llama/SmolLM2)."""
    prompts = []
    for a in athletes:
        for tpl in templates:
            if "{name}" not in tpl:
                raise ValueError(f"template {tpl!r} has no {{name}} placeholder")
            before, _, after = tpl.partition("{name}")
            try:  # offsets into the formatted text: a doubled brace before {name} is one character there
                prefix, suffix = before.format(), after.format()
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"template {tpl!r} has braces other than {{name}} ({e}); write a literal brace "
                                 "as {{ or }}") from None
            text = prefix + a.name + suffix
            start = len(prefix)
            n0 = len(_encode(tokenizer, text[:start].rstrip(" "))) if start else len(_encode(tokenizer, ""))
            n1 = len(_encode(tokenizer, text[: start + len(a.first)]))
            n2 = len(_encode(tokenizer, text[: start + len(a.name)]))
            ids = _encode(tokenizer, text)
            if not n0 < n1 < n2 <= len(ids):
                raise ValueError(f"could not locate the name tokens of {a.name!r} in {text!r}")
            prompts.append(TokenPrompt(a, tpl, ids, list(range(n0, n1)), list(range(n1, n2))))
    return prompts


def batch_prompts(prompts: list[TokenPrompt], pad_id: int = 0) -> PromptBatch:
    n, T = len(prompts), max(len(p.ids) for p in prompts)
    ids = torch.full((n, T), pad_id, dtype=torch.long)
    names = {part: torch.zeros(n, T, dtype=torch.bool) for part in NAME_PARTS}
    for i, p in enumerate(prompts):
        ids[i, : len(p.ids)] = torch.tensor(p.ids)
        names["first"][i, p.first] = True
        names["last"][i, p.last] = True
    names["both"] = names["first"] | names["last"]
    return PromptBatch(ids, torch.tensor([len(p.ids) - 1 for p in prompts]), names)


def last_logprobs(logits: Tensor, last: Tensor) -> Tensor:
    """Log-probabilities (n, vocab) at each prompt's last real position (padding is to the right,
    so a causal model's logits there do not see it)."""
    return torch.log_softmax(logits[torch.arange(len(last)), last].float(), dim=-1)


class _AtLast(nn.Module):
    """Stands in for a language model's output head: applies it only at each prompt's last
    position (the rows of a stacked batch repeat the prompts), giving (rows, 1, vocab)."""

    def __init__(self, head: nn.Module, last: Tensor):
        super().__init__()
        self.__dict__["head"] = head
        self.last = last

    def forward(self, h: Tensor) -> Tensor:
        idx = self.last.to(h.device).repeat(h.shape[0] // len(self.last))
        return self.head(h[torch.arange(h.shape[0], device=h.device), idx].unsqueeze(1))


@contextlib.contextmanager
def logits_at_last(model: nn.Module | None, last: Tensor, skip: Collection[str] = ()) -> Iterator[bool]:
    """While active, `model`'s output head runs only at the positions `last` (the vocabulary
    projection at every other position is what dominates a prompt's forward in a small LM).
    Yields False (and changes nothing) when the model has no separate output head or the head is
    one of `skip` (a decomposed site)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    if not name or name in skip:
        yield False
        return
    swapped = swap_modules(model, [(name, _AtLast(head, last))])
    try:
        yield True
    finally:
        restore_modules(swapped)


def _last_logprobs(logits: Tensor, last: Tensor, at_last: bool) -> Tensor:
    return torch.log_softmax(logits[:, 0].float(), dim=-1) if at_last else last_logprobs(logits, last)


@torch.no_grad()
def answer_logprobs(
    forward: Callable[[Tensor, slice], Tensor], batch: PromptBatch, answer_ids: Tensor, chunk: int = 64,
    model: nn.Module | None = None, skip: Collection[str] = (),
) -> Tensor:
    """Log-probability (n, n_answers) of each answer token at each prompt's last position.
    `forward(ids, rows)` returns logits for the rows `rows` of the batch; pass the `model` it runs
    to compute the output head at the last positions only (see `logits_at_last`)."""
    out = []
    for lo in range(0, len(batch), chunk):
        rows = slice(lo, lo + chunk)
        with logits_at_last(model, batch.last[rows], skip) as at_last:
            lp = _last_logprobs(forward(batch.ids[rows], rows), batch.last[rows], at_last)
        out.append(lp[:, answer_ids])
    return torch.cat(out)


def screen(model: nn.Module, tokenizer, prompts: list[TokenPrompt], answers: dict[str, str]) -> dict:
    """Which prompts the model gets right (its sport's token is the top one among the sports').

    Returns {"right": [bool per prompt], "logprob": [...], "accuracy": {sport: fraction},
    "by_template": {template: fraction}, "default_answer": {template: [sport, share]}}: a template
    whose most-predicted sport takes most of its prompts is answering by default, not by name."""
    sports = list(answers)
    tok_ids = sport_tokens(tokenizer, answers)
    answers = torch.tensor([tok_ids[s] for s in sports])
    batch = batch_prompts(prompts, pad_id(tokenizer))
    lp = answer_logprobs(lambda ids, rows: call_target(model, ids), batch, answers, model=model)
    truth = torch.tensor([sports.index(p.athlete.sport) for p in prompts])
    right = lp.argmax(-1) == truth
    acc = {s: _mean([bool(r) for r, p in zip(right, prompts) if p.athlete.sport == s]) for s in sports}
    templates = list(dict.fromkeys(p.template for p in prompts))
    by_tpl = {t: _mean([bool(r) for r, p in zip(right, prompts) if p.template == t]) for t in templates}
    default = {}
    for t in templates:
        picks = lp.argmax(-1)[torch.tensor([p.template == t for p in prompts])]
        top = torch.bincount(picks, minlength=len(sports))
        default[t] = [sports[int(top.argmax())], float(top.max() / len(picks))]
    return {
        "default_answer": default,
        "right": right.tolist(),
        "logprob": lp[torch.arange(len(prompts)), truth].tolist(),
        "accuracy": acc,
        "by_template": by_tpl,
        "overall": float(right.float().mean()),
    }


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else float("nan")


def pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


# ---- where do the facts live? ---------------------------------------------------------------
def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (the longest ModuleList whose items have an MLP)."""
    best = None
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) and all(hasattr(b, "mlp") for b in m):
            if best is None or len(m) > len(best):
                best = m
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of blocks with an `mlp` child; pass the layers explicitly")
    return best


def _attention(block: nn.Module) -> nn.Module:
    for name in ("self_attn", "attn", "attention"):
        if hasattr(block, name):
            return getattr(block, name)
    raise ValueError(f"block {type(block).__name__} has no self_attn/attn child")


@contextlib.contextmanager
def zero_output_at(module: nn.Module, where: Tensor) -> Iterator[None]:
    """Remove `module`'s contribution at the positions `where` (n, T) bool: its output is zeroed there."""

    def hook(_m, _args, out):
        t = out[0] if isinstance(out, tuple) else out
        t = t.masked_fill(where[..., None], 0.0)
        return (t, *out[1:]) if isinstance(out, tuple) else t

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def layer_scan(model: nn.Module, batch: PromptBatch, answers: Tensor, part: str = "both") -> dict:
    """Per layer, the mean drop in log-probability of the right sport when that layer's MLP (or
    attention) output is removed at the name tokens. `answers` holds each prompt's answer token."""
    rows = torch.arange(len(batch))

    def right_lp() -> Tensor:
        with logits_at_last(model, batch.last) as at_last:
            lp = _last_logprobs(call_target(model, batch.ids), batch.last, at_last)
        return lp[rows, answers]

    clean = right_lp()
    result: dict[str, list[float]] = {"mlp": [], "attn": []}
    for block in transformer_blocks(model):
        for kind, module in (("mlp", block.mlp), ("attn", _attention(block))):
            with zero_output_at(module, batch.names[part]):
                result[kind].append(float((clean - right_lp()).mean()))
    result["clean_logprob"] = float(clean.mean())
    result["best_mlp_layer"] = int(torch.tensor(result["mlp"]).argmax())
    return result


# ---- choosing and ablating subcomponents ------------------------------------------------------
def name_ci(dec: Decomposition, batch: PromptBatch, part: str = "both", chunk: int = 64) -> dict[str, Tensor]:
    """Per site, each prompt's max CI over its name tokens: (n_prompts, C)."""
    out: dict[str, list[Tensor]] = {s: [] for s in dec.site_names}
    for lo in range(0, len(batch), chunk):
        ci = dec.causal_importance(batch.ids[lo : lo + chunk])
        where = batch.names[part][lo : lo + chunk, :, None]
        for s, g in ci.items():
            out[s].append(g.float().masked_fill(~where, 0.0).amax(dim=1))
    return {s: torch.cat(v) for s, v in out.items()}


def select_for_sport(
    ci: dict[str, Tensor], is_sport: Tensor, k: int = 4, min_ci: float = 0.5, min_gap: float = 0.25
) -> list[tuple[str, int]]:
    """The sport's subcomponents: mean name-token CI on its prompts >= min_ci and at least min_gap
    above the mean on other sports' prompts (0 when there are none); the k with the largest gap, as
    (site, index)."""
    scored = []
    for s, g in ci.items():
        on = g[is_sport].mean(0)
        off = g[~is_sport].mean(0) if bool((~is_sport).any()) else torch.zeros_like(on)
        for c in torch.nonzero((on >= min_ci) & (on - off >= min_gap)).flatten().tolist():
            scored.append((float(on[c] - off[c]), s, c))
    scored.sort(reverse=True)
    return [(s, c) for _, s, c in scored[:k]]


def attribution_drops(
    dec: Decomposition, batch: PromptBatch, sport_of: Tensor, answer_ids: Tensor, chunk: int = 32,
) -> dict[str, Tensor]:
    """First-order estimate of every subcomponent's ablation effect (attribution patching): per
    site, (n_prompts, C) the drop of each prompt's right-sport log-probability when the piece goes
    from mask 1 to 0 at the name tokens, estimated as the sum over name tokens of d log p / d mask
    at all-ones masks. One forward and backward per chunk of prompts scores every piece at once;
    `rank_by_ablation` then measures the best of them exactly."""
    out: dict[str, list[Tensor]] = {s: [] for s in dec.site_names}
    for lo in range(0, len(batch), chunk):
        ids, last = batch.ids[lo : lo + chunk], batch.last[lo : lo + chunk]
        right = answer_ids[sport_of[lo : lo + chunk]]
        where = batch.names["both"][lo : lo + chunk, :, None].float()
        with logits_at_last(dec.target, last, dec.site_names) as at_last:
            with torch.no_grad():
                _, inputs = dec.run_target(ids)
                ci, _ = dec.ci_from_logits(dec.ci_logits(inputs))
            p = dec.ones_pass(ci)
            p.masks = {s: m.float().requires_grad_(True) for s, m in p.masks.items()}
            lp = _last_logprobs(dec.run_pass(ids, p), last, at_last)[torch.arange(len(last)), right]
            grads = torch.autograd.grad(lp.sum(), list(p.masks.values()))
        for s, g in zip(p.masks, grads):
            out[s].append((g.float() * where).sum(1))
    return {s: torch.cat(v) for s, v in out.items()}


def select_by_attribution(
    drops: dict[str, Tensor], ci: dict[str, Tensor], is_sport: Tensor, n: int, min_ci: float = 0.25,
    collateral_weight: float = 1.0,
) -> list[tuple[str, int]]:
    """The sport's candidates by estimated effect: pieces whose mean name-token CI on its prompts
    is >= min_ci, ranked by estimated drop on its prompts - w |estimated change on the others'|;
    the n best with a positive estimate, as (site, index). Unlike `select_for_sport` this needs no
    CI gap over other sports, so it also finds fact-bearing pieces in dense decompositions, where
    most pieces are on for every name."""
    scored = []
    for s, d in drops.items():
        on = ci[s][is_sport].mean(0)
        own = d[is_sport].mean(0)
        other = d[~is_sport].mean(0) if bool((~is_sport).any()) else torch.zeros_like(own)
        score = own - collateral_weight * other.abs()
        for c in torch.nonzero((on >= min_ci) & (score > 0)).flatten().tolist():
            scored.append((float(score[c]), s, c))
    scored.sort(reverse=True)
    return [(s, c) for _, s, c in scored[:n]]


@torch.no_grad()
def ablation_logprobs(
    dec: Decomposition, batch: PromptBatch, answer_ids: Tensor, piece_sets: list[list[tuple[str, int]]],
    where: Tensor, per_forward: int = 8,
) -> Tensor:
    """Answer log-probabilities (len(piece_sets), n_prompts, n_answers) with each set of pieces at
    mask 0 where `where` (n_prompts, T) is True and every other subcomponent at mask 1. One target
    run for the batch; the sets run as stacked passes, `per_forward` at a time, replaying the
    target's blocks before the first site."""
    with logits_at_last(dec.target, batch.last, dec.site_names) as at_last:
        _, inputs = dec.run_target(batch.ids)
        ci, _ = dec.ci_from_logits(dec.ci_logits(inputs))
        out = []
        for lo in range(0, len(piece_sets), per_forward):
            passes = [dec.ablation_pass(ci, group(pieces), where) for pieces in piece_sets[lo : lo + per_forward]]
            for logits in dec.run_passes(batch.ids, passes, stack=True):
                out.append(_last_logprobs(logits, batch.last, at_last)[:, answer_ids])
    return torch.stack(out)


def _ablation_score(drop: Tensor, own: Tensor, collateral_weight: float) -> dict:
    """From each prompt's drop of its right sport's log-probability: the mean drop on the sport's
    prompts (`own`), on the others', and the score own - w |other|."""
    on = float(drop[own].mean())
    off = float(drop[~own].mean()) if bool((~own).any()) else 0.0
    return {"drop_own": on, "drop_other": off, "score": on - collateral_weight * abs(off)}


def rank_by_ablation(
    dec: Decomposition, batch: PromptBatch, sport_of: Tensor, s_idx: int, answer_ids: Tensor,
    candidates: list[tuple[str, int]], k: int = 4, clean: Tensor | None = None, collateral_weight: float = 1.0,
) -> tuple[list[tuple[str, int]], list[dict]]:
    """Rank candidates by a causal test on the *discovery* prompts: ablate each one alone at the
    name tokens and score it by the drop of the right sport's log-probability on this sport's
    prompts minus `collateral_weight` times the absolute mean change on other sports' prompts
    (default 1; 5 would mirror the study's 5x collateral bar). Returns the (at most k)
    candidates with a positive score, best first, and every candidate's scores."""
    rows = torch.arange(len(batch))
    if clean is None:
        clean = ablation_logprobs(dec, batch, answer_ids, [[]], batch.names["both"])[0][rows, sport_of]
    own = sport_of == s_idx
    scores = []
    if candidates:
        lps = ablation_logprobs(dec, batch, answer_ids, [[c] for c in candidates], batch.names["both"])
    for (s, c), lp in zip(candidates, lps if candidates else []):
        scores.append({"site": s, "index": c, **_ablation_score(clean - lp[rows, sport_of], own, collateral_weight)})
    best = sorted((r for r in scores if r["score"] > 0), key=lambda r: -r["score"])[:k]
    return [(r["site"], r["index"]) for r in best], scores


def best_prefix(
    dec: Decomposition, batch: PromptBatch, sport_of: Tensor, s_idx: int, answer_ids: Tensor,
    ranked: list[tuple[str, int]], clean: Tensor, collateral_weight: float = 1.0,
) -> tuple[list[tuple[str, int]], list[dict]]:
    """The set size chosen on the *discovery* prompts: ablate the first j ranked pieces together
    (j = 1..len(ranked)) and keep the prefix with the best set score, drop on the sport -
    `collateral_weight` |mean change on other sports| (single-piece scores do not add up: pieces
    overlap and their collateral can build up or cancel). Returns (prefix, every prefix's scores)."""
    if not ranked:
        return [], []
    rows = torch.arange(len(batch))
    own = sport_of == s_idx
    prefixes = [ranked[: j + 1] for j in range(len(ranked))]
    lps = ablation_logprobs(dec, batch, answer_ids, prefixes, batch.names["both"])
    scores = []
    for pre, lp in zip(prefixes, lps):
        scores.append({"size": len(pre), **_ablation_score(clean - lp[rows, sport_of], own, collateral_weight)})
    best = max(range(len(scores)), key=lambda i: scores[i]["score"])
    return prefixes[best], scores


def group(pieces: list[tuple[str, int]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for s, c in pieces:
        out.setdefault(s, []).append(c)
    return out


@contextlib.contextmanager
def svd_removed(dec: Decomposition, counts: dict[str, int], where: Tensor, rows_of: list[slice]) -> Iterator[None]:
    """Remove the top `counts[site]` singular directions of each site's weight matrix from the
    target at the positions `where` (the SVD baseline). `rows_of[0]` names the rows being run."""
    modules = dict(dec.target.named_modules())
    handles = []
    for s, k in counts.items():
        module = modules[s]
        kind = site_kind(module)
        W = target_weight(module, kind).detach().float()  # (d_out, d_in); an embedding's d_in is its vocabulary
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        down, up = (Vh[:k].T * S[:k]), U[:, :k].T  # x @ down @ up = the top-k part of x W^T

        def hook(_m, args, out, down=down, up=up, lookup=kind == "embedding"):
            x = args[0]  # token ids for an embedding: its one-hot rows times down are rows of down
            w = where[rows_of[0]][..., None].to(out.dtype)
            return out - w * ((down[x] if lookup else x.float() @ down) @ up).to(out.dtype)

        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def svd_forward(dec: Decomposition, counts: dict[str, int], where: Tensor) -> Callable:
    rows_of = [slice(None)]

    def forward(ids: Tensor, rows: slice) -> Tensor:
        rows_of[0] = rows
        with svd_removed(dec, counts, where, rows_of), torch.no_grad():
            return call_target(dec.target, ids)

    return forward


def alive_pieces(ci: dict[str, Tensor], threshold: float) -> list[tuple[str, int]]:
    return [(s, c) for s, g in ci.items() for c in torch.nonzero(g.amax(0) > threshold).flatten().tolist()]


def kl_per_token(target_logits: Tensor, logits: Tensor) -> Tensor:
    """KL(target || other) at every position, in nats: (n, T)."""
    p = torch.log_softmax(target_logits.float(), -1)
    q = torch.log_softmax(logits.float(), -1)
    return (p.exp() * (p - q)).sum(-1)


def ce_per_token(logits: Tensor, ids: Tensor) -> Tensor:
    """Next-token cross-entropy (n, T-1)."""
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    return -lp.gather(-1, ids[:, 1:, None])[..., 0]


def finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def bootstrap_effect(
    delta: Tensor, sport: Tensor, athlete: list[str], s: int, random_effect: float, n: int = 2000, seed: int = 0,
    level: float = 0.9,
) -> dict:
    """How sure the per-sport verdict is: resample held-out *athletes* with replacement (each
    athlete's prompts stay together; sport `s`'s athletes and the other sports' separately) and
    recompute the target effect (-mean change on sport s's prompts) and the collateral (-mean
    change on the other sports'). Returns `level` percentile intervals of both and
    `pass_fraction`: the share of resamples meeting the collateral bar (effect >= COLLATERAL_RATIO x
    |collateral|) and the random bar (effect >= RANDOM_RATIO x |random_effect|, the random baseline
    held fixed).

    `delta[i]` is prompt i's change of log p(right sport); `sport[i]` its sport's index;
    `athlete[i]` its athlete's name."""
    gen = torch.Generator().manual_seed(seed)

    def clusters(mask: Tensor) -> tuple[Tensor, Tensor]:
        """Per athlete among the masked prompts: the sum of their changes and their prompt count."""
        rows = torch.nonzero(mask).flatten().tolist()
        index = {a: j for j, a in enumerate(sorted({athlete[i] for i in rows}))}
        which = torch.tensor([index[athlete[i]] for i in rows], dtype=torch.long)
        sums = torch.zeros(len(index), dtype=torch.float64).index_add_(0, which, delta[rows].double())
        counts = torch.zeros(len(index), dtype=torch.float64).index_add_(0, which, torch.ones(len(rows), dtype=torch.float64))
        return sums, counts

    def resample(sums: Tensor, counts: Tensor) -> Tensor:
        pick = torch.randint(len(sums), (n, len(sums)), generator=gen)
        return sums[pick].sum(1) / counts[pick].sum(1)

    own_s, own_c = clusters(sport == s)
    oth_s, oth_c = clusters(sport != s)
    if len(own_s) == 0 or len(oth_s) == 0:
        raise ValueError("bootstrap_effect needs prompts of sport s and of at least one other sport")
    effect, collateral = -resample(own_s, own_c), -resample(oth_s, oth_c)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    passes = (effect >= COLLATERAL_RATIO * collateral.abs()) & (effect >= RANDOM_RATIO * abs(random_effect))
    return {
        "level": level,
        "n_resamples": n,
        "n_athletes": len(own_s),
        "target_effect": [float(v) for v in torch.quantile(effect, q)],
        "collateral_facts": [float(v) for v in torch.quantile(collateral, q)],
        "pass_fraction": float(passes.double().mean()),
    }
