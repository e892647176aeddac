"""The facts study end to end: screen, layer scan and ablation, writing JSON and figures.

Example:
    >>> from tspd.analysis.facts_study import screen_model, facts_ablate
    >>> screen_model("smollm2", "runs/facts-screen")  # doctest: +SKIP
    >>> facts_ablate("runs/smollm2-facts")  # doctest: +SKIP
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm import tqdm

from tspd.analysis import facts as F
from tspd.data.facts import Facts, load_facts, split_athletes
from tspd.decomposition import Decomposition, call_target, load, write_json
from tspd.losses import recon_passes



def screened_prompts(model, tokenizer, facts: Facts, athletes=None) -> tuple[list[F.TokenPrompt], dict]:
    """All (athlete, template) prompts for `athletes` (default: all) and the screen of them."""
    athletes = facts.athletes if athletes is None else athletes
    prompts = F.build_prompts(tokenizer, athletes, list(facts.templates))
    return prompts, F.screen(model, tokenizer, prompts, facts.answers)


def known_prompts(prompts: list[F.TokenPrompt], scr: dict, max_default_share: float = 0.5) -> list[F.TokenPrompt]:
    """The prompts the model gets right, except those whose sport is their template's default
    answer when that answer takes more than `max_default_share` of the template's prompts (right
    by default, not because of the name). A right answer that beats the default is kept."""
    default = {t: sport for t, (sport, share) in scr["default_answer"].items() if share > max_default_share}
    return [p for p, r in zip(prompts, scr["right"]) if r and default.get(p.template) != p.athlete.sport]


def screen_model(model_name: str, out: str | Path | None = None, seed: int = 0, facts_file: str | Path | None = None) -> dict:
    """Screen every (athlete, template) prompt; writes OUT/screen.json. Returns the summary.
    `facts_file`: a facts JSON of the shipped layout (tspd/data/facts.json) instead of the shipped one."""
    from tspd.targets.huggingface import load_lm

    facts = load_facts(facts_file)  # a bad file fails before the model loads
    model, tokenizer = load_lm(model_name, seed)
    prompts, result = screened_prompts(model, tokenizer, facts)
    discovery, heldout = split_athletes(facts, seed=seed)
    held = {a.name for a in heldout}
    result["prompts"] = [
        {"athlete": p.athlete.name, "sport": p.athlete.sport, "template": p.template, "right": r, "heldout": p.athlete.name in held}
        for p, r in zip(prompts, result["right"])
    ]
    del result["right"], result["logprob"]
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_json(Path(out) / "screen.json", result)
    return result


def scan_model(model_name: str, out: str | Path, seed: int = 0, facts_file: str | Path | None = None) -> dict:
    """The layer scan on the discovery prompts the model gets right; writes scan.json and scan.png."""
    from tspd.report.facts import facts_scan_figure
    from tspd.targets.huggingface import load_lm

    facts = load_facts(facts_file)  # a bad file fails before the model loads
    model, tokenizer = load_lm(model_name, seed)
    discovery, _ = split_athletes(facts, seed=seed)
    right = known_prompts(*screened_prompts(model, tokenizer, facts, discovery))
    if not right:
        raise ValueError(f"{model_name} gets no discovery prompt right; the scan needs facts the model knows")
    answers = F.sport_tokens(tokenizer, facts.answers)
    batch = F.batch_prompts(right, F.pad_id(tokenizer))
    result = F.layer_scan(model, batch, torch.tensor([answers[p.athlete.sport] for p in right]))
    result["n_prompts"] = len(right)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "scan.json", result)
    facts_scan_figure(result, out / "scan.png")
    return result


def _text_rows(dec: Decomposition, n: int) -> torch.Tensor:
    """`n` held-out general-text chunks (the data source's evaluation stream)."""
    from tspd.targets import build_data

    cfg = dec.config
    data = build_data(cfg.data, cfg.target, cfg.train.batch_size, cfg.seed)
    rows = []
    step = -1
    while sum(r.shape[0] for r in rows) < n:
        rows.append(data(step))
        step -= 1
    return torch.cat(rows)[:n]


@torch.no_grad()
def _text_effect(dec: Decomposition, ids: torch.Tensor, pieces, chunk: int = 16) -> dict:
    """KL (reference -> ablated) per token and CE change on general text, ablating `pieces` everywhere.

    The reference is the decomposition with every mask 1, as for the prompts' drops (`ablation_logprobs`
    with no pieces): with the delta component that is the target itself; without it, comparing with
    the target would count the decomposition's own error (V U against W) as the ablation's effect."""
    kl, ce_t, ce_a = [], [], []
    own_reference = not dec.config.masks.delta_component
    for lo in range(0, ids.shape[0], chunk):
        x = ids[lo : lo + chunk]
        t, inputs = dec.run_target(x)  # also records the blocks the ablated pass replays
        if pieces or own_reference:
            ci, _ = dec.ci_from_logits(dec.ci_logits(inputs))
            passes = [dec.ablation_pass(ci, F.group(pieces))]
            if own_reference:
                passes.insert(0, dec.ablation_pass(ci, {}))
            outs = dec.run_passes(x, passes)
            t, a = (outs[0], outs[1]) if own_reference else (t, outs[0])
        else:
            a = t
        kl.append(F.kl_per_token(t, a).flatten())
        ce_t.append(F.ce_per_token(t, x).flatten())
        ce_a.append(F.ce_per_token(a, x).flatten())
    return {
        "kl": float(torch.cat(kl).mean()),
        "ce_change": float(torch.cat(ce_a).mean() - torch.cat(ce_t).mean()),
    }


@torch.no_grad()
def faithfulness_on_text(dec: Decomposition, ids: torch.Tensor, chunk: int = 16) -> dict:
    """The CI-masked model against the target on held-out text: KL per token, CE change, and the
    mean number of active subcomponents per token (all sites together)."""
    kl, ce_t, ce_m, active = [], [], [], []
    thr = dec.config.eval.active_threshold
    for lo in range(0, ids.shape[0], chunk):
        x = ids[lo : lo + chunk]
        t, inputs = dec.run_target(x)
        ci, _ = dec.ci_from_logits(dec.ci_logits(inputs))
        m = dec.run_pass(x, recon_passes("ci_masked_recon", dec, ci, torch.Generator())[0])
        kl.append(F.kl_per_token(t, m).flatten())
        ce_t.append(F.ce_per_token(t, x).flatten())
        ce_m.append(F.ce_per_token(m, x).flatten())
        active.append(sum((g > thr).float().sum(-1) for g in ci.values()).flatten())
    return {
        "kl_per_token": float(torch.cat(kl).mean()),
        "ce_target": float(torch.cat(ce_t).mean()),
        "ce_increase": float(torch.cat(ce_m).mean() - torch.cat(ce_t).mean()),
        "active_per_token": float(torch.cat(active).mean()),
    }


SELECT_MODES = ("causal", "attribution", "ci")


def facts_ablate(
    run_dir: str | Path, k: int = 4, n_random: int = 10, n_text: int = 64, min_ci: float = 0.5, min_gap: float = 0.25,
    max_default_share: float = 0.5, select: str = "causal", n_candidates: int = 24, progress: bool = True,
    collateral_weight: float = 1.0, choose_size: bool = False, out_dir: str | Path | None = None,
    name_at_start: bool = True, facts_file: str | Path | None = None,
) -> dict:
    """Per sport: choose subcomponents on discovery athletes, ablate them at the name tokens of
    held-out athletes; collateral on other sports and general text; random and SVD baselines.
    Writes facts.json, facts.html and the figures facts_effects.png and facts_name_parts.png to
    `out_dir` (default RUN_DIR).

    select="attribution": like "causal", but the candidates are the n_candidates pieces with CI
    >= min_ci / 2 (no gap needed) whose first-order estimated ablation score (F.attribution_drops,
    one backward pass for all pieces) is best; they are then measured exactly as for "causal".
    select="ci": the k subcomponents with name-token CI >= min_ci on the sport's discovery prompts
    and >= min_gap above other sports'. select="causal": up to n_candidates subcomponents with CI
    >= min_ci / 2 and a gap >= min_gap / 2, each ablated alone on the discovery prompts; the k
    with the largest drop on the sport minus the absolute change on other sports (held-out
    athletes are never looked at while choosing); `collateral_weight` w scores a candidate by
    drop on the sport - w |change on other sports|. `choose_size` (causal): of those k, keep the
    prefix whose joint ablation scores best on the discovery prompts (F.best_prefix). A separate
    `out_dir` keeps several selection settings of one decomposition side by side.
    `name_at_start=False` leaves out every prompt whose name starts at position 0: with no BOS
    token (SmolLM2) that position usually serves as an attention sink and behaves unlike later ones, and
    pieces acting there can move the answer without touching how later positions look facts up.
    `facts_file`: athletes and templates from a facts JSON of the shipped layout instead of the
    shipped tspd/data/facts.json (discovery and held-out athletes are split from it the same way)."""
    if select not in SELECT_MODES:
        raise ValueError(f"select must be one of {', '.join(SELECT_MODES)}, not {select!r}")
    if k < 1:
        raise ValueError(f"k (subcomponents per sport) must be at least 1, got {k}")
    from tspd.report.facts import facts_effect_figure, facts_parts_figure, facts_report
    from tspd.targets.huggingface import load_tokenizer

    run_dir = Path(run_dir)
    facts = load_facts(facts_file)  # a bad file fails before the run loads
    dec = load(run_dir)
    cfg = dec.config
    if cfg.target is None or cfg.target.kind != "huggingface":
        kind = "none: a Python-API run" if cfg.target is None else cfg.target.kind
        raise ValueError(f"{run_dir} is not a language-model run (its target.kind is {kind}); the facts study needs a "
                         "target of kind huggingface")
    tokenizer = load_tokenizer(cfg.target.model)
    discovery, heldout = split_athletes(facts, seed=cfg.seed)
    if getattr(cfg.data, "facts_fraction", 0) > 0:  # the run trained on the shipped discovery athletes' facts
        trained = {a.name for a in split_athletes(load_facts(), seed=cfg.seed)[0]}
        seen = sorted(a.name for a in heldout if a.name in trained)
        if seen:
            raise ValueError(
                f"{len(seen)} held-out athletes of the facts file (e.g. {', '.join(seen[:3])}) had their facts in "
                f"this run's decomposition data (data.facts_fraction > 0 mixes the shipped facts.json's discovery "
                f"athletes in); use a facts file with the shipped athletes in the shipped order, or none"
            )
    pad = F.pad_id(tokenizer)
    answers = F.sport_tokens(tokenizer, facts.answers)
    sports = list(facts.answers)
    answer_ids = torch.tensor([answers[s] for s in sports])

    disc, held = (known_prompts(*screened_prompts(dec.target, tokenizer, facts, a), max_default_share)
                  for a in (discovery, heldout))
    empty = [name for name, ps in (("discovery", disc), ("held-out", held)) if not ps]
    if empty:
        raise ValueError(f"{cfg.target.model} gets no {' and no '.join(empty)} prompt right (answers screened with "
                         f"max_default_share {max_default_share}); the study needs facts the model knows: check "
                         "`tspd facts screen`, use a facts file with facts it knows, or a larger model")
    if not name_at_start:
        disc, held = ([p for p in ps if min(p.first) > 0] for ps in (disc, held))
        if not disc or not held:
            raise ValueError("no right-answered discovery or held-out prompt has its name after position 0 (a template "
                             "that starts with {name} puts it there when the tokenizer adds no BOS token); drop "
                             "--name-not-first or add templates whose name comes later")
    d_batch, h_batch = F.batch_prompts(disc, pad), F.batch_prompts(held, pad)
    d_sport = torch.tensor([sports.index(p.athlete.sport) for p in disc])
    h_sport = torch.tensor([sports.index(p.athlete.sport) for p in held])
    ci = F.name_ci(dec, d_batch)
    alive = F.alive_pieces(ci, cfg.eval.alive_threshold)
    text_ids = _text_rows(dec, n_text)
    rows = torch.arange(len(held))
    h_athlete = [p.athlete.name for p in held]
    clean_right = F.ablation_logprobs(dec, h_batch, answer_ids, [[]], h_batch.names["both"])[0][rows, h_sport]
    # The SVD baseline edits the target's own weights, so its effects are measured against the plain
    # target (the same as all-ones masks only with the delta component on).
    with torch.no_grad():
        target_right = F.answer_logprobs(lambda ids, _rows: call_target(dec.target, ids), h_batch, answer_ids,
                                         model=dec.target, skip=dec.site_names)[rows, h_sport]

    def effects(lp: torch.Tensor, clean: torch.Tensor = clean_right) -> torch.Tensor:
        """Change of each held-out prompt's right-sport log-probability."""
        return lp[rows, h_sport] - clean

    def summary(delta: torch.Tensor, s: int) -> dict:
        own, other = delta[h_sport == s], delta[h_sport != s]
        return {"target_effect": float(-own.mean()), "collateral_facts": float(-other.mean())}

    rng = random.Random(cfg.seed)
    d_clean = drops = None
    if select == "attribution":
        drops = F.attribution_drops(dec, d_batch, d_sport, answer_ids)
    if select in ("causal", "attribution"):
        d_clean = F.ablation_logprobs(dec, d_batch, answer_ids, [[]], d_batch.names["both"])[0][torch.arange(len(disc)), d_sport]
    result = {"k": k, "select": select, "n_candidates": n_candidates, "collateral_weight": collateral_weight,
              "choose_size": choose_size, "min_ci": min_ci, "min_gap": min_gap,
              "max_default_share": max_default_share, "name_at_start": name_at_start,
              "facts_file": None if facts_file is None else str(facts_file), "n_discovery_prompts": len(disc),
              "n_heldout_prompts": len(held), "faithfulness": faithfulness_on_text(dec, text_ids), "sports": {}}
    bar = tqdm(sports, desc="facts ablation", disable=not progress)
    for s_idx, sport in enumerate(bar):
        n_held = int((h_sport == s_idx).sum())
        is_sport = d_sport == s_idx
        row: dict = {"n_heldout_prompts": n_held, "n_discovery_prompts": int(is_sport.sum())}
        if n_held == 0 or not bool(is_sport.any()):
            row["skipped"] = "the model gets no discovery or no held-out prompt of this sport right"
            result["sports"][sport] = row
            continue
        if n_held == len(held):
            row["skipped"] = "the model gets no held-out prompt of another sport right, so no collateral can be measured"
            result["sports"][sport] = row
            continue
        if select == "ci":
            pieces = F.select_for_sport(ci, is_sport, k, min_ci, min_gap)
            why = f"no subcomponent with name-token CI >= {min_ci} and >= {min_gap} above other sports"
        else:
            if select == "causal":
                cands = F.select_for_sport(ci, is_sport, n_candidates, min_ci / 2, min_gap / 2)
                pool = f"name-token CI >= {min_ci / 2}, >= {min_gap / 2} above other sports"
            else:
                cands = F.select_by_attribution(drops, ci, is_sport, n_candidates, min_ci / 2, collateral_weight)
                pool = f"name-token CI >= {min_ci / 2}, positive estimated score"
            pieces, row["candidates"] = F.rank_by_ablation(dec, d_batch, d_sport, s_idx, answer_ids, cands, k, d_clean,
                                                           collateral_weight)
            if choose_size:
                pieces, row["prefixes"] = F.best_prefix(dec, d_batch, d_sport, s_idx, answer_ids, pieces, d_clean,
                                                        collateral_weight)
            why = (f"none of {len(cands)} candidates ({pool}) lowers the sport more than the others when ablated "
                   "on discovery prompts")
        row["pieces"] = [[s, c] for s, c in pieces]
        if not pieces:
            row["skipped"] = why
            result["sports"][sport] = row
            continue
        deltas = {}
        for part in F.NAME_PARTS:
            deltas[part] = effects(F.ablation_logprobs(dec, h_batch, answer_ids, [pieces], h_batch.names[part])[0])
            row[part] = summary(deltas[part], s_idx)
        draws = [rng.sample(alive, min(len(pieces), len(alive))) for _ in range(n_random)]
        lps = F.ablation_logprobs(dec, h_batch, answer_ids, draws, h_batch.names["both"])
        rand = [summary(effects(lp), s_idx)["target_effect"] for lp in lps]
        row["random_target_effect"] = sum(rand) / len(rand)
        counts = {s: len(c) for s, c in F.group(pieces).items()}
        svd_lp = F.answer_logprobs(F.svd_forward(dec, counts, h_batch.names["both"]), h_batch, answer_ids,
                                   model=dec.target, skip=dec.site_names)
        row["svd"] = summary(effects(svd_lp, target_right), s_idx)
        row["text"] = _text_effect(dec, text_ids, pieces)
        b = row["both"]
        row["bootstrap"] = F.bootstrap_effect(deltas["both"], h_sport, h_athlete, s_idx, row["random_target_effect"], seed=cfg.seed)
        row["ratio_vs_collateral"] = b["target_effect"] / max(abs(b["collateral_facts"]), 1e-9)
        row["ratio_vs_random"] = b["target_effect"] / max(abs(row["random_target_effect"]), 1e-9)
        row["passes"] = bool(
            row["ratio_vs_collateral"] >= F.COLLATERAL_RATIO and row["ratio_vs_random"] >= F.RANDOM_RATIO
            and row["text"]["kl"] <= F.TEXT_KL_MAX
        )
        result["sports"][sport] = row
    result["sports_passing"] = [s for s, r in result["sports"].items() if r.get("passes")]
    out = Path(out_dir) if out_dir is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "facts.json", result)
    facts_effect_figure(result, out / "facts_effects.png")
    facts_parts_figure(result, out / "facts_name_parts.png")
    facts_report(out)
    return result
