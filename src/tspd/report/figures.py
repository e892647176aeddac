"""Figures, written atomically as PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from tspd.decomposition import Batch, Decomposition, atomic_write_bytes  # noqa: E402


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    atomic_write_bytes(path, lambda p: fig.savefig(p, format=path.suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path


@torch.no_grad()
def tms_figure(dec: Decomposition, batches: list[Batch], path: str | Path, site: str = "linear1") -> Path:
    """Per alive subcomponent c and feature i, |u_c v_c[i]| / |W[:, i]|: a permutation of ones when
    SPD found one subcomponent per feature."""
    U, V = dec.components(site)
    W = dec._stand_ins[site].original.weight
    from tspd.analysis.tms import alive_mask

    alive = alive_mask(dec, batches, site, dec.config.eval.alive_threshold).nonzero().squeeze(1)
    ratio = (V.T[alive].abs() * U[alive].norm(dim=1, keepdim=True)) / W.norm(dim=0).clamp_min(1e-12)
    if len(alive) == 0:
        fig, ax = plt.subplots(figsize=(4, 2))
        ax.text(0.5, 0.5, f"{site}: no alive subcomponent", ha="center", va="center")
        ax.axis("off")
        return save_figure(fig, path)
    order = ratio.argmax(1).argsort()
    ratio = ratio[order]
    fig, ax = plt.subplots(figsize=(max(4, 0.25 * W.shape[1] + 2), max(3, 0.25 * len(alive) + 1.5)))
    im = ax.imshow(ratio.numpy(), cmap="viridis", vmin=0, vmax=max(1.0, float(ratio.max())), aspect="auto")
    ax.set_xlabel("feature i")
    ax.set_ylabel("alive subcomponent")
    ax.set_yticks(range(len(alive)), [str(int(c)) for c in alive[order]])
    ax.set_title(f"{site}: |u_c v_c[i]| / |W[:, i]|")
    fig.colorbar(im, ax=ax)
    return save_figure(fig, path)


def loss_curve_figure(history: list[dict], phase_change: int | None, path: str | Path) -> Path:
    """Held-out loss and accuracy by step, with the phase change (sharpest loss drop) marked."""
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["loss"] for h in history], color="tab:blue", label="loss (last position)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["accuracy"] for h in history], color="tab:orange", label="accuracy")
    ax2.set_ylabel("accuracy")
    ax2.set_ylim(0, 1.02)
    if phase_change is not None:
        ax.axvline(phase_change, color="k", ls="--", lw=1)
        ax.annotate(f"phase change ~ step {phase_change}", (phase_change, ax.get_ylim()[1]), ha="left", va="top", fontsize=8)
    ax.set_title("induction target training")
    fig.legend(loc="center left", bbox_to_anchor=(0.12, 0.5), fontsize=8)
    return save_figure(fig, path)


def census_figure(table: dict, path: str | Path) -> Path:
    """Heat map per site: mean CI of each active subcomponent at tokens of each role."""
    roles = table["roles"]
    sites = list(table["sites"])
    fig, axes = plt.subplots(1, len(sites), figsize=(2.1 * len(sites) + 1, 3.8), squeeze=False)
    for ax, s in zip(axes[0], sites):
        row = table["sites"][s]
        ids = row["active_ids"]
        short = s.replace("blocks.", "L").replace(".attn.", " ").replace("_proj", "").upper()
        if not ids:
            ax.text(0.5, 0.5, "none active", ha="center", va="center", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            data = torch.tensor([row["mean_ci_by_role"][r] for r in roles]).T  # (n_active, roles)
            ax.imshow(data.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
            ax.set_xticks(range(len(roles)), [r.replace("_", " ") for r in roles], rotation=60, fontsize=7)
            shown = ids if len(ids) <= 25 else ids[:25]
            ax.set_yticks(range(len(shown)), [str(c) for c in shown], fontsize=6)
            if len(ids) > 25:
                ax.set_ylim(len(shown) - 0.5, -0.5)
        ax.set_title(f"{short} ({len(ids)})", fontsize=9)
    axes[0][0].set_ylabel("active subcomponent")
    fig.suptitle("mean CI by token role (colour 0..1)", fontsize=10)
    return save_figure(fig, path)


def causal_figure(check: dict, path: str | Path) -> Path:
    """Last-position accuracy after ablating each site's active subcomponents vs a random control."""
    sites = list(check["sites"])
    fig, ax = plt.subplots(figsize=(1.1 * len(sites) + 2.5, 3.3))
    x = torch.arange(len(sites)).float()
    act = [check["sites"][s]["active"]["accuracy"] for s in sites]
    ctl = [check["sites"][s]["control"]["accuracy"] for s in sites]
    ax.bar((x - 0.2).numpy(), act, width=0.4, label="ablate active subcomponents")
    ax.bar((x + 0.2).numpy(), ctl, width=0.4, label="ablate as many inactive (control)")
    ax.axhline(check["none"]["accuracy"], color="k", ls="--", lw=1, label="no ablation")
    labels = [s.replace("blocks.", "L").replace(".attn.", " ").replace("_proj", "").upper() for s in sites]
    ax.set_xticks(x.numpy(), labels, fontsize=8)
    ax.set_ylabel("last-position accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("causal check: one site ablated at a time")
    return save_figure(fig, path)


def baseline_figure(baseline: dict, table: dict, path: str | Path) -> Path:
    """Greedy SVD baseline: last-position KL vs rank-1 pieces, with SPD's matched KL and its
    active pieces per input (per token and per sequence) and in total."""
    curve = baseline["curve"]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot([c["pieces"] for c in curve], [max(c["kl"], 1e-8) for c in curve], marker=".", label="greedy SVD pieces")
    ax.axhline(max(baseline["spd_kl"], 1e-8), color="tab:red", ls="--", lw=1, label=f"SPD CI-masked KL {baseline['spd_kl']:.2g}")
    for value, name, style in (
        (table["active_per_token"], "SPD active per token", ":"),
        (table["active_per_input"], "SPD active per sequence", "-."),
        (table["total_distinct"], "SPD distinct in total", "--"),
    ):
        ax.axvline(value, color="tab:green", ls=style, lw=1.2, label=f"{name}: {value:.1f}")
    if baseline["pieces_needed"] is not None:
        ax.axvline(baseline["pieces_needed"], color="tab:blue", lw=1, alpha=0.5, label=f"SVD needs {baseline['pieces_needed']}")
    ax.set_yscale("log")
    ax.set_xlabel("rank-1 pieces")
    ax.set_ylabel("KL to target (last position)")
    ax.legend(fontsize=7)
    ax.set_title("SPD vs greedy rank-1 SVD at matched output KL")
    return save_figure(fig, path)


def training_curves_figure(metrics_path: str | Path, path: str | Path) -> Path:
    """From a run's metrics.jsonl: every loss term (log scale) and L0 per site, by step."""
    import json

    rows = []
    for line in Path(metrics_path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # blank, or the line a running training is writing
            continue
    merges = [r["step"] for r in rows if "consolidate" in r]
    rows = [r for r in rows if "loss" in r]  # training rows (not evaluations or merges)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax in (ax1, ax2):
        for i, m in enumerate(merges):  # consolidation steps (tspd.consolidate)
            ax.axvline(m, color="grey", ls=":", lw=1, label="consolidation" if i == 0 else None)
    steps = [r["step"] for r in rows]
    skip = {"step", "lr", "p", "l0", "loss"}
    terms = [k for k in (rows[0] if rows else {}) if k not in skip]
    for t in terms:
        ax1.plot(steps, [max(r.get(t, float("nan")), 1e-12) for r in rows], label=t, lw=1)
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_title("loss terms (unweighted)")
    ax1.legend(fontsize=6)
    sites = list(rows[0]["l0"]) if rows and "l0" in rows[0] else []
    for s in sites:
        ax2.plot(steps, [r["l0"][s] for r in rows], label=s, lw=1)
    ax2.set_yscale("symlog", linthresh=0.1)
    ax2.set_xlabel("step")
    ax2.set_title("L0 per site (active per token)")
    ax2.legend(fontsize=6)
    return save_figure(fig, path)
