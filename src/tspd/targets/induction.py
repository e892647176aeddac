"""The toy induction-head transformer of SPEC §6.1.

2 layers, 1 head each, d_model 16, attention only (no MLP, no LayerNorm). Positions enter the
queries and keys only, Shortformer style (position-infused attention, Press et al. 2021): each layer
has a learned position embedding P added to the *inputs* of the query and key projections,
q_n = q_proj(x_n + P[n]), k_n = k_proj(x_n + P[n]), v_n = v_proj(x_n). The residual stream carries
token information alone; the Q and K weights therefore process the positional signal, which is why
the paper finds Q0 active at M (the previous-token query).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    def __init__(self, d_model: int, seq_len: int):
        super().__init__()
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.pos = nn.Parameter(torch.randn(seq_len, d_model) * 0.1)
        self.last_pattern: Tensor | None = None
        self.record_pattern = False

    def forward(self, x: Tensor) -> Tensor:
        T = x.shape[1]
        xp = x + self.pos[:T]
        q = self.q_proj(xp)
        k = self.k_proj(xp)
        v = self.v_proj(x)
        # Scores, causal mask and scale in one baddbmm. At this model's shapes (head dim 16, 64
        # positions) this beats torch's fused scaled_dot_product_attention on CPU: an SPD step of
        # the induction-shared-64 benchmark 52.8 vs 58.6 ms (benchmarks/ab.sh, 3 of 3 pairs).
        causal = torch.full((T, T), float("-inf"), dtype=q.dtype, device=x.device).triu_(1)
        scores = torch.baddbmm(causal, q, k.transpose(-1, -2), alpha=1 / math.sqrt(q.shape[-1]))
        pattern = scores.softmax(-1, dtype=torch.float32).to(v.dtype)  # in fp32 under autocast too, as SDPA
        if self.record_pattern:
            self.last_pattern = pattern.detach()
        return self.o_proj(pattern @ v)


class Block(nn.Module):
    def __init__(self, d_model: int, seq_len: int):
        super().__init__()
        self.attn = Attention(d_model, seq_len)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.attn(x)


class InductionTransformer(nn.Module):
    """Tokens (batch, T) -> logits (batch, T, vocab). Sites: `blocks.{0,1}.attn.{q,k,v,o}_proj`."""

    def __init__(self, vocab_size: int = 130, d_model: int = 16, n_layers: int = 2, seq_len: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, seq_len) for _ in range(n_layers))
        self.unembed = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.unembed(x)

    def get_output_embeddings(self) -> nn.Linear:
        """The unembedding, as Hugging Face models name their output head."""
        return self.unembed

    def attention_patterns(self, tokens: Tensor) -> list[Tensor]:
        """Each layer's attention pattern (batch, T, T) on `tokens`."""
        for b in self.blocks:
            b.attn.record_pattern = True
        try:
            with torch.no_grad():
                self(tokens)
            return [b.attn.last_pattern for b in self.blocks]
        finally:
            for b in self.blocks:
                b.attn.record_pattern = False


def last_position_loss_and_accuracy(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    last = logits[:, -1]
    return F.cross_entropy(last, labels), (last.argmax(-1) == labels).float().mean()


def train_induction(
    task=None,
    d_model: int = 16,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
    warmup_steps: int = 200,
    max_steps: int = 30000,
    target_accuracy: float = 0.99,
    settle_steps: int = 1000,
    eval_every: int = 50,
    eval_size: int = 2000,
    seed: int = 0,
    progress: bool = False,
) -> tuple[InductionTransformer, list[dict]]:
    """Train with AdamW on the last-position loss until held-out last-position accuracy reaches
    `target_accuracy` (checked every `eval_every` steps), then `settle_steps` more steps with the lr
    decaying linearly to zero (capped by `max_steps`). Returns the model and its history (held-out loss and accuracy per evaluation)."""
    from tqdm import tqdm

    from tspd.data.induction import InductionTask
    from tspd.seeding import generator

    task = task or InductionTask()
    torch.manual_seed(seed)
    model = InductionTransformer(task.vocab_size, d_model, 2, task.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    eval_tokens, eval_labels, _ = task.sample(eval_size, generator(seed, 0, 505))
    history: list[dict] = []
    stop_at = max_steps
    bar = tqdm(range(max_steps), disable=not progress, desc="induction target")
    for step in bar:
        if step >= stop_at:
            break
        scale = min(1.0, (step + 1) / max(warmup_steps, 1))
        if stop_at < max_steps:  # settling: linear decay to zero sharpens and stabilises the solution
            scale *= (stop_at - step) / (settle_steps + 1)
        for group in opt.param_groups:
            group["lr"] = lr * scale
        tokens, labels, _ = task.sample(batch_size, generator(seed, step, 506))
        loss, acc = last_position_loss_and_accuracy(model(tokens), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == stop_at:
            with torch.no_grad():
                eval_loss, eval_acc = last_position_loss_and_accuracy(model(eval_tokens), eval_labels)
            history.append({"step": step + 1, "loss": float(eval_loss), "accuracy": float(eval_acc)})
            bar.set_postfix(loss=f"{float(eval_loss):.3f}", acc=f"{float(eval_acc):.3f}")
            if eval_acc >= target_accuracy and stop_at == max_steps:
                stop_at = min(max_steps, step + 1 + settle_steps)
    return model, history


def train_from_config(cfg, progress: bool = False) -> tuple[InductionTransformer, list[dict]]:
    """`train_induction` with the settings of an `InductionTargetConfig`."""
    from tspd.data.induction import InductionTask

    return train_induction(
        InductionTask(cfg.n_tokens, cfg.seq_len), cfg.d_model, cfg.batch_size, cfg.lr, cfg.weight_decay,
        cfg.warmup_steps, cfg.max_steps, cfg.target_accuracy, cfg.settle_steps, seed=cfg.seed, progress=progress,
    )


def phase_change_step(history: list[dict]) -> int | None:
    """The step of the sharpest drop in held-out loss between evaluations (the induction bump)."""
    if len(history) < 2:
        return None
    drops = [(history[i - 1]["loss"] - history[i]["loss"], history[i]["step"]) for i in range(1, len(history))]
    return max(drops)[1]
