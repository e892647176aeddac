"""Rank-1 factors of one site and the module that stands in for the site during a masked pass.

A site with target weight W (d_out x d_in, nn.Linear layout) gets V (d_in x C) and U (C x d_out)
with W ~ (V U)^T. A masked pass computes ((x V) * m) U + b and never materialises the masked weight.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SiteKind = Literal["linear", "conv1d", "embedding"]


class SiteError(ValueError):
    """A site pattern matched nothing or matched a module tspd cannot decompose."""


def site_kind(module: nn.Module) -> SiteKind | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    # Hugging Face GPT-2 Conv1D, matched by name so transformers stays optional.
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight"):
        return "conv1d"
    return None


def target_weight(module: nn.Module, kind: SiteKind) -> Tensor:
    """The site's weight in nn.Linear layout (d_out x d_in); an embedding is d_model x vocab."""
    if kind == "linear":
        return module.weight
    return module.weight.T  # Conv1D stores d_in x d_out; Embedding stores vocab x d_model


def resolve_sites(model: nn.Module, patterns: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Match glob patterns against module paths; returns (name, C) in module order.

    Raises SiteError naming what exists when a pattern matches nothing or an unsupported module.
    """
    modules = dict(model.named_modules())
    supported = [n for n, m in modules.items() if n and site_kind(m) is not None]
    chosen: dict[str, int] = {}
    for pattern, C in patterns:
        hits = [n for n in modules if n and fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise SiteError(
                f"site pattern {pattern!r} matches no module. Decomposable modules are:\n  "
                + "\n  ".join(supported[:60])
                + ("\n  ..." if len(supported) > 60 else "")
            )
        bad = [n for n in hits if site_kind(modules[n]) is None]
        if bad:
            raise SiteError(
                f"site pattern {pattern!r} matches {bad[0]!r} ({type(modules[bad[0]]).__name__}), which is not "
                f"nn.Linear, GPT-2 Conv1D or nn.Embedding. Narrow the pattern; decomposable modules are:\n  "
                + "\n  ".join(supported[:60])
            )
        for n in hits:
            chosen[n] = C
    order = {n: i for i, n in enumerate(modules)}
    return sorted(chosen.items(), key=lambda kv: order[kv[0]])


class Components(nn.Module):
    """V (d_in x C) and U (C x d_out) of one site. Embeddings: V is vocab x C and h = V[token]."""

    def __init__(self, kind: SiteKind, d_in: int, d_out: int, C: int, generator: torch.Generator | None = None):
        super().__init__()
        self.kind, self.d_in, self.d_out, self.C = kind, d_in, d_out, C
        # Scaled so that x V U has roughly the scale of x W for unit-scale W; the faithfulness
        # warm-up then fits VU to W.
        self.V = nn.Parameter(torch.randn(d_in, C, generator=generator) / d_in**0.5)
        self.U = nn.Parameter(torch.randn(C, d_out, generator=generator) / C**0.5)

    def inner(self, x: Tensor) -> Tensor:
        """Inner activations h = x V, shape (..., C); for embeddings x holds token ids."""
        if self.kind == "embedding":
            return F.embedding(x, self.V)
        return x @ self.V

    def weight(self) -> Tensor:
        """(V U)^T in nn.Linear layout (d_out x d_in)."""
        return (self.V @ self.U).T


@dataclass
class SiteState:
    """What the stand-in module does on its next call.

    mode 'record': run the original module and remember the input.
    mode 'masked': masks (..., C) multiply the inner activations; routed (leading shape, bool) says
    where the components replace the target weight (None: everywhere); delta_mask (leading shape)
    scales the delta component when it is on.
    """

    mode: Literal["record", "masked"] = "record"
    masks: Tensor | None = None
    routed: Tensor | None = None
    delta_mask: Tensor | None = None


class SiteModule(nn.Module):
    """Stands in for a target module while a Decomposition runs a pass."""

    def __init__(self, original: nn.Module, kind: SiteKind, components: Components, use_delta: bool):
        super().__init__()
        self.kind, self.use_delta = kind, use_delta
        # Held outside the module tree so parameters() of the stand-in never lists the target's.
        self.__dict__["original"] = original
        self.__dict__["components"] = components
        self.state = SiteState()
        self.recorded: Tensor | None = None

    def bias(self) -> Tensor | None:
        return getattr(self.original, "bias", None) if self.kind != "embedding" else None

    def forward(self, x: Tensor) -> Tensor:
        st = self.state
        if st.mode == "record":
            self.recorded = x
            return self.original(x)
        lead = x.shape if self.kind == "embedding" else x.shape[:-1]
        routed = st.routed
        if routed is None or bool(routed.all()):
            return self._component_out(x, st.masks, st.delta_mask)
        if not bool(routed.any()):
            return self.original(x)
        # Mixed routing: component path on routed rows only, target path on the rest.
        flat_r = routed.reshape(-1)
        xf = x.reshape(-1) if self.kind == "embedding" else x.reshape(-1, x.shape[-1])
        mf = st.masks.reshape(-1, st.masks.shape[-1])
        df = None if st.delta_mask is None else st.delta_mask.reshape(-1)
        idx_r = flat_r.nonzero().squeeze(1)
        idx_t = (~flat_r).nonzero().squeeze(1)
        out_r = self._component_out(xf[idx_r], mf[idx_r], None if df is None else df[idx_r])
        out_t = self.original(xf[idx_t])
        out = out_r.new_empty((flat_r.shape[0], out_r.shape[-1]))
        out[idx_r] = out_r
        out[idx_t] = out_t.to(out.dtype)
        return out.reshape(*lead, out.shape[-1])

    def _component_out(self, x: Tensor, masks: Tensor, delta_mask: Tensor | None) -> Tensor:
        comps = self.components
        out = (comps.inner(x) * masks) @ comps.U
        b = self.bias()
        if b is not None:
            out = out + b
        if self.use_delta and delta_mask is not None:
            delta = target_weight(self.original, self.kind) - comps.weight()
            if self.kind == "embedding":
                delta_out = F.embedding(x, delta.T)
            else:
                delta_out = F.linear(x, delta)
            out = out + delta_mask.unsqueeze(-1) * delta_out
        return out
