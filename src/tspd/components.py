"""Rank-1 factors of one site and the module that stands in for the site during a masked pass.

A site with target weight W (d_out x d_in, nn.Linear layout) gets V (d_in x C) and U (C x d_out)
with W ~ (V U)^T. A masked pass computes ((x V) * m) U + b and never materialises the masked weight.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tspd.fastlinear import StandIn, linear, original_output, untouched

SiteKind = Literal["linear", "conv1d", "embedding"]


class SiteError(ValueError):
    """A site pattern matched nothing or matched a module tspd cannot decompose."""


def site_kind(module: nn.Module) -> SiteKind | None:
    """The kind of site a module can be; None when tspd cannot stand in for it. A subclass that
    brings its own forward (e.g. Gemma's embedding scaled by sqrt(d)) cannot: a masked pass would
    compute the plain product without what that forward adds."""
    if isinstance(module, nn.Linear):
        return "linear" if type(module).forward is nn.Linear.forward else None
    if isinstance(module, nn.Embedding):
        plain = type(module).forward is nn.Embedding.forward and module.max_norm is None
        return "embedding" if plain else None
    # Hugging Face GPT-2 Conv1D, matched by name so transformers stays optional.
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight"):
        return "conv1d"
    return None


def _weight_hook(h) -> bool:
    """torch's old hook-based weight_norm / spectral_norm, and torch.nn.utils.prune: pre-hooks that only recompute the weight
    attribute, which a stand-in reads as they left it (the target's parameters are frozen)."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return isinstance(h, (WeightNorm, SpectralNorm, BasePruningMethod))


def check_site_hooks(name: str, module: nn.Module) -> None:
    """Refuse a site module with hooks: a masked pass computes the site's output from its factors
    and never calls the module, so a hook that changes its input or output would run in the target
    run and be skipped in every pass (every mask 1 would no longer give the target)."""
    hooks = [h for d in (module._forward_pre_hooks, module._forward_hooks) for h in d.values() if not _weight_hook(h)]
    hooks += list(module._backward_hooks.values()) + list(module._backward_pre_hooks.values())
    if hooks:
        names = ", ".join(sorted({getattr(h, "__qualname__", type(h).__name__) for h in hooks}))
        raise SiteError(
            f"site {name!r} has {len(hooks)} hook(s) on its module ({names}): a masked pass computes the site from its "
            "factors without calling the module, so the hooks would change the target run but not the passes. Remove "
            "the hooks from the site module (put them on its parent, or on the module after it), or choose another site")


def target_weight(module: nn.Module, kind: SiteKind) -> Tensor:
    """The site's weight in nn.Linear layout (d_out x d_in); an embedding is d_model x vocab."""
    if kind == "linear":
        return module.weight
    return module.weight.T  # Conv1D stores d_in x d_out; Embedding stores vocab x d_model


def _holds_a_matrix(module: nn.Module) -> bool:
    """Whether a module looks like one meant to be decomposed: a Linear / Embedding (subclass), a
    TorchScript module, or one with a parameter of two or more dimensions of its own."""
    if isinstance(module, (nn.Linear, nn.Embedding, torch.jit.ScriptModule)):
        return True
    # any parameter of its own (MultiheadAttention's in_proj_weight, an RNN's weight_ih_l0, a custom W)
    return any(p is not None and p.dim() >= 2 for p in module._parameters.values())


def resolve_sites(model: nn.Module, patterns: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Match glob patterns against module paths; returns (name, C) in module order. A pattern that
    matches decomposable modules skips the others it meets that hold no weight matrix (activations,
    norms, containers of a block).

    Raises SiteError naming what exists when a pattern matches nothing decomposable or a module
    with a weight matrix tspd cannot take.
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
        if len(bad) < len(hits):
            # A glob over a block (`transformer.h.1.mlp.*`) also meets its activation, dropout, norms and
            # containers: skipped. A module holding a weight matrix it cannot take is still an error.
            bad = [n for n in bad if _holds_a_matrix(modules[n])]
        if bad:
            m = modules[bad[0]]
            if isinstance(m, nn.Embedding) and type(m).forward is nn.Embedding.forward:
                why = "an nn.Embedding with max_norm (its lookups renormalise rows in place), which tspd cannot decompose"
            elif isinstance(m, (nn.Linear, nn.Embedding)):
                why = (f"a subclass of {'nn.Linear' if isinstance(m, nn.Linear) else 'nn.Embedding'} with its own forward "
                       "(e.g. an embedding that scales its output), which a masked pass would replace by the plain product")
            elif isinstance(m, torch.jit.ScriptModule):
                why = ("a TorchScript module (torch.jit.script / trace), whose compiled forward tspd cannot stand in for; "
                       "decompose the eager model before scripting it")
            else:
                why = "not nn.Linear, GPT-2 Conv1D or nn.Embedding"
            raise SiteError(
                f"site pattern {pattern!r} matches {bad[0]!r} ({type(m).__name__}), {why}. Narrow the pattern; "
                f"decomposable modules are:\n  " + "\n  ".join(supported[:60])
            )
        for n in (h for h in hits if site_kind(modules[h]) is not None):
            if chosen.get(n, C) != C:
                raise SiteError(f"module {n!r} is matched by two site patterns with different C ({chosen[n]} and {C}, "
                                f"the second {pattern!r}); make the patterns disjoint or give them the same C")
            chosen[n] = C
    paths: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(n)
    for n in chosen:
        aliases = paths[id(modules[n])]
        if len(aliases) > 1:
            raise SiteError(f"module {n!r} is registered under {len(aliases)} paths ({', '.join(aliases)}): tspd stands in "
                            "for a site at one path, so the other uses would keep the target weight; a module used "
                            "twice cannot be a site unless it is registered once (call it twice instead: its CI then comes from "
                            "the last call's input and its masks apply to every call)")
    order = {n: i for i, n in enumerate(modules)}
    return sorted(chosen.items(), key=lambda kv: order[kv[0]])


@dataclass
class SiteInfo:
    """One module tspd can decompose: its path, kind and shape (nn.Linear layout: d_out x d_in;
    an embedding's d_in is its vocabulary), the C a site pattern gave it (None: not chosen), and
    the other module paths that use the same weight tensor (tied weights keep the target weight
    there)."""

    name: str
    module_type: str
    kind: SiteKind
    d_in: int
    d_out: int
    C: int | None = None
    tied_with: tuple[str, ...] = ()

    @property
    def weight_params(self) -> int:
        return self.d_in * self.d_out

    @property
    def factor_params(self) -> int | None:
        """Parameters of V and U (C (d_in + d_out)); None when no C was given."""
        return None if self.C is None else self.C * (self.d_in + self.d_out)


def describe_sites(model: nn.Module, patterns: list[tuple[str, int]] | None = None) -> list[SiteInfo]:
    """Every module of `model` tspd can decompose, in module order, with its shape; with
    `patterns` ((glob, C) pairs, as a config's `sites`), the modules they choose, with their C and
    the same errors a run gives (a pattern that matches nothing lists what exists). Works on a
    model on the meta device (shapes only, nothing loaded).

    Example: `[(s.name, s.d_in, s.d_out) for s in describe_sites(gpt2, [("transformer.h.*.mlp.c_fc", 256)])]`
    """
    chosen = dict(resolve_sites(model, patterns)) if patterns else None
    users: dict[int, list[str]] = {}
    for n, m in model.named_modules():
        w = getattr(m, "weight", None)
        if n and isinstance(w, Tensor):
            users.setdefault(id(w), []).append(n)
    out = []
    for n, m in model.named_modules():
        kind = site_kind(m) if n else None
        if kind is None or (chosen is not None and n not in chosen):
            continue
        d_out, d_in = target_weight(m, kind).shape
        tied = tuple(u for u in users.get(id(m.weight), []) if u != n)
        out.append(SiteInfo(n, type(m).__name__, kind, int(d_in), int(d_out), None if chosen is None else chosen[n], tied))
    return out


class Components(nn.Module):
    """V (d_in x C) and U (C x d_out) of one site. Embeddings: V is vocab x C and h = V[token]."""

    def __init__(self, kind: SiteKind, d_in: int, d_out: int, C: int, generator: torch.Generator | None = None):
        super().__init__()
        self.kind, self.d_in, self.d_out, self.C = kind, d_in, d_out, C
        # Scaled so that x V U has roughly the scale of x W for unit-scale W; the faithfulness
        # warm-up then fits VU to W.
        self.V = nn.Parameter(torch.randn(d_in, C, generator=generator) / d_in**0.5)
        self.U = nn.Parameter(torch.randn(C, d_out, generator=generator) / C**0.5)

    def inner(self, x: Tensor, onednn: bool = False) -> Tensor:
        """Inner activations h = x V, shape (..., C); for embeddings x holds token ids. `onednn`:
        the product through tspd.fastlinear where it applies."""
        if self.kind == "embedding":
            return F.embedding(x, self.V)
        return linear(x, self.V) if onednn else x @ self.V

    def weight(self) -> Tensor:
        """(V U)^T in nn.Linear layout (d_out x d_in)."""
        return (self.V @ self.U).T


@dataclass
class Segment:
    """How a site treats `rows` consecutive examples of a (possibly stacked) batch.

    masks None: the target weight. Otherwise masks (..., C) multiply the inner activations; routed
    (leading shape, bool) says where the components replace the target weight (None: everywhere);
    delta (leading shape) scales the delta component W - (VU)^T (None: no delta).
    """

    rows: int
    masks: Tensor | None = None
    routed: Tensor | None = None
    delta: Tensor | None = None
    # The pass these rows belong to (masked segments; merged target-weight segments may span several).
    pass_index: int | None = None


class PassStarts:
    """Per pass of one stacked forward (shared by every stand-in): where its first masked segment
    ran, as the stacked input tensor that segment was cut from.

    Until a pass's first masked segment has run, its rows are the target's own computation: no
    trainable tensor reaches them (a Decomposition freezes the target's parameters while it runs
    passes, and uses no PassStarts when the batch requires grad) and they hold the target run's
    values. A segment is *clean* when it is cut from such rows: before the pass started, or from the
    very tensor (same object, not modified since) its first masked segment was cut from, as when
    an attention block hands one input to its q, k and v projections. A clean segment takes its
    input detached, so autograd skips the input gradient of its products (e.g. a layerwise pass at
    an MLP's c_proj, stacked behind passes that make the whole c_proj input require grad), and it
    reads x V and x W^T from the target run (`SiteTarget`) instead of recomputing them.

    Not covered: a forward hook on the target that brings in its own tensor requiring grad (e.g. a
    steering vector); through stacked passes its gradient would miss those rows' share. Run such
    passes one at a time (`run_passes(..., stack=False)` or `run_pass`), which never uses this."""

    def __init__(self, n: int):
        self.origin: list[Tensor | None] = [None] * n
        self.version: list[int] = [0] * n

    def clean(self, i: int, x: Tensor) -> bool:
        """Whether pass i's segment cut from stacked input `x` is clean; marks the pass started."""
        o = self.origin[i]
        if o is None:
            self.origin[i], self.version[i] = x, x._version
            return True
        return o is x and x._version == self.version[i]


@dataclass
class SiteTarget:
    """The target run's values at one site, for the batch a stacked forward repeats: input x and
    output y as `run_target` recorded them (with their versions then, so an in-place change since
    is seen), and the inner activations x V (with their gradient path to V) that every clean
    segment of the site shares -- the CI's own when its function reads them
    (`Decomposition.ci_logits` stores them), else formed by the first clean segment. Made only for
    a site called once in the target run (`SiteModule.record`)."""

    x: Tensor
    x_version: int
    y: Tensor | None  # None: not to be reused (no delta component, or hooks on the site module)
    y_version: int
    weight_versions: tuple  # the target weight's and bias's versions at the recording
    inner: Tensor | None = None
    # What the inner activations were formed under: (V's version, requires_grad, dtype).
    inner_key: tuple | None = None
    lin: Tensor | None = None  # y without the bias: x W^T

    def set_inner(self, inner: Tensor, V: Tensor) -> None:
        self.inner, self.inner_key = inner, (V._version, inner.requires_grad, inner.dtype)


@dataclass
class SiteState:
    """What the stand-in module does on its next call: 'record' runs the original module and keeps
    its input and output; 'masked' runs each segment of the batch (split along dim 0) as its
    Segment says. `starts` (shared by every stand-in of one forward; None: off) and `target` (this
    site's values in the target run of the repeated batch; None: not known) let clean segments
    skip work (see PassStarts)."""

    mode: Literal["record", "masked"] = "record"
    segments: list[Segment] = field(default_factory=list)
    starts: PassStarts | None = None
    target: SiteTarget | None = None
    calls: int = 0  # calls since the state was set (a site whose masks a pass never applied is an error)
    shapes: set = field(default_factory=set)  # input shapes seen in record mode


class SiteModule(StandIn):
    """Stands in for a target module while a Decomposition runs a pass (the target module's
    attributes read through, see StandIn).

    The masked output is computed as d * (x W^T) + ((x V) * (m - d)) U + b, which equals
    ((x V) * m) U + b + d * x (W - (VU)^T)^T (the delta component with mask d) without forming the
    delta matrix; where a row is not routed, d = 1 and m - d = 0 give x W^T + b exactly, with exactly
    zero gradient to U and V, so mixed routing needs no gather or scatter.
    """

    def __init__(self, original: nn.Module, kind: SiteKind, components: Components, use_delta: bool):
        super().__init__(original)  # held outside the module tree: parameters() never lists the target's
        self.kind, self.use_delta = kind, use_delta
        self.__dict__["components"] = components
        self.state = SiteState()
        self.recorded: Tensor | None = None
        # What clean segments may reuse from the target run (None: nothing; see `_site_target`).
        self.record: SiteTarget | None = None
        # fp32 products through oneDNN (tspd.fastlinear; set by the Decomposition from train.fp32_matmul).
        self.onednn = False

    def _bias(self) -> Tensor | None:
        # (not `bias`: a stand-in reads through to the original module, whose `bias` code may read)
        return getattr(self.original, "bias", None) if self.kind != "embedding" else None

    def forward(self, x: Tensor) -> Tensor:
        st = self.state
        st.calls += 1
        if st.mode == "record":
            st.shapes.add(tuple(x.shape))
            y = self._original(x)
            # A second call (a shared layer applied twice) leaves nothing to reuse: which call's
            # values would a segment need?
            self.record = self._site_target(x, y) if self.recorded is None else None
            self.recorded = x
            return y
        segs = st.segments
        if len(segs) == 1:
            return self._segment_out(x, segs[0], x)
        sizes = [seg.rows for seg in segs]
        if x.dim() == 0 or sum(sizes) != x.shape[0]:
            raise RuntimeError(
                f"stacked passes give this site {sum(sizes)} rows on dim 0 but its input has shape {tuple(x.shape)}: the "
                "model moves the batch off dim 0 before the site (e.g. flattens tokens); run the target once "
                "(run_target) on the batch first, so passes run one by one, or set train.stack_passes: false")
        parts = x.split(sizes)
        return torch.cat([self._segment_out(xi, seg, x) for xi, seg in zip(parts, segs)])

    def _original(self, x: Tensor) -> Tensor:
        """The target module's own output (through oneDNN where on, it applies and the module has no hooks)."""
        m = self.original
        if self.kind == "embedding":
            return m(x)
        return original_output(m, x, target_weight(m, self.kind).t(), self.onednn)

    def _target_linear(self, x: Tensor) -> Tensor:
        """x W^T without the bias."""
        if self.kind == "embedding":
            return F.embedding(x, self.original.weight)
        w = target_weight(self.original, self.kind)
        return linear(x, w.t()) if self.onednn else F.linear(x, w)

    def _segment_out(self, x: Tensor, seg: Segment, stacked: Tensor) -> Tensor:
        """The output for one segment `x` cut from the site's stacked input `stacked`."""
        if seg.masks is None:
            return self._original(x)
        delta = seg.delta if self.use_delta else None
        routed = seg.routed
        if routed is not None:
            if bool(routed.all()):
                routed = None
            elif not bool(routed.any()):
                return self._original(x)
        starts = self.state.starts
        clean = starts is not None and seg.pass_index is not None and starts.clean(seg.pass_index, stacked)
        if clean:
            x = x.detach()  # rows of the target's own computation: no input gradient (see PassStarts)
        if routed is not None:
            d = torch.where(routed, delta if delta is not None else 0.0, 1.0).to(seg.masks.dtype)
            coeff = (seg.masks - d.unsqueeze(-1)) * routed.unsqueeze(-1)
        elif delta is not None:
            d = delta
            coeff = seg.masks - d.unsqueeze(-1)
        else:
            d, coeff = None, seg.masks
        U = self.components.U
        out_dtype = None
        if self.kind != "embedding" and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(
            x.device.type
        ):
            # x V and x W^T would each cast x to the autocast dtype (autocast caches casts of
            # parameters only): cast once, to the same values. (fp64 is never cast by autocast.)
            out_dtype = torch.get_autocast_dtype(x.device.type)
            x = x.to(out_dtype)
        if coeff.dtype != U.dtype:
            # The CI and so the masks are fp32; a bf16 or fp16 target (without autocast) has factors
            # in its own dtype, and the product must be in one dtype.
            coeff, d = coeff.to(U.dtype), (d.to(U.dtype) if d is not None else None)
        known = self.state.target if clean else None
        if known is not None and (known.x.shape != x.shape or known.x._version != known.x_version):
            known = None  # not one row per row of the recorded batch, or changed in place since
        h = self._target_inner(known, x, out_dtype) if known is not None else self.components.inner(x, self.onednn)
        h = h * coeff
        out = linear(h, U) if self.onednn else h @ U
        if d is not None:
            lin = self._target_lin(known, x, out_dtype) if known is not None else None
            out = out + d.unsqueeze(-1) * (lin if lin is not None else self._target_linear(x))
        b = self._bias()
        out = out if b is None else out + b
        # Under autocast the module's own output is in the autocast dtype; the masked output too
        # (the bf16 products summed in fp32 with the fp32 delta mask and bias, then rounded), so that
        # passes keep the target's dtype downstream and stacked segments concatenate without promotion.
        return out if out_dtype is None else out.to(out_dtype)

    def _site_target(self, x: Tensor, y: Tensor) -> SiteTarget | None:
        """The recording of one call, with its versions taken now (a later in-place change must
        show); None for inference tensors (no versions; no gradient path)."""
        if x.is_inference() or y.is_inference():
            return None
        keep_y = self.use_delta and untouched(self.original)  # a forward hook may have changed y
        return SiteTarget(x, x._version, y if keep_y else None, y._version, self._weight_versions())

    def _weight_versions(self) -> tuple:
        b = self._bias()
        return (target_weight(self.original, self.kind)._version, None if b is None else b._version)

    def _product_dtype(self, x: Tensor, w: Tensor, autocast_dtype: torch.dtype | None) -> torch.dtype:
        """The dtype this site's product of `x` (as the segment holds it) with `w` comes out in."""
        if self.kind == "embedding":
            return w.dtype  # a lookup
        return autocast_dtype or torch.promote_types(x.dtype, w.dtype)

    def _target_inner(self, known: SiteTarget, x: Tensor, autocast_dtype: torch.dtype | None) -> Tensor:
        """x V for a clean segment `x` (already cast as the segment computes it): the target run's,
        shared with the CI and the site's other clean segments, when formed under the same V,
        gradient mode and dtype as this segment would form its own; else formed here from the
        recorded input and kept for the site's later clean segments."""
        V = self.components.V
        key = (V._version, torch.is_grad_enabled() and V.requires_grad, self._product_dtype(x, V, autocast_dtype))
        if known.inner is None or known.inner_key != key or known.inner.shape[:-1] != x.shape[:-1]:
            rec = known.x.detach()
            known.set_inner(self.components.inner(rec if rec.dtype == x.dtype else rec.to(x.dtype), self.onednn), V)
        return known.inner

    def _target_lin(self, known: SiteTarget, x: Tensor, autocast_dtype: torch.dtype | None) -> Tensor | None:
        """x W^T for a clean segment from the recorded output (its bias taken off), if it was kept,
        is unchanged since, the target weight and bias too, and it has the dtype the product would."""
        y = known.y
        if y is None or y._version != known.y_version or known.weight_versions != self._weight_versions():
            return None
        if y.dtype != self._product_dtype(x, target_weight(self.original, self.kind), autocast_dtype):
            return None
        if known.lin is None:
            b = self._bias()
            known.lin = y if b is None else y - b
        return known.lin
