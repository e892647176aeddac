"""Mask sampling and routing (SPEC §4).

A mask is m = g + (1 - g) r with r ~ U(0, 1) (continuous) or Bernoulli(0.5) (binomial).
Routing says, per site, where the components replace the target weight in one pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tspd.native import uniform16


@dataclass
class Pass:
    """One masked forward: per routed site its masks (..., C), where it is routed (leading shape
    bool, None = everywhere), and the delta mask. Sites absent from `masks` use the target weight."""

    masks: dict[str, Tensor]
    routed: dict[str, Tensor | None] = field(default_factory=dict)
    delta: dict[str, Tensor] = field(default_factory=dict)


def uniform(shape: tuple[int, ...] | torch.Size, generator: torch.Generator, dtype: torch.dtype, device) -> Tensor:
    """U(0, 1) on the 2^16-point grid (k + 1/2) / 2^16 (masks need no finer grid): four values from
    each 64-bit draw of torch.randint (`torch_uniform`), ~3x faster than torch.rand's draw per
    element. Drawn on the CPU stream even for GPU tensors: the same masks on every device, exact
    resume. For CPU tensors the same values come from tspd.native's compiled loop where it is
    available (4-6x faster than torch's draw)."""
    if torch.device(device).type == "cpu":
        u = uniform16(math.prod(shape), generator)
        if u is not None:
            u = u.view(shape)
            return u if dtype == torch.float32 else u.to(dtype)
    return torch_uniform(shape, generator, dtype, device)


def torch_uniform(shape: tuple[int, ...] | torch.Size, generator: torch.Generator, dtype: torch.dtype, device) -> Tensor:
    """`uniform` through torch's own kernels."""
    n = math.prod(shape)
    bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), generator=generator, dtype=torch.int64)
    bits = bits.view(torch.int16)[:n].to(device, non_blocking=True)
    # (k + 2^15 + 1/2) / 2^16 for the signed 16-bit k, as c + 2^-16 k in one op (a 0-dim fp32 c
    # and int16 k promote to fp32: one pass, where a conversion and two in-place ops made three);
    # exact in fp32 on this grid, while fp16 would overflow at 2^15 and bf16 round to 385 values.
    c = torch.tensor((2**15 + 0.5) * 2.0**-16, dtype=torch.float32, device=bits.device)
    u = torch.add(c, bits, alpha=2.0**-16).view(shape)
    return u if dtype == torch.float32 else u.to(dtype)


def sample_sources(like: Tensor, kind: str, generator: torch.Generator) -> Tensor:
    """r in m = g + (1 - g) r."""
    r = uniform(like.shape, generator, like.dtype, like.device)
    if kind == "binomial":
        r = (r < 0.5).to(like.dtype)
    return r


def stochastic_masks(ci: dict[str, Tensor], kind: str, generator: torch.Generator) -> dict[str, Tensor]:
    """m = g + (1 - g) r, computed as lerp(r, 1, g): one fused op forward and backward."""
    masks = {}
    for s, g in ci.items():
        masks[s] = torch.lerp(sample_sources(g, kind, generator), torch.ones((), dtype=g.dtype, device=g.device), g)
    return masks


def delta_masks(ci: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    """One U(0, 1) scalar per (example, position) for each site's delta component."""
    return {s: uniform(g.shape[:-1], generator, g.dtype, g.device) for s, g in ci.items()}


def subset_routing(
    sites: list[str], lead_shape: tuple[int, ...] | dict[str, tuple[int, ...]], granularity: str, generator: torch.Generator
) -> dict[str, Tensor]:
    """Random subset of sites: k ~ U{1..n_sites}, then a uniform k-subset.

    `lead_shape`: the sites' leading shape (their CI's shape without C), or one per site when they
    differ (e.g. a pooled classifier head (B,) next to token sites (B, T)): then 'per_example' needs
    every site's dim 0 to be the same B, and 'per_position' is refused.

    granularity 'per_batch' draws one subset for the pass, 'per_example' one per example (dim 0),
    'per_position' one per (example, position). Returns a bool tensor of `lead_shape` per site.
    """
    n = len(sites)
    leads = {s: tuple(lead_shape[s]) for s in sites} if isinstance(lead_shape, dict) else {s: tuple(lead_shape) for s in sites}
    lead_shape = leads[sites[0]] if sites else ()
    if len(set(leads.values())) > 1:
        shapes = ", ".join(f"{s} {leads[s]}" for s in sites)
        if granularity == "per_position":
            raise ValueError(f"masks.subset_granularity per_position needs every site's CI to have the same leading "
                             f"shape; these differ ({shapes}): use per_example or per_batch")
        if granularity == "per_example" and len({lead[:1] for lead in leads.values()}) > 1:
            raise ValueError(f"masks.subset_granularity per_example needs every site's CI to have the batch as its "
                             f"first dimension; these differ ({shapes}): use per_batch")
    if granularity == "per_batch":
        draw_shape: tuple[int, ...] = ()
    elif granularity == "per_example":
        draw_shape = lead_shape[:1]
    elif granularity == "per_position":
        draw_shape = lead_shape
    else:
        raise ValueError(f"unknown subset granularity {granularity!r}: use per_batch, per_example or per_position")
    k = torch.randint(1, n + 1, draw_shape, generator=generator)
    # A uniform random k-subset: the k sites with the smallest of n i.i.d. uniform keys.
    ranks = torch.rand((*draw_shape, n), generator=generator).argsort(-1).argsort(-1)
    chosen = ranks < k.unsqueeze(-1)
    out = {}
    for i, s in enumerate(sites):
        c = chosen[..., i]
        while c.dim() < len(leads[s]):
            c = c.unsqueeze(-1)
        out[s] = c.expand(leads[s])
    return out
