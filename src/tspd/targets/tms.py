"""Toy model of superposition: x_hat = ReLU(W^T W x + b), n features in d dimensions (SPEC §7)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tspd.data.tms import sparse_features
from tspd.seeding import generator


class TMSModel(nn.Module):
    """linear1 (n -> d, no bias) and linear2 (d -> n, bias), with linear2.weight = linear1.weight^T."""

    def __init__(self, n_features: int = 5, d_hidden: int = 2):
        super().__init__()
        self.linear1 = nn.Linear(n_features, d_hidden, bias=False)
        self.linear2 = nn.Linear(d_hidden, n_features, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.linear2(self.linear1(x)))


def train_tms(
    n_features: int,
    d_hidden: int,
    feature_probability: float,
    steps: int = 5000,
    batch_size: int = 1024,
    lr: float = 5e-3,
    seed: int = 0,
) -> TMSModel:
    """Train a tied-weight TMS model with uniform feature importance (MSE) and return it."""
    gen = generator(seed, 0, 7)
    W = nn.Parameter(torch.randn(d_hidden, n_features, generator=gen) * (2 / (n_features + d_hidden)) ** 0.5)
    b = nn.Parameter(torch.zeros(n_features))
    opt = torch.optim.AdamW([W, b], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    for step in range(steps):
        x = sparse_features(batch_size, n_features, feature_probability, generator(seed, step, 11))
        loss = (torch.relu(x @ W.T @ W + b) - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model = TMSModel(n_features, d_hidden)
    with torch.no_grad():
        model.linear1.weight.copy_(W)
        model.linear2.weight.copy_(W.T)
        model.linear2.bias.copy_(b)
    return model
