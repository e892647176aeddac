"""The SPD paper's known-answer metrics on a TMS target (SPEC §7)."""

from __future__ import annotations

import torch

from tspd.decomposition import Batch, Decomposition


@torch.no_grad()
def alive_mask(dec: Decomposition, batches: list[Batch], site: str, threshold: float) -> torch.Tensor:
    """(C,) bool: subcomponents of `site` whose CI exceeds `threshold` on some input of `batches`."""
    max_ci = torch.stack([dec.causal_importance(b)[site].flatten(0, -2).amax(0) for b in batches]).amax(0)
    return max_ci > threshold


@torch.no_grad()
def tms_metrics(dec: Decomposition, batches: list[Batch], site: str = "linear1", alive_threshold: float | None = None) -> dict:
    """MMCS and ML2R between the feature columns of W (d x n) and the subcomponents of `site`.

    For feature i, each subcomponent c contributes the column u_c v_c[i] to W[:, i]; MMCS is the mean
    over features of the best cosine similarity between W[:, i] and those columns, ML2R the mean norm
    ratio |u_c* v_c*[i]| / |W[:, i]| of the best match c*. Only alive subcomponents are candidates.
    """
    thr = dec.config.eval.alive_threshold if alive_threshold is None else alive_threshold
    U, V = dec.components(site)
    W = dec._stand_ins[site].original.weight  # d x n
    alive = alive_mask(dec, batches, site, thr)
    cols = V.T[:, None, :] * U[:, :, None]  # (C, d, n): column i of subcomponent c
    cols = cols[alive]
    if cols.shape[0] == 0:
        return {"site": site, "n_features": W.shape[1], "mmcs": 0.0, "ml2r": 0.0, "alive": 0, "alive_threshold": thr}
    w_norm = W.norm(dim=0)  # (n,)
    c_norm = cols.norm(dim=1)  # (C_alive, n)
    cos = (cols * W[None]).sum(1) / (c_norm * w_norm[None]).clamp_min(1e-12)
    best_cos, best = cos.max(0)
    ratio = c_norm.gather(0, best[None])[0] / w_norm.clamp_min(1e-12)
    return {
        "site": site,
        "n_features": W.shape[1],
        "mmcs": float(best_cos.mean()),
        "ml2r": float(ratio.mean()),
        "alive": int(alive.sum()),
        "alive_threshold": thr,
    }
