"""Every loss term of SPEC §5 as a small function; training and evaluation call the same ones.

Reconstruction terms are described as lists of `Pass`es (masks + routing) so that passes from
several terms can be stacked along the batch dimension and run as one forward.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from tspd.config import RunConfig
from tspd.decomposition import (
    Batch,
    Decomposition,
    mask_pads,
    one_thread_per_target,
    padding_not_readable,
    position_mask,
    row_weights,
)
from tspd.fastlinear import applies, linear_pointwise
from tspd.importance import lower_leaky_hard_sigmoid_grad, upper_leaky_hard_sigmoid_grad
from tspd.masks import Pass, delta_masks, sample_sources, stochastic_masks, subset_routing

RECON_TERMS = (
    "stochastic_recon",
    "stochastic_recon_layerwise",
    "stochastic_recon_subset",
    "ci_masked_recon",
)


def real_positions(keep: Tensor, positions: list[int]) -> tuple[Tensor, Tensor]:
    """Per row of a padded batch, the columns of `positions` counted among its real tokens (-1: its
    last real token, 0: its first), as (batch, len(positions)) indices, and whether the row has
    such a token (a row shorter than a position asks for has none there)."""
    B, T = keep.shape
    cols = torch.arange(T, device=keep.device)
    ordered = torch.where(keep, cols, T + cols).sort(dim=1).values  # real columns first, in order
    n = keep.sum(1, keepdim=True)
    q = torch.tensor(positions, device=keep.device)[None, :].expand(B, -1)
    k = torch.where(q < 0, n + q, q)
    valid = (k >= 0) & (k < n)
    idx = ordered.gather(1, k.clamp(0, T - 1)).clamp(max=T - 1)
    return idx, valid


def select_positions(t: Tensor, positions: list[int] | None) -> Tensor:
    if positions is None or t.dim() < 3:
        return t
    n = t.shape[1]
    bad = [q for q in positions if not -n <= q < n]
    if bad:
        raise ValueError(f"output.positions {bad} out of range for outputs with {n} positions (dim 1); "
                         f"use positions in [-{n}, {n - 1}], e.g. [-1] for the last")
    return t[:, positions]


class Reference:
    """The target's output prepared once per step for every divergence against it.

    KL(p || q) = sum p log p - sum p log q: the first term is the same for every pass, so each pass
    costs one log_softmax, one product and one sum.

    `keep` (the batch's real positions, `position_mask`) leaves padded positions out of every mean:
    each row's p (or squared error) is weighted by `row_weights`, so the KL routes (native loop,
    fused head, compiled) all average over the real positions (their gradient psum * softmax - p
    takes the row weight from the row sums of the weighted p).
    """

    def __init__(self, target_out: Tensor, kind: str, positions: list[int] | None = None, compiled: bool = False,
                 keep: Tensor | None = None):
        self.kind, self.positions, self.compiled = kind, positions, compiled
        if positions is not None and target_out.dim() < 3:
            raise ValueError(f"output.positions is set but the target's output is {target_out.dim()}-D {tuple(target_out.shape)}, "
                             "with no positions dim (batch, positions, ...): remove output.positions")
        fits = keep is not None and target_out.dim() >= 3 and tuple(keep.shape) == tuple(target_out.shape[:2])
        # With padding, output.positions count among each row's real tokens (-1: its last real one).
        self._index = None
        if fits and positions is not None:
            select_positions(target_out, positions)  # the range check
            self._index, keep = real_positions(keep, positions)
        t = self.select(target_out).float()
        w = row_weights(keep, t.shape[:2]) if fits else None
        self.weights = w  # (batch, positions) or None
        if kind == "mse":
            self.target = t
            self._w = None if w is None else w.view(*w.shape, *[1] * (t.dim() - 2))
        else:
            log_p = t.log_softmax(-1)
            self.p = log_p.exp()
            if w is not None:
                self.p = self.p * w[..., None]
            self.neg_entropy = (self.p * log_p).sum(-1).mean()
            self._flat: tuple[Tensor, Tensor] | None = None

    def select(self, out: Tensor, n: int = 1) -> Tensor:
        """The output positions of `out` (n passes stacked along dim 0): `output.positions`, per
        row among its real tokens for a padded batch, or every position."""
        if self._index is None:
            return select_positions(out, self.positions)
        idx = self._index.repeat(n, 1) if n > 1 else self._index
        return out.gather(1, idx.view(*idx.shape, *[1] * (out.dim() - 2)).expand(-1, -1, *out.shape[2:]))

    def divergence(self, out: Tensor, selected: bool = False) -> Tensor:
        """D(target, out); `selected`: `out` holds only the output positions already."""
        out = out if selected else self.select(out)
        if self.kind == "mse":
            sq = (out.float() - self.target).pow(2)
            return (sq if self._w is None else sq * self._w).mean()
        if self.compiled:  # the reconstruction terms' route (divergences), for one output
            return self.divergences(out, 1, selected=True)[0]
        return _kl(out, self.p, self.neg_entropy)

    def _flat_target(self) -> tuple[Tensor, Tensor]:
        """The target distribution as (rows x V) and its row sums, made once."""
        if self._flat is None:
            p = self.p.reshape(-1, self.p.shape[-1])
            self._flat = (p, p.sum(-1))
        return self._flat

    def divergences(self, out: Tensor, n: int, selected: bool = False) -> Tensor:
        """D(target, each of n outputs stacked along dim 0 of `out`): a vector of n values, each
        the `divergence` of its own block of rows, in one product and one reduction for all n
        (its gradient lands in `out` as a whole: no per-pass gradients to concatenate)."""
        out = out if selected else self.select(out, n)
        ref = self.target if self.kind == "mse" else self.p
        if out.shape[0] != n * ref.shape[0]:
            raise ValueError(f"{out.shape[0]} output rows for {n} passes over a target output of {ref.shape[0]}")
        if self.kind == "mse":
            sq = (out.float().view(n, *ref.shape) - self.target).pow(2)
            return (sq if self._w is None else sq * self._w).flatten(1).mean(-1)
        if self.compiled:
            vals = _KLRows.apply(out, *self._flat_target(), self.neg_entropy, n)
            return vals if vals is not None else _compiled_kl_stacked()(out, self.p, self.neg_entropy, n)
        return _kl_stacked(out, self.p, self.neg_entropy, n)


    # Rows of fp32 logits per chunk of `divergence_through_head`. SmolLM2's head (vocab 49152), one
    # step each (one-off script, 2 threads): 1 / 32 MB / 1 GB (one chunk a pass) -> 2257 / 1963 /
    # 1817 ms at 3.42 / 3.12 / 3.59 GB peak RSS, against 1931 ms at 4.10 GB unfused; the tiny GPT-2
    # case (vocab 1024) measured the same at 0.25, 4 and 64 MB.
    HEAD_CHUNK_BYTES = 32 * 2**20

    @classmethod
    def head_chunk_rows(cls, vocab: int) -> int:
        """Rows per chunk of `divergence_through_head` for a head of `vocab` outputs."""
        return max(64, cls.HEAD_CHUNK_BYTES // (4 * vocab))

    def divergence_through_head(self, h: Tensor, head: torch.nn.Linear, onednn: bool) -> Tensor:
        """KL(target || head(h)) for the inputs h of the output head, computed with the head by
        `_HeadKL` over chunks of rows (no (tokens x vocab) logits kept for the backward). Call it
        under the autocast the pass ran under."""
        if self.kind == "mse":
            raise ValueError("divergence_through_head computes a KL; use divergence for mse")
        h = self.select(h)
        p, psum = self._flat_target()
        h2 = h.reshape(-1, h.shape[-1])
        if h2.shape[0] != p.shape[0]:
            raise ValueError(f"{h2.shape[0]} head-input rows for a target output of {p.shape[0]}")
        w, b = head.weight.detach(), head.bias.detach() if head.bias is not None else None
        chunk = self.head_chunk_rows(p.shape[1])
        return _HeadKL.apply(h2, w, b, p, psum, self.neg_entropy, chunk, onednn)


# `train.fuse_head: auto` fuses heads with at least this many outputs (vocabulary sizes): the
# (tokens x vocab) logits it avoids keeping matter there, while at vocab 1024 (the tiny GPT-2
# benchmark) fusing measured 1-4 % slower.
FUSE_HEAD_MIN_OUTPUTS = 8192


def head_fused(dec: Decomposition) -> bool:
    """Whether the step's loss runs the output head fused with the KL: `train.fuse_head` resolved
    for this decomposition, and a KL divergence (the fused head computes no other)."""
    return dec.config.output.divergence == "kl" and fuse_head(dec.config.train.fuse_head, dec)


def fuse_head(setting: bool | str, dec: Decomposition) -> bool:
    """Resolve `train.fuse_head` for this decomposition's output head."""
    if setting == "auto":
        head = dec.output_head
        return head is not None and head.out_features >= FUSE_HEAD_MIN_OUTPUTS
    return bool(setting)


class _HeadKL(torch.autograd.Function):
    """neg_entropy - mean over rows of sum_v p log_softmax(h W^T + b), over chunks of rows, with
    the gradient to h formed in the forward ((psum * softmax - p) W per chunk, scaled in the
    backward by the incoming gradient / rows): the logits of a chunk stay in cache and no
    (rows x vocab) tensor is kept. Matches the KL of the head's output to fp32 rounding (to bf16
    rounding under autocast, where the products run in bf16 as the head's own would)."""

    @staticmethod
    def forward(ctx, h, w, b, p, psum, neg_entropy, chunk, onednn):
        rows = h.shape[0]
        autocast = torch.is_autocast_enabled(h.device.type)
        fast = onednn and not autocast and applies(h, w.t(), b)
        wt = w.t().contiguous() if fast else None
        if autocast:  # cast the head once, not in every chunk (autocast caches casts of leaf parameters only)
            dt = torch.get_autocast_dtype(h.device.type)
            w, b = w.to(dt), (b.to(dt) if b is not None else None)
        grad_h = torch.empty_like(h)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, rows, chunk):
            hc, pc = h[i : i + chunk], p[i : i + chunk]
            logits = linear_pointwise(hc.contiguous(), w, b) if fast else torch.nn.functional.linear(hc, w, b)
            lsm = logits.float().log_softmax(-1)
            total += (pc * lsm).sum()  # not linalg.vecdot: autocast would run it in bf16
            g = lsm.exp_().mul_(psum[i : i + chunk, None]).sub_(pc)  # d(-sum p lsm)/d logits
            if fast:
                grad_h[i : i + chunk] = linear_pointwise(g, wt, None)
            else:
                grad_h[i : i + chunk] = torch.nn.functional.linear(g.to(logits.dtype), w.t()).to(h.dtype)
        ctx.save_for_backward(grad_h)
        ctx.rows = rows
        return neg_entropy - total / rows

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (grad_h,) = ctx.saved_tensors
        return grad_h * (grad / ctx.rows), None, None, None, None, None, None, None


def _kl(out: Tensor, p: Tensor, neg_entropy: Tensor) -> Tensor:
    return neg_entropy - (p * out.float().log_softmax(-1)).sum(-1).mean()


class _KLRows(torch.autograd.Function):
    """`_kl_stacked` by tspd.native's row loop (train.compile): the n values and, in the same pass,
    the gradient psum softmax - p (one exp per logit where the compiled KL's forward and backward
    took one each); the backward scales it. Returns None (no graph) where the loop does not apply."""

    @staticmethod
    def forward(ctx, out: Tensor, p: Tensor, psum: Tensor, neg_entropy: Tensor, n: int):
        from tspd.native import kl_rows

        rows = p.shape[0]
        got = kl_rows(out.reshape(-1, p.shape[-1]), p, psum, n) if out.numel() == n * p.numel() else None
        if got is None:
            return None
        totals, g = got
        ctx.save_for_backward(g)
        ctx.rows, ctx.shape, ctx.dtype, ctx.used = rows, out.shape, out.dtype, False
        return neg_entropy - (totals / rows).to(neg_entropy.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        if ctx.used:
            raise RuntimeError("the reconstruction KL's backward ran twice on one graph (retain_graph=True); "
                               "its saved gradient is scaled in place: run the step's forward again instead")
        ctx.used = True
        (g,) = ctx.saved_tensors
        # Scaled in place: g (as large as the passes' logits) is this graph's own and needed no more,
        # so no second logits-sized tensor (induction-shared-64: 64.2 vs 65.5 ms a step, 7 of 8 rounds).
        scale = (grad / ctx.rows).to(g.dtype)
        g = g.view(scale.shape[0], -1).mul_(scale[:, None]).view(ctx.shape)
        # bf16 logits (autocast): g is fp32, rounded once here, as the gradient of out.float() would be.
        return (g if g.dtype == ctx.dtype else g.to(ctx.dtype)), None, None, None, None


def _kl_stacked(out: Tensor, p: Tensor, neg_entropy: Tensor, n: int) -> Tensor:
    lsm = out.float().log_softmax(-1).view(n, *p.shape)
    return neg_entropy - (p * lsm).sum(-1).flatten(1).mean(-1)


@functools.cache
def _compiled_kl_stacked() -> Callable:
    """_kl_stacked fused by torch.compile (compiled once per pass count and shape)."""
    return torch.compile(_kl_stacked, dynamic=None)  # None: a second shape compiles one dynamic graph for all later ones


def divergence(target_out: Tensor, out: Tensor, kind: str, positions: list[int] | None = None,
               keep: Tensor | None = None) -> Tensor:
    """D(target, masked): KL(target || masked) summed over the last dim and averaged over the rest,
    or the MSE averaged over every entry. `positions` restricts dim 1 first; `keep` leaves padded
    positions out of the mean (see Reference)."""
    return Reference(target_out, kind, positions, keep=keep).divergence(out)


class _PowerSum(torch.autograd.Function):
    """sum((g + eps)^p) / n with a backward of p (g + eps)^p / (g + eps) * grad / n: one pow in
    all (autograd's pow backward computes a second pow)."""

    @staticmethod
    def forward(ctx, g: Tensor, p: float, eps: float, n: int, w: Tensor | None = None) -> Tensor:
        base = g + eps
        powered = base.pow(p)
        if w is not None:  # row weights (padding left out): sum of w_row (g + eps)^p
            powered = powered * w[..., None]
        ctx.save_for_backward(base, powered)
        ctx.p, ctx.n = p, n
        return powered.sum() / n

    @staticmethod
    def backward(ctx, grad: Tensor):
        base, powered = ctx.saved_tensors
        return powered.div(base).mul_(grad * ctx.p / ctx.n), None, None, None, None


def importance_minimality(ci_upper: dict[str, Tensor], p: float, eps: float, keep: Tensor | None = None) -> Tensor:
    """sum over sites and subcomponents of mean over batch and positions of (g_upper + eps)^p
    (over the real positions only, given the batch's `keep`)."""
    total = 0.0
    for g in ci_upper.values():
        total = total + _PowerSum.apply(g, p, eps, g.numel() // g.shape[-1], row_weights(keep, g.shape[:-1]))
    return total


def _ci_min_forward(z: Tensor, leak: float, eps: float, p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The compiled chain's forward: the lower CI, the minimality sum over rows, and the factor
    q = p (upper + eps)^p / (upper + eps) its gradient needs. The power is exp(p log base), so p (a
    tensor) can anneal without recompiling."""
    lower = z.clamp(0.0, 1.0)
    base = z.clamp(0.0, 1.0) + (z - 1.0).clamp(min=0.0) * leak + eps
    powered = torch.exp(p * torch.log(base))
    q = p * powered / base
    if q.dtype in (torch.bfloat16, torch.float16):
        q = q.float()  # kept at the precision the chain computes in (z is bf16 under autocast)
    return lower, powered.sum() / (z.numel() // z.shape[-1]), q


def _ci_min_backward(z: Tensor, q: Tensor, g_lower: Tensor, g_min: Tensor, leak: float, rows: int) -> Tensor:
    """The compiled chain's backward: both sigmoids' gradients, with q from the forward."""
    return lower_leaky_hard_sigmoid_grad(g_lower, z, leak) + upper_leaky_hard_sigmoid_grad(q * (g_min / rows), z, leak)


class _CIAndMinimality(torch.autograd.Function):
    """A site's lower-leaky CI and its minimality term sum((upper + eps)^p) / rows (what
    `ci_from_logits` and `importance_minimality` give eagerly) as two compiled loops, forward and
    backward, over (rows x C): the forward keeps q for the backward, which so needs no exp or log (torch.compile of the whole
    chain recomputed both there: 3.3-3.4 vs 2.2-2.4 ms fwd + bwd per (64 x 64 x 100) site, the same
    values). On the CPU the forward is tspd.native's loop where it applies (`native.ci_min`)."""

    @staticmethod
    def forward(ctx, z: Tensor, leak: float, eps: float, p: Tensor):
        from tspd.native import ci_min

        got = ci_min(z, leak, eps, float(p)) if z.device.type == "cpu" else None
        if got is not None:  # tspd.native's loop: its own log and exp, ~1e-7 relative
            lower, s, q = got
            rows = z.numel() // z.shape[-1]
            total = torch.tensor(s / rows if rows else math.nan, dtype=torch.float32)  # no rows: nan, as the compiled chain
        else:
            lower, total, q = _compiled_ci_min()[0](z, leak, eps, p)
        ctx.save_for_backward(z, q)
        ctx.leak = leak
        return lower, total

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lower: Tensor | None, g_min: Tensor | None):
        z, q = ctx.saved_tensors
        g_lower = torch.zeros_like(z) if g_lower is None else g_lower
        g_min = torch.zeros((), dtype=q.dtype, device=q.device) if g_min is None else g_min
        return _compiled_ci_min()[1](z, q, g_lower, g_min, ctx.leak, z.numel() // z.shape[-1]), None, None, None


@functools.cache
def _compiled_ci_min() -> tuple[Callable, Callable]:
    # dynamic=None: the first shape static, a second one compiles a dynamic graph that serves every later
    # shape (dynamic=False recompiled per shape, and past dynamo's limit of 8 ran eager for the rest of the process)
    return torch.compile(_ci_min_forward, dynamic=None), torch.compile(_ci_min_backward, dynamic=None)


@functools.cache
def _compiled_ci_and_minimality() -> Callable:
    """Both sigmoids of a site's CI with its minimality term, compiled (see _CIAndMinimality)."""
    return _CIAndMinimality.apply


def annealed_p(cfg: RunConfig, step: int) -> float:
    m = cfg.minimality
    if m.p_end is None:
        return m.p_start
    frac = step / max(cfg.train.steps, 1)
    span = m.anneal_end_frac - m.anneal_start_frac
    if span <= 0:
        t = 1.0 if frac >= m.anneal_end_frac else 0.0
    else:
        t = min(max((frac - m.anneal_start_frac) / span, 0.0), 1.0)
    return m.p_start + t * (m.p_end - m.p_start)


def recon_passes(term: str, dec: Decomposition, ci: dict[str, Tensor], gen: torch.Generator) -> list[Pass]:
    """The masked passes whose mean divergence is the reconstruction term `term`."""
    cfg = dec.config
    use_delta = cfg.masks.delta_component
    sites = dec.site_names
    if term == "ci_masked_recon":
        # Our choice: the delta (when on) is fully on in the CI-masked pass.
        delta = {s: torch.ones_like(g[..., 0]) for s, g in ci.items()} if use_delta else {}
        return [Pass(masks=dict(ci), delta=delta)]
    passes = []
    for _ in range(cfg.masks.n_samples):
        if term == "stochastic_recon":
            masks = stochastic_masks(ci, cfg.masks.kind, gen)
            passes.append(Pass(masks=masks, delta=delta_masks(ci, gen) if use_delta else {}))
        elif term == "stochastic_recon_layerwise":
            for s in sites:
                m = stochastic_masks({s: ci[s]}, cfg.masks.kind, gen)
                passes.append(Pass(masks=m, delta=delta_masks({s: ci[s]}, gen) if use_delta else {}))
        elif term == "stochastic_recon_subset":
            leads = {s: tuple(ci[s].shape[:-1]) for s in sites}
            device = next(iter(ci.values())).device
            routed = {s: r.to(device) for s, r in subset_routing(sites, leads, cfg.masks.subset_granularity, gen).items()}
            masks = stochastic_masks(ci, cfg.masks.kind, gen)
            passes.append(Pass(masks=masks, routed=routed, delta=delta_masks(ci, gen) if use_delta else {}))
        else:
            raise ValueError(f"unknown reconstruction term {term!r}")
    return passes


def adversarial_recon(
    dec: Decomposition, batch: Batch, target_out: Tensor, ci: dict[str, Tensor], gen: torch.Generator,
    keep: Tensor | None = None,
) -> Tensor:
    """D under masks g + (1 - g) a, with a in [0, 1] chosen by sign-gradient ascent on D
    (CI detached during the search; the returned loss has gradients to CI and components)."""
    cfg = dec.config
    kind, positions = cfg.output.divergence, cfg.output.positions
    sources = {s: sample_sources(g, "continuous", gen) for s, g in ci.items()}
    delta = {s: torch.ones_like(g[..., 0]) for s, g in ci.items()} if cfg.masks.delta_component else {}
    for _ in range(cfg.adversarial.n_steps):
        srcs = {s: a.detach().requires_grad_(True) for s, a in sources.items()}
        masks = {s: ci[s].detach() + (1 - ci[s].detach()) * srcs[s] for s in ci}
        loss = divergence(target_out, dec.run_pass(batch, Pass(masks=masks, delta=delta)), kind, positions, keep)
        grads = torch.autograd.grad(loss, list(srcs.values()), allow_unused=True)
        sources = {
            s: (a.detach() + cfg.adversarial.step_size * (g.sign() if g is not None else 0)).clamp(0, 1)
            for (s, a), g in zip(srcs.items(), grads)
        }
    masks = {s: ci[s] + (1 - ci[s]) * sources[s] for s in ci}
    return divergence(target_out, dec.run_pass(batch, Pass(masks=masks, delta=delta)), kind, positions, keep)


def _warn_if_padding_counts(dec: Decomposition, batch: Batch, keep: Tensor | None, target_out: Tensor) -> None:
    """Warn once per Decomposition when a batch's padding cannot be left out of the losses: a 2-D
    mask that does not fit the output's (batch, positions) (the divergences count every output
    position; minimality still leaves padding out where a site's positions fit), or a mask tspd
    cannot read (`padding_not_readable`, or not 2-D) on a batch that pads something."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if dec.__dict__.get("_padding_warned") or not isinstance(mask, Tensor):
        return
    if keep is not None:
        if target_out.dim() >= 3 and tuple(keep.shape) == tuple(target_out.shape[:2]):
            return
        why = (f"the mask {tuple(keep.shape)} does not fit the output's (batch, positions) {tuple(target_out.shape[:2])}, "
               "so the reconstruction divergences average over every output position (importance minimality still "
               "leaves padding out where the site's positions fit)")
    elif mask.dim() != 2:
        why = (f"its attention_mask is {mask.dim()}-D {tuple(mask.shape)}, and tspd reads padding only from a 2-D "
               "(batch, positions) 0/1 mask (the model builds its own 4-D one from that)")
    else:
        why = padding_not_readable(batch)
        masks = [m for k, m in batch.items() if k.endswith("attention_mask") and isinstance(m, Tensor)]
        if why is None or not any(mask_pads(m) for m in masks):
            return  # read, or nothing padded
    dec.__dict__["_padding_warned"] = True
    warnings.warn(f"the batch holds padding that tspd cannot leave out of every loss term: {why}. Pack texts into "
                  "full-length chunks instead (as tspd's text data does)", stacklevel=4)


@one_thread_per_target
def compute_losses(
    dec: Decomposition, batch: Batch, step: int, gen: torch.Generator
) -> tuple[Tensor, dict[str, float], dict[str, Tensor]]:
    """All weighted terms for one step: (total, {term: value}, ci_lower). CI is computed once."""
    cfg = dec.config
    coeffs = cfg.losses
    minimality = coeffs.importance_minimality > 0
    keep = position_mask(batch)  # padded positions (None: none) are left out of every mean
    with autocast_for(cfg, dec.target):
        target_out, inputs = dec.run_target(batch)
        _warn_if_padding_counts(dec, batch, keep, target_out)
        z = dec.ci_logits(inputs, keep)
        min_term = None  # the minimality term, when the compiled chain below forms it with the CI
        if cfg.train.compile and minimality and keep is None:
            # Both sigmoids and the minimality sum of a site in one compiled chain (see _CIAndMinimality).
            p = {dev: torch.tensor(annealed_p(cfg, step), dtype=torch.float32, device=dev) for dev in {v.device for v in z.values()}}
            per_site = {s: _compiled_ci_and_minimality()(v, cfg.ci.leak, cfg.minimality.eps, p[v.device]) for s, v in z.items()}
            ci_lower = {s: lower for s, (lower, _) in per_site.items()}
            min_term = sum(m for _, m in per_site.values())
        else:
            ci_lower, ci_upper = dec.ci_from_logits(z)
    terms: dict[str, Tensor] = {}
    if coeffs.faithfulness > 0:
        terms["faithfulness"] = dec.faithfulness()
    active = [t for t in RECON_TERMS if getattr(coeffs, t) > 0]
    all_passes, owners = [], []
    for t in active:
        ps = recon_passes(t, dec, ci_lower, gen)
        all_passes += ps
        owners += [t] * len(ps)
    if all_passes:
        ref = Reference(target_out, cfg.output.divergence, cfg.output.positions, compiled=cfg.train.compile, keep=keep)
        fuse = head_fused(dec)
        # With output positions (the induction recipe: the last one), the head runs on those
        # positions only instead of on every position of every stacked pass.
        select = not fuse and cfg.output.positions is not None  # (no head found: run_passes returns the outputs)
        with autocast_for(cfg, dec.target):
            groups, head = dec.run_pass_groups(batch, all_passes, stack=cfg.train.stack_passes, defer_head=fuse or select)
            vals: list[Tensor | None] = [None] * len(all_passes)
            for idxs, out in groups:
                if head is not None and fuse:  # the passes stopped before the output head: head + KL fused
                    for i, o in zip(idxs, out.chunk(len(idxs), dim=0)):
                        vals[i] = ref.divergence_through_head(o, head, dec.head_onednn)
                    continue
                if head is not None:  # they stopped before it: the head on the output positions only
                    v = ref.divergences(dec.apply_head(ref.select(out, len(idxs))), len(idxs), selected=True)
                else:
                    v = ref.divergences(out, len(idxs))
                for k, i in enumerate(idxs):
                    vals[i] = v[k]
            for t in active:
                terms[t] = torch.stack([v for v, owner in zip(vals, owners) if owner == t]).mean()
    if coeffs.adversarial_recon > 0:
        # Under the same autocast as the target output it is compared with: otherwise bf16 rounding
        # alone would give the term a floor (KL ~3e-6 for an all-ones pass on the induction model).
        with autocast_for(cfg, dec.target):
            terms["adversarial_recon"] = adversarial_recon(dec, batch, target_out, ci_lower, gen, keep)
    if minimality:
        if min_term is None:
            min_term = importance_minimality(ci_upper, annealed_p(cfg, step), cfg.minimality.eps, keep)
        terms["importance_minimality"] = min_term
    total = sum(getattr(coeffs, t) * v for t, v in terms.items())
    return total, {t: float(v.detach()) for t, v in terms.items()}, ci_lower


def forward_passes(dec: Decomposition) -> int:
    """Forward passes of the target one step needs: the target run plus every masked pass."""
    cfg, n_sites = dec.config, len(dec.site_names)
    per_term = {
        "stochastic_recon": cfg.masks.n_samples,
        "stochastic_recon_layerwise": cfg.masks.n_samples * n_sites,
        "stochastic_recon_subset": cfg.masks.n_samples,
        "ci_masked_recon": 1,
        "adversarial_recon": cfg.adversarial.n_steps + 1,
    }
    return 1 + sum(n for t, n in per_term.items() if getattr(cfg.losses, t) > 0)


@functools.lru_cache(maxsize=1)
def cpu_info() -> tuple[str | None, frozenset[str]]:
    """This CPU's model name and flags from /proc/cpuinfo (None and no flags off Linux); read once."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, frozenset()
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), None)
    flags = next((ln.split(":", 1)[1] for ln in info.splitlines() if ln.startswith("flags")), "")
    return model, frozenset(flags.split())


_PINNED_FAST_BF16: bool | None = None


def pin_fast_bf16(value: bool | None) -> None:
    """Fix what `cpu_has_fast_bf16` answers (None: measure again). Data-parallel runs pin rank 0's
    measurement on every rank so that all ranks pick the same dtype."""
    global _PINNED_FAST_BF16
    _PINNED_FAST_BF16 = value


def cpu_has_fast_bf16() -> bool:
    """Whether bf16 matrix multiplies are clearly faster than fp32 on this CPU (see
    `measure_fast_bf16`), unless a data-parallel run pinned rank 0's answer (`pin_fast_bf16`)."""
    return measure_fast_bf16() if _PINNED_FAST_BF16 is None else _PINNED_FAST_BF16


@functools.lru_cache(maxsize=1)
def measure_fast_bf16() -> bool:
    """Whether bf16 matrix multiplies are clearly faster than fp32 on this CPU, measured once per
    process: a (512 x 576) @ (576 x 1536) product, the shape of a small LM's MLP on a 512-token
    batch, timed in both dtypes with the current thread count (~0.1 s); bf16 when it is >= 1.5x
    faster. Flags alone do not tell: a 2-core Xeon with AVX512-BF16 but no AMX ran bf16 at 164 vs
    305 GFLOP/s fp32, a 2-core AMD EPYC with AVX512-BF16 at 850 vs 195, an AMX Xeon about 4x fp32,
    a 2-core AMD EPYC with AVX2 only (bf16 emulated) 1.2 vs 82: there the bf16 timing stops after
    its second product (~1.5 s instead of ~5 s)."""
    import time

    gen = torch.Generator().manual_seed(0)  # not the global RNG a run has just seeded
    a32, b32 = torch.randn(512, 576, generator=gen), torch.randn(576, 1536, generator=gen)

    def best_time(dtype: torch.dtype, limit: float = float("inf")) -> float:
        a, b = a32.to(dtype), b32.to(dtype)
        best = float("inf")
        for i in range(7):
            t = time.perf_counter()
            a @ b
            t = time.perf_counter() - t
            if i >= 2:  # two warm-up products
                best = min(best, t)
            elif i == 1 and t > limit:  # far too slow to matter (bf16 emulated: ~70x fp32 on an AVX2-only CPU): stop
                return t
        return best

    try:
        fp32 = best_time(torch.float32)
        return best_time(torch.bfloat16, limit=20 * fp32) * 1.5 <= fp32  # the first product may set kernels up
    except RuntimeError:  # no bf16 matmul kernel on this CPU
        return False


def resolve_autocast(setting: str | None, device_type: str) -> str | None:
    """train.autocast as it applies on `device_type`: 'auto' becomes 'bf16' on a GPU that supports
    bf16 and on a CPU where bf16 matmuls measure >= 1.5x faster than fp32 (`cpu_has_fast_bf16`), else None."""
    if setting != "auto":
        return setting
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else None
    if device_type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else None
    return None


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's parameters live (the CPU for a model without any)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def autocast_for(cfg: RunConfig, model: torch.nn.Module):
    """bf16 autocast on the model's device when train.autocast says so, else a no-op context."""
    device_type = model_device(model).type
    if resolve_autocast(cfg.train.autocast, device_type) != "bf16":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device_type=device_type, dtype=torch.bfloat16))
    if device_type == "cpu":
        # The CPU flash-attention backward in bf16 is ~3x slower than the math kernel's (measured,
        # torch 2.13: 13.2 vs 7.9 ms fwd+bwd at 24 x 4 heads x 128 x 32); fp32 flash stays faster.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


def l0(ci: Tensor, threshold: float, keep: Tensor | None = None) -> Tensor:
    """Mean number of subcomponents with CI > threshold per token (per real token, given the
    batch's `keep`)."""
    n = (ci > threshold).float().sum(-1)
    w = row_weights(keep, n.shape)
    return (n if w is None else n * w).mean()

