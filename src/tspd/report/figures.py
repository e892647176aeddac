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
    U, V = dec.components_of(site)
    W = dec._stand_ins[site].original.weight
    max_ci = torch.stack([dec.causal_importance(b)[site].flatten(0, -2).amax(0) for b in batches]).amax(0)
    alive = (max_ci > dec.config.eval.alive_threshold).nonzero().squeeze(1)
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
