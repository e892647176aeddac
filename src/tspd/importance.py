"""Causal-importance functions (SPEC §3) and the two leaky hard sigmoids.

Every CI function maps a site's input to pre-sigmoid logits z of shape (..., C):
- mlp:        per-subcomponent MLP 1 -> hidden -> 1 on the inner activation h_c = v_c . x
- vector_mlp: per-subcomponent MLP d_in -> hidden -> 1 on x, batched over C
- shared_mlp: one MLP d_in -> hidden... -> C on x
- attention:  sequence-aware; one causal attention layer over the site's input sequence, then a
              per-subcomponent (or shared) MLP on concat(a_n, x_n + p_n)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tspd.config import CIConfig
from tspd.fastlinear import linear_layer, linear_pointwise


# Both sigmoids are autograd Functions built from clamp and hardtanh_backward: vectorised kernels
# that run ~10x faster on CPU than the equivalent torch.where chains on (batch, positions, C) tensors.
def _grad_where(grad: Tensor, z: Tensor, lo: float, hi: float, lo_closed: bool, hi_closed: bool) -> Tensor:
    """grad where z is in the interval lo..hi (closed ends as asked), else 0. hardtanh_backward
    passes on the open interval; a closed end moves out by the smallest step of z's dtype."""
    info = torch.finfo(z.dtype)
    step = info.tiny * info.eps  # the smallest subnormal: the step next to 0

    def out(v: float, closed: bool, up: bool) -> float:
        if not closed or math.isinf(v):
            return v
        delta = step if v == 0 else abs(v) * info.eps
        return v + delta if up else v - delta

    return torch.ops.aten.hardtanh_backward(grad, z, out(lo, lo_closed, False), out(hi, hi_closed, True))


class _LowerLeakyHardSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, leak: float) -> Tensor:
        ctx.save_for_backward(z)
        ctx.leak = leak
        return z.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (z,) = ctx.saved_tensors
        # 0 < z <= 1: unchanged. z <= 0: leak * grad only when descent would raise z (grad < 0), so
        # reconstruction can revive a dead subcomponent but sparsity cannot push it further down.
        # z > 1: zero, as for a hard sigmoid.
        inside = _grad_where(grad, z, 0.0, 1.0, lo_closed=False, hi_closed=True)
        revive = _grad_where(grad.clamp(max=0.0), z, -math.inf, 0.0, lo_closed=False, hi_closed=True)
        return inside.add_(revive, alpha=ctx.leak), None


class _UpperLeakyHardSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, leak: float) -> Tensor:
        ctx.save_for_backward(z)
        ctx.leak = leak
        return z.clamp(0.0, 1.0).add_((z - 1.0).clamp_(min=0.0), alpha=leak)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (z,) = ctx.saved_tensors
        inside = _grad_where(grad, z, 0.0, 1.0, lo_closed=True, hi_closed=True)
        above = _grad_where(grad, z, 1.0, math.inf, lo_closed=False, hi_closed=False)
        return inside.add_(above, alpha=ctx.leak), None


def lower_leaky_hard_sigmoid_grad(grad: Tensor, z: Tensor, leak: float) -> Tensor:
    """_LowerLeakyHardSigmoid's backward as plain elementwise ops (for torch.compile to fuse):
    grad on 0 < z <= 1, leak * min(grad, 0) on z <= 0, 0 above 1."""
    return torch.where((z > 0) & (z <= 1), grad, torch.where(z <= 0, leak * grad.clamp(max=0.0), 0.0))


def upper_leaky_hard_sigmoid_grad(grad: Tensor, z: Tensor, leak: float) -> Tensor:
    """_UpperLeakyHardSigmoid's backward as plain elementwise ops: grad on 0 <= z <= 1, leak *
    grad above 1, 0 below 0."""
    return torch.where((z >= 0) & (z <= 1), grad, torch.where(z > 1, leak * grad, 0.0))


def lower_leaky_hard_sigmoid(z: Tensor, leak: float = 0.01) -> Tensor:
    """Forward clamp(z, 0, 1); custom backward (SPEC §3). Used for masks and reconstruction."""
    return _LowerLeakyHardSigmoid.apply(z, leak)


def upper_leaky_hard_sigmoid(z: Tensor, leak: float = 0.01) -> Tensor:
    """0 below 0, identity on [0, 1], 1 + leak (z - 1) above 1. Used for the minimality penalty."""
    return _UpperLeakyHardSigmoid.apply(z, leak)


class _PerComponentMLPFn(torch.autograd.Function):
    """z[n, c] = w2[c] . gelu(x[n] @ w1[:, c] + b1[c]) + b2[c], over chunks of `chunk` rows.

    The hidden activations (rows x C x hidden) are the largest tensors of a vector_mlp step, and
    eager elementwise ops over them are bound by memory traffic. Here every op runs on one chunk of
    rows small enough to stay in the CPU's cache. With `keep` each chunk's pre-activations and GELU
    outputs stay for the backward (2 x rows x C x hidden values until then); without it only x is
    saved and the backward recomputes them chunk by chunk (one more small matmul and GELU each).

    Measured and not kept (2026-12-02): GELU, the product with w2 and the sum as one C loop on
    torch's OpenMP threads (and the backward likewise), GELU from one exp: the induction recipe's
    step 111.9 vs 115.8 ms, induction-vector-64 187.6 vs 206.2 ms, but other numbers (GELU to 1e-7,
    another summation order); torch.compile of the chain ran slower than these eager ops."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, chunk: int, onednn: bool, keep: bool = False) -> Tensor:
        rows = x.shape[0]
        autocast = torch.is_autocast_enabled(x.device.type)
        # x w1 + b1 through oneDNN (tspd.fastlinear) where on: 39 vs 51 us per 160-row chunk here.
        onednn = onednn and not autocast and x.dtype == w1.dtype == torch.float32 and x.device.type == "cpu"
        w1t = w1.t() if onednn else None
        out = torch.empty(rows, w2.shape[0], dtype=torch.promote_types(x.dtype, w2.dtype), device=x.device)
        dt = x.dtype
        # keep: the pre-activations and GELU outputs stay for the backward (which then recomputes
        # neither), where the caller judged them small enough.
        kept: list[tuple[Tensor, Tensor]] = []
        for i in range(0, rows, chunk):
            xc = x[i : i + chunk]
            if autocast:  # bf16 matmul (the backward recomputes in the same dtype), bias and GELU in fp32
                mm = xc @ w1
                dt = mm.dtype
                pre = mm + b1
            elif onednn:
                pre = linear_pointwise(xc, w1t, b1)
            else:  # the bias added inside the matmul
                pre = torch.addmm(b1, xc, w1)
            hid = F.gelu(pre).unflatten(-1, w2.shape)
            if keep:
                kept.append((pre, hid))
                torch.sum(hid * w2, -1, out=out[i : i + chunk])
            else:
                torch.sum(hid.mul_(w2), -1, out=out[i : i + chunk])  # no second (chunk, C, hidden) tensor
        ctx.mm_dtype, ctx.chunk, ctx.onednn, ctx.kept = dt, chunk, onednn, kept
        ctx.save_for_backward(x, w1, b1, w2)
        return out.add_(b2)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w1, b1, w2 = ctx.saved_tensors
        dt, chunk, kept = ctx.mm_dtype, ctx.chunk, ctx.kept
        ctx.kept = []
        w1c = w1.to(dt)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        # w1's gradient is summed over chunks transposed (grad_pre^T x runs faster than x^T grad_pre
        # at these shapes) and in w1's dtype, not bf16.
        grad_w1t = torch.zeros_like(w1.T)
        grad_b1 = torch.zeros_like(b1)
        grad_w2 = torch.zeros_like(w2)
        grad = grad.to(w2.dtype)
        w1t = w1.t() if ctx.onednn else None
        for k, i in enumerate(range(0, x.shape[0], chunk)):
            xc, gc = x[i : i + chunk], grad[i : i + chunk].unsqueeze(-1)
            if kept:
                pre, hid = kept[k]
                grad_w2.add_((hid * gc).sum(0))
            else:
                if ctx.onednn:
                    pre = linear_pointwise(xc, w1t, b1)
                else:
                    pre = torch.addmm(b1, xc, w1) if dt == w1.dtype else xc.to(dt) @ w1c + b1
                grad_w2.add_(F.gelu(pre).unflatten(-1, w2.shape).mul_(gc).sum(0))
            grad_pre = torch.ops.aten.gelu_backward((gc * w2).flatten(-2), pre)
            if dt == w1.dtype:
                grad_w1t.addmm_(grad_pre.T, xc)
            else:
                grad_w1t.add_(grad_pre.to(dt).T @ xc.to(dt))
            grad_b1.add_(grad_pre.sum(0))
            if grad_x is not None:
                grad_x[i : i + chunk] = grad_pre.to(dt) @ w1c.T
        return grad_x, grad_w1t.T.contiguous(), grad_b1, grad_w2, grad.sum(0), None, None, None


class PerComponentMLP(nn.Module):
    """C independent MLPs d_in -> hidden -> 1 (GELU), evaluated with one matmul per chunk of rows."""

    def __init__(self, d_in: int, C: int, hidden: int):
        super().__init__()
        self.C, self.hidden = C, hidden
        self.w1 = nn.Parameter(torch.randn(d_in, C * hidden) / math.sqrt(d_in))
        self.b1 = nn.Parameter(torch.zeros(C * hidden))
        self.w2 = nn.Parameter(torch.randn(C, hidden) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.zeros(C))
        self.onednn = False  # fp32 products through tspd.fastlinear (set by the Decomposition)

    # The hidden activations are computed this many bytes (in fp32) of rows at a time. Measured on
    # induction-vector-64, steps of each size alternated in one process: 0.5 / 1 / 2 MB -> 141 / 130
    # / 127 ms (median); in a slower run 2 / 3 / 4 / 8 MB -> 131 / 131 / 137 / 147 ms (25th pct).
    CHUNK_BYTES = 2 * 2**20

    # The backward reuses the forward's pre-activations and GELU outputs (instead of recomputing
    # both) while they take at most this many bytes per call, i.e. per site and step (the recipe's
    # 6 sites: 16.8 MB each).
    KEEP_BYTES = 32 * 2**20

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        chunk = max(1, self.CHUNK_BYTES // (self.C * self.hidden * 4))
        rows = x.numel() // x.shape[-1]
        size = torch.promote_types(x.dtype, self.w1.dtype).itemsize
        keep = torch.is_grad_enabled() and 2 * rows * self.C * self.hidden * size <= self.KEEP_BYTES
        z = _PerComponentMLPFn.apply(x.reshape(-1, x.shape[-1]), self.w1, self.b1, self.w2, self.b2, chunk, self.onednn, keep)
        return z.reshape(*lead, self.C)


class ScalarMLP(nn.Module):
    """C independent MLPs 1 -> hidden -> 1 (GELU), one per inner activation h_c."""

    def __init__(self, C: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(C, hidden))
        self.b1 = nn.Parameter(torch.zeros(C, hidden))
        self.w2 = nn.Parameter(torch.randn(C, hidden) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.zeros(C))

    def forward(self, h: Tensor) -> Tensor:
        hid = F.gelu(h.unsqueeze(-1) * self.w1 + self.b1)
        return (hid * self.w2).sum(-1) + self.b2


class SharedMLP(nn.Module):
    """One MLP d_in -> hidden... -> C (GELU between layers)."""

    def __init__(self, d_in: int, C: int, hidden: list[int]):
        super().__init__()
        dims = [d_in, *hidden, C]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.onednn = False  # fp32 products through tspd.fastlinear (set by the Decomposition)

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = linear_layer(layer, x, self.onednn)
            if i < len(self.layers) - 1:
                x = F.gelu(x)
        return x


class AttentionCI(nn.Module):
    """Sequence-aware CI: one causal attention head over the site's input sequence (SPEC §3).

        q_n = Wq x_n, k_j = Wk x_j, v_j = Wv (x_j + p_j)
        a_n = sum_{j<=n} softmax_j(q_n.k_j / sqrt(d) + rho[n-j]) v_j
        z_n = head(concat(a_n, x_n + p_n))
    """

    def __init__(self, d_in: int, C: int, hidden: int, d_attn: int, max_len: int, pos_emb: bool, head: str):
        super().__init__()
        self.d_attn, self.max_len = d_attn, max_len
        self.q = nn.Linear(d_in, d_attn, bias=False)
        self.k = nn.Linear(d_in, d_attn, bias=False)
        self.v = nn.Linear(d_in, d_attn, bias=False)
        self.rel_bias = nn.Parameter(torch.zeros(max_len))
        self.pos = nn.Parameter(torch.zeros(max_len, d_in)) if pos_emb else None
        d_head_in = d_attn + d_in
        self.head = PerComponentMLP(d_head_in, C, hidden) if head == "vector_mlp" else SharedMLP(d_head_in, C, [hidden])
        self.onednn = False  # fp32 products through tspd.fastlinear (set by the Decomposition)

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """`keep`: (batch, positions) bool, the real positions; padded ones are not attended to
        (each position still attends to itself, so a padded query has something to attend to)."""
        if x.dim() != 3:
            raise ValueError(
                f"the attention CI needs site inputs of shape (batch, positions, d); got {tuple(x.shape)}. "
                "Use ci.kind=mlp, vector_mlp or shared_mlp for inputs without positions."
            )
        T = x.shape[1]
        if T > self.max_len:
            raise ValueError(f"sequence length {T} exceeds ci.attention.max_len={self.max_len}; raise it in the config")
        padded = keep is not None and tuple(keep.shape) == tuple(x.shape[:2])
        if self.pos is None:
            xp = x
        elif padded:  # each token's position among the real ones (left padding shifts the columns)
            xp = x + self.pos[(keep.long().cumsum(1) - 1).clamp(min=0)]
        else:
            xp = x + self.pos[:T]
        q, k, v = (linear_layer(m, i, self.onednn) for m, i in ((self.q, x), (self.k, x), (self.v, xp)))
        n = torch.arange(T, device=x.device)
        offset = n[:, None] - n[None, :]
        bias = self.rel_bias[offset.clamp(min=0)].masked_fill(offset < 0, float("-inf"))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.d_attn) + bias.to(q.dtype)
        if padded:
            hide = ~keep[:, None, :] & (offset != 0)  # (batch, query, key): padded keys, but never the query itself
            scores = scores.masked_fill(hide, float("-inf"))
        attended = scores.softmax(-1) @ v
        return self.head(torch.cat([attended, xp], dim=-1))


class CIFunction(nn.Module):
    """The CI function of one site: site input (or, for 'mlp', inner activations) -> logits (..., C)."""

    def __init__(self, cfg: CIConfig, d_in: int, C: int):
        super().__init__()
        self.kind = cfg.kind
        hidden = cfg.hidden[0] if cfg.hidden else 16
        if cfg.kind == "mlp":
            self.net: nn.Module = ScalarMLP(C, hidden)
        elif cfg.kind == "vector_mlp":
            self.net = PerComponentMLP(d_in, C, hidden)
        elif cfg.kind == "shared_mlp":
            self.net = SharedMLP(d_in, C, cfg.hidden)
        else:
            a = cfg.attention
            self.net = AttentionCI(d_in, C, hidden, a.d_attn, a.max_len, a.pos_emb, a.head)

    @property
    def uses_inner(self) -> bool:
        return self.kind == "mlp"

    def output_bias(self) -> Tensor:
        """The (C,) bias added last to the logits: lowering entry c switches subcomponent c off."""
        net = self.net.head if isinstance(self.net, AttentionCI) else self.net
        return net.layers[-1].bias if isinstance(net, SharedMLP) else net.b2

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """`keep`: the batch's real positions, for the attention CI (the others are per position)."""
        return self.net(x, keep) if isinstance(self.net, AttentionCI) else self.net(x)
