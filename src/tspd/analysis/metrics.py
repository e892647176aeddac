"""Evaluation metrics, computed with the same loss functions as training."""

from __future__ import annotations

import torch
from torch import Tensor

from tspd.decomposition import Batch, Decomposition, one_thread_per_target, position_mask
from tspd.seeding import generator


@one_thread_per_target
@torch.no_grad()
def evaluate(dec: Decomposition, batches: list[Batch]) -> dict:
    """L0 per site, alive counts, CI-masked and stochastic reconstruction divergence, faithfulness.

    Alive: a subcomponent whose CI exceeds eval.alive_threshold on some evaluated input.
    """
    from tspd.losses import Reference, l0, recon_passes

    cfg = dec.config
    kind, positions = cfg.output.divergence, cfg.output.positions
    l0_sum = {s: 0.0 for s in dec.site_names}
    max_ci: dict[str, Tensor] = {}
    recon = {"ci_masked_recon": 0.0, "stochastic_recon": 0.0, "ones_recon": 0.0}
    for i, batch in enumerate(batches):
        keep = position_mask(batch)  # padded positions are left out of every figure
        target_out, inputs = dec.run_target(batch)
        ci, _ = dec.ci_from_logits(dec.ci_logits(inputs, keep))
        for s, g in ci.items():
            l0_sum[s] += float(l0(g, cfg.eval.active_threshold, keep))
            real = g[keep] if keep is not None and tuple(keep.shape) == tuple(g.shape[:-1]) else g
            m = real.flatten(0, -2).amax(0)
            max_ci[s] = m if s not in max_ci else torch.maximum(max_ci[s], m)
        gen = generator(cfg.seed, i, 303)
        passes = {
            "ci_masked_recon": recon_passes("ci_masked_recon", dec, ci, gen)[0],
            "stochastic_recon": recon_passes("stochastic_recon", dec, ci, gen)[0],
            "ones_recon": dec.ones_pass(ci),
        }
        outs = dec.run_passes(batch, list(passes.values()), stack=cfg.train.stack_passes)
        ref = Reference(target_out, kind, positions, keep=keep)
        for name, out in zip(passes, outs):
            recon[name] += float(ref.divergence(out))
    dec.forget_target_run()  # the last batch's recorded values: not kept past the evaluation
    n = max(len(batches), 1)
    alive = {s: int((m > cfg.eval.alive_threshold).sum()) for s, m in max_ci.items()}
    return {
        "l0": {s: v / n for s, v in l0_sum.items()},
        "l0_total": sum(l0_sum.values()) / n,
        "alive": alive,
        "alive_total": sum(alive.values()),
        **{k: v / n for k, v in recon.items()},
        "faithfulness": float(dec.faithfulness()),
        "divergence": kind,
    }
