"""Figures and the static page of the facts study (scan, per-sport ablation table)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from tspd.report.figures import save_figure
from tspd.report.html import image, table, write_page


def facts_scan_figure(scan: dict, path: str | Path) -> Path:
    """Drop in the right sport's log-probability when one layer's MLP or attention output is
    removed at the name tokens, per layer."""
    n = len(scan["mlp"])
    x = np.arange(n)
    fig, ax = plt.subplots(figsize=(max(5, 0.28 * n + 2), 3.2))
    ax.bar(x - 0.2, scan["mlp"], width=0.4, label="MLP")
    ax.bar(x + 0.2, scan["attn"], width=0.4, label="attention")
    ax.set_xlabel("layer")
    ax.set_ylabel("drop in log p(right sport)")
    ax.set_title(f"layer scan: contribution removed at the name tokens ({scan['n_prompts']} prompts)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _done(result: dict) -> list[str]:
    return [s for s, r in result["sports"].items() if "both" in r]


def facts_effect_figure(result: dict, path: str | Path) -> Path:
    """Per sport (paper's Figure 3, made systematic): drop of the right sport's log-probability on
    held-out athletes of that sport, on other sports' prompts, and for the random baseline (left,
    with the bootstrap's interval on the own-sport bar when present); the top-SVD baseline, whose
    effects are two orders larger, on its own axis (right)."""
    sports = _done(result)
    fig, (ax, ax_svd) = plt.subplots(1, 2, figsize=(1.6 * max(len(sports), 1) + 4, 3.6),
                                     gridspec_kw={"width_ratios": [2, 1]})
    if not sports:
        ax.text(0.5, 0.5, "no sport had selectable subcomponents", ha="center", va="center")
        ax.axis("off")
        ax_svd.axis("off")
        return save_figure(fig, path)
    x = np.arange(len(sports))
    rows = [result["sports"][s] for s in sports]
    bars = [
        ("SPD: own sport", [r["both"]["target_effect"] for r in rows]),
        ("SPD: other sports", [r["both"]["collateral_facts"] for r in rows]),
        ("random subcomponents", [r["random_target_effect"] for r in rows]),
    ]
    w = 0.8 / len(bars)
    for i, (label, vals) in enumerate(bars):
        err = None
        if i == 0 and all("bootstrap" in r for r in rows):
            lo_hi = np.array([r["bootstrap"]["target_effect"] for r in rows])
            err = np.clip(np.stack([np.array(vals) - lo_hi[:, 0], lo_hi[:, 1] - np.array(vals)]), 0, None)
        ax.bar(x + (i - 1) * w, vals, width=w, label=label, yerr=err, capsize=2 if err is not None else 0)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, sports, fontsize=7, rotation=20)
    ax.set_ylabel("drop in log p(right sport)")
    ax.set_title(f"SPD subcomponents (k <= {result['k']}) at held-out name tokens", fontsize=9)
    ax.legend(fontsize=7)
    ax_svd.bar(x - 0.2, [r["svd"]["target_effect"] for r in rows], width=0.4, label="own sport", color="tab:red")
    ax_svd.bar(x + 0.2, [r["svd"]["collateral_facts"] for r in rows], width=0.4, label="other sports", color="tab:gray")
    ax_svd.set_xticks(x, sports, fontsize=7, rotation=20)
    ax_svd.set_title("baseline: as many top SVD directions", fontsize=9)
    ax_svd.legend(fontsize=7)
    return save_figure(fig, path)


def facts_parts_figure(result: dict, path: str | Path) -> Path:
    """Paper's Figure 4: first name only vs last name only vs both."""
    sports = _done(result)
    fig, ax = plt.subplots(figsize=(1.1 * max(len(sports), 1) + 3, 3.3))
    if not sports:
        ax.axis("off")
        return save_figure(fig, path)
    x = np.arange(len(sports))
    for i, part in enumerate(("first", "last", "both")):
        ax.bar(x + (i - 1) * 0.27, [result["sports"][s][part]["target_effect"] for s in sports], width=0.27,
               label=f"{part} name" if part != "both" else "both")
    ax.set_xticks(x, sports, fontsize=8)
    ax.set_ylabel("drop in log p(right sport)")
    ax.set_title("where the ablation acts: first name, last name, both")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _interval(boot: dict | None) -> list:
    """The bootstrap columns of a sport's row (blank for runs made before the bootstrap existed)."""
    if not boot:
        return ["", ""]
    lo, hi = boot["target_effect"]
    return [f"{lo:.3f} to {hi:.3f}", f"{boot['pass_fraction']:.2f}"]


def facts_report(run_dir: str | Path) -> Path:
    """RUN_DIR/facts.html: faithfulness, the per-sport table and the figures (scan when present)."""
    run_dir = Path(run_dir)
    result = json.loads((run_dir / "facts.json").read_text())
    f = result["faithfulness"]
    sections = [
        ("Faithfulness on held-out general text", table(
            ["KL / token (nats)", "CE increase (nats)", "active subcomponents / token"],
            [[f["kl_per_token"], f["ce_increase"], f["active_per_token"]]],
        )),
    ]
    rows = []
    for sport, r in result["sports"].items():
        if "both" not in r:
            rows.append([sport, r["n_heldout_prompts"], r.get("skipped", ""), "", "", "", "", "", "", "", ""])
            continue
        rows.append([
            sport, r["n_heldout_prompts"], len(r["pieces"]), r["both"]["target_effect"], r["both"]["collateral_facts"],
            r["random_target_effect"], r["svd"]["target_effect"], r["text"]["kl"], r["passes"],
            *_interval(r.get("bootstrap")),
        ])
    if result.get("select") in ("causal", "attribution"):
        w = f"{result.get('collateral_weight', 1.0):g}"
        if result["select"] == "causal":
            pool = (f"up to {result['n_candidates']} subcomponents whose mean name-token CI on the sport's discovery "
                    f"prompts is at least {result['min_ci'] / 2} and at least {result['min_gap'] / 2} above other sports'")
        else:
            pool = (f"the {result['n_candidates']} subcomponents with mean name-token CI at least {result['min_ci'] / 2} "
                    "on the sport's discovery prompts whose first-order (gradient) estimate of the score below is best")
        how = (f"Candidates: {pool}; each ablated alone at the name tokens of the discovery prompts; the "
               f"{result['k']} with the largest drop of the right sport's log-probability on the sport minus {w} "
               "times the absolute change on other sports are ablated on the held-out athletes"
               + (" (of those, the prefix whose joint ablation scores best on the discovery prompts)."
                  if result.get("choose_size") else "."))
    else:
        how = (f"The {result['k']} subcomponents with mean name-token CI at least {result['min_ci']} on the sport's "
               f"discovery prompts and at least {result['min_gap']} above other sports'.")
    prompts = (f"Prompts: athletes and templates from {result['facts_file']}" if result.get("facts_file")
               else "Prompts: the shipped athletes and templates (tspd/data/facts.json)")
    prompts += (f"; {result['n_discovery_prompts']} discovery and {result['n_heldout_prompts']} held-out prompts the "
                "model answers right" if "n_discovery_prompts" in result else "")
    prompts += ("; prompts whose name is their first token left out." if result.get("name_at_start") is False else ".")
    sections.append(("How subcomponents were chosen", f"<p>{html.escape(prompts)}</p><p>{html.escape(how)}</p>"))
    sections.append(("Per sport (ablation at both name parts)", table(
        ["sport", "held-out prompts", "pieces", "own drop", "other sports' drop", "random drop", "SVD drop",
         "text KL", "passes", "own drop, 90 % interval (athletes resampled)", "share of resamples passing"], rows)))
    figs = "".join(image(run_dir / name) for name in ("scan.png", "facts_effects.png", "facts_name_parts.png")
                   if (run_dir / name).exists())
    sections.append(("Figures", figs))
    return write_page(run_dir / "facts.html", "tspd facts study", sections)
