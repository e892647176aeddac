"""fp32 matrix products through oneDNN where its kernels beat the BLAS torch calls.

torch's CPU wheel multiplies fp32 matrices with MKL, which on the 2-core AMD EPYC (Zen 5, AVX-512)
this project is developed on runs at about half oneDNN's rate (~200 GFLOP/s, the rate of 256-bit
kernels at its clock; MKL_ENABLE_INSTRUCTIONS=AVX512 changes nothing): a (6144 x 128) @ (128 x 512)
product took 4.3 ms through MKL and 1.75 ms through oneDNN (torch's `mkldnn._linear_pointwise`),
both in IEEE fp32 (results agree to ~1e-6 relative, the reordering of a sum). `linear` computes
x @ w + b (w in (d_in, d_out) layout) with oneDNN's kernels forward and backward, and falls back to
plain torch where they do not apply (autocast, other dtypes or devices, oneDNN missing).
`onednn_fp32_is_faster` measures once per process whether to use it (`train.fp32_matmul: auto`).

Example:
    >>> import torch
    >>> from tspd.fastlinear import linear
    >>> x, w = torch.randn(4, 3), torch.randn(3, 2)
    >>> bool(torch.allclose(linear(x, w, onednn=True), x @ w, atol=1e-6))
    True
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

# The weight gradient x^T g goes through oneDNN's inner-product backward only when both of the
# weight's sides are at least this long: below it the conversions to oneDNN's tensor type cost
# more than the product saves (measured: (4096 x 16)^T (4096 x 100) 133 us MKL vs 343 us oneDNN;
# (6144 x 128)^T (6144 x 256) 2.2 ms vs 1.2 ms).
WEIGHT_GRAD_MIN_SIDE = 64


def onednn_available() -> bool:
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.aten, "mkldnn_linear_backward_weights")
    )


def linear_pointwise(x: Tensor, w_nk: Tensor, b: Tensor | None) -> Tensor:
    """x @ w_nk^T + b by oneDNN (w_nk in nn.Linear's (d_out, d_in) layout)."""
    return torch.ops.mkldnn._linear_pointwise(x, w_nk, b, "none", [], "")


def _weight_grad(x2: Tensor, g2: Tensor) -> Tensor:
    """x2^T g2, contiguous, for 2-D x2 (rows, k) and g2 (rows, n)."""
    k, n = x2.shape[1], g2.shape[1]
    if min(k, n) < WEIGHT_GRAD_MIN_SIDE:
        return x2.t() @ g2
    shape = torch.empty(k, n, dtype=x2.dtype).to_mkldnn()
    # mkldnn_linear_backward_weights(grad_output, input, weight) = grad_output^T input, in weight's shape.
    return torch.ops.aten.mkldnn_linear_backward_weights(x2.to_mkldnn(), g2.to_mkldnn(), shape, False)[0]


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        x = x.contiguous()
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return linear_pointwise(x, w.t(), b)

    @staticmethod
    @once_differentiable  # a second derivative through it raises instead of being silently wrong
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        gx = gw = gb = None
        g = g.contiguous()
        if ctx.needs_input_grad[0]:
            gx = linear_pointwise(g, w, None)
        g2 = g.reshape(-1, g.shape[-1])
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            # In the weight's own layout: an nn.Linear weight comes in transposed, (d_out, d_in) in memory.
            gw = _weight_grad(x2, g2) if not w.t().is_contiguous() else _weight_grad(g2, x2).t()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


def applies(x: Tensor, w: Tensor, b: Tensor | None) -> bool:
    """Whether oneDNN computes x @ w + b here: fp32 CPU tensors outside autocast, x with a batch
    dimension, no empty dimension, a 1-D bias."""
    return (
        x.dtype == torch.float32
        and w.dtype == torch.float32
        and x.device.type == "cpu"
        and w.device.type == "cpu"
        and w.dim() == 2
        and x.dim() >= 2
        and x.numel() > 0
        and w.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and (b is None or (b.dtype == torch.float32 and b.dim() == 1 and b.device.type == "cpu"))
    )


def _apply(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    # The Function works on rows (oneDNN returns a view for a 3-D input, and a custom Function's
    # output that is a view cannot be modified in place); the reshape back is an ordinary view.
    lead = x.shape[:-1]
    out = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), w, None if b is None else b.contiguous())
    return out.view(*lead, out.shape[-1])


def linear(x: Tensor, w: Tensor, b: Tensor | None = None, onednn: bool = True) -> Tensor:
    """x @ w + b for w of shape (d_in, d_out); through oneDNN when `onednn` and it `applies`, else
    torch's own `F.linear` (autocast-aware: under autocast the product is in the autocast dtype)."""
    if onednn and applies(x, w, b):
        return _apply(x, w, b)
    return F.linear(x, w.t(), b)


def linear_layer(layer: nn.Linear, x: Tensor, onednn: bool) -> Tensor:
    """layer(x) for an nn.Linear, through oneDNN when `onednn` and it applies (gradients reach its
    weight and bias), else the layer itself."""
    w = layer.weight.t()
    return _apply(x, w, layer.bias) if onednn and applies(x, w, layer.bias) else layer(x)


def untouched(m: nn.Module) -> bool:
    """No hook of any kind on `m` (a stand-in would bypass it)."""
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def original_output(m: nn.Module, x: Tensor, w: Tensor, onednn: bool) -> Tensor:
    """m(x) for an nn.Linear or GPT-2 Conv1D `m` whose weight is `w` in (d_in, d_out) layout:
    through oneDNN when `onednn`, it applies and `m` has no hooks, else m's own forward."""
    if onednn and untouched(m) and applies(x, w, m.bias):
        return _apply(x, w, m.bias)
    return m(x)


class StandIn(nn.Module):
    """Base of the modules a Decomposition puts in a target module's place during a pass: holds
    the original outside the module tree (parameters() never lists it twice) and reads its
    attributes through, for models that read e.g. `lm_head.weight.dtype` or `out_proj.weight`
    instead of calling the module."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.__dict__["original"] = original

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("original")
            if original is None:
                raise
            return getattr(original, name)


class FastLinear(StandIn):
    """Stands in for a frozen nn.Linear or GPT-2 Conv1D of the target while a Decomposition runs
    it: the same function through oneDNN where it applies, else the original's own forward."""

    def __init__(self, original: nn.Module):
        super().__init__(original)
        self.conv1d = not isinstance(original, nn.Linear)

    def forward(self, x: Tensor) -> Tensor:
        m = self.original
        return original_output(m, x, m.weight if self.conv1d else m.weight.t(), True)


def is_plain_linear(m: nn.Module) -> bool:
    """An nn.Linear (or a subclass keeping its forward) or a Hugging Face GPT-2 Conv1D."""
    if isinstance(m, nn.Linear):
        return type(m).forward is nn.Linear.forward
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "weight")


def slot(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(parent module, child name) of the module at path `name` of `model`."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


# (parent, child name, original module, replacement): a module to swap in place while a pass runs.
Swap = tuple[nn.Module, str, nn.Module, nn.Module]


def fast_equivalents(model: nn.Module, skip: set[str]) -> list[Swap]:
    """A FastLinear swap for every plain nn.Linear and GPT-2 Conv1D of `model` not in `skip` (a
    subclass with its own forward is left alone)."""
    return [(*slot(model, n), m, FastLinear(m)) for n, m in model.named_modules() if n and n not in skip and is_plain_linear(m)]


def swap_in_place(swaps: list[Swap]) -> list[tuple[nn.Module, str, nn.Module]]:
    """Put each replacement in its original's place, but only where the original itself is there
    and has no hooks: a module someone has wrapped (e.g. an output head computed at chosen
    positions only) or hooked (e.g. an analysis zeroing its output) keeps what it has. Returns
    (parent, child, original) for tspd.decomposition.restore_modules."""
    swapped = []
    for parent, child, m, replacement in swaps:
        if parent._modules.get(child) is m and untouched(m):
            parent._modules[child] = replacement
            swapped.append((parent, child, m))
    return swapped


def _clearly_faster(routes: Callable[[], tuple[Callable[[], Any], Callable[[], Any]]], factor: float) -> bool:
    """Whether the oneDNN route runs >= `factor` x faster than torch's, `routes()` giving (torch's,
    oneDNN's): the two alternated, two warm-up rounds, then the best of 5 each. False where oneDNN
    is missing or refuses, or the inputs cannot be made."""
    if not onednn_available():
        return False
    try:
        torch_route, onednn_route = routes()
        best = {torch_route: float("inf"), onednn_route: float("inf")}
        for i in range(7):
            for f in best:
                s = time.perf_counter()
                f()
                if i >= 2:
                    best[f] = min(best[f], time.perf_counter() - s)
        return best[torch_route] >= factor * best[onednn_route]
    except RuntimeError:
        return False


@functools.lru_cache(maxsize=1)
def onednn_fp32_is_faster() -> bool:
    """Whether oneDNN's fp32 products are clearly (>= 1.3x) faster than torch's own on this CPU for
    what a step does with a linear layer -- the forward product and the weight gradient -- measured
    once per process on a (1024 x 256) -> 1024 layer (0.1-0.2 s in all). The 2-core AMD EPYC (Zen 5,
    AVX-512) measured ~430 vs ~200 GFLOP/s forward; a 2-core AMD EPYC (Zen 3, AVX2 only) about equal
    forward and oneDNN's weight gradient half as fast (with its input conversions), so torch's path
    there; Intel CPUs, where MKL runs its AVX-512 kernels, are expected to show no gap either."""

    def routes():
        gen = torch.Generator().manual_seed(0)  # not the global RNG a run has just seeded
        x, w = torch.randn(1024, 256, generator=gen), torch.randn(256, 1024, generator=gen)
        g = torch.randn(1024, 1024, generator=gen)
        wt = w.t().contiguous()

        def torch_route() -> None:
            x @ w
            x.t() @ g

        def onednn_route() -> None:
            linear_pointwise(x, wt, None)
            _weight_grad(x, g)

        return torch_route, onednn_route

    return _clearly_faster(routes, 1.3)


@functools.lru_cache(maxsize=8)
def onednn_head_is_faster(rows: int, d_in: int, d_out: int) -> bool:
    """Whether oneDNN's fp32 product is faster (>= 1.15x) than torch's own for a fused output
    head's chunk, (rows x d_in) . (d_in x d_out) -- few rows times a wide head, a shape the layer
    test of `onednn_fp32_is_faster` does not cover -- measured once per shape on at most 512 rows
    and 8192 of the head's outputs (~0.1-0.3 s at d_in 576). A 2-core AMD EPYC Zen 3 (AVX2), whose layer test picks torch,
    ran (170 x 576) . (576 x 8192) at 113 vs 73 GFLOP/s through oneDNN in one test, 1.3-1.4x in
    others (the head's input-gradient product: 114 vs 107). The bar is lower than the layers' 1.3x:
    a head has no weight gradient, the product oneDNN ran at half speed there."""

    def routes():
        gen = torch.Generator().manual_seed(0)  # not the global RNG a run has just seeded
        x, w = torch.randn(min(rows, 512), d_in, generator=gen), torch.randn(min(d_out, 8192), d_in, generator=gen)
        return (lambda: F.linear(x, w)), (lambda: linear_pointwise(x, w, None))

    return _clearly_faster(routes, 1.15)


def use_onednn(setting: str) -> bool:
    """Resolve `train.fp32_matmul`: 'onednn' (where available), 'torch', or 'auto' (measured)."""
    if setting == "torch":
        return False
    if setting == "onednn":
        return onednn_available()
    return onednn_fp32_is_faster()
