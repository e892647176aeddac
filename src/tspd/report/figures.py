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
    fig.legend(loc="center right", fontsize=8)
    return save_figure(fig, path)
