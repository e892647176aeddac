"""Sparse feature vectors for toy models of superposition."""

from __future__ import annotations

import torch
from torch import Tensor

from tspd.seeding import generator


def sparse_features(n: int, n_features: int, p: float, gen: torch.Generator) -> Tensor:
    """Each feature present with probability p, value U[0, 1] when present."""
    values = torch.rand(n, n_features, generator=gen)
    present = torch.rand(n, n_features, generator=gen) < p
    return values * present


class TMSData:
    """`TMSData(5, 0.05, 1024)(step)` is the batch of that step; the same (seed, step), the same batch."""

    def __init__(self, n_features: int, feature_probability: float, batch_size: int, seed: int = 0):
        self.n_features, self.p, self.batch_size, self.seed = n_features, feature_probability, batch_size, seed

    def __call__(self, step: int) -> Tensor:
        return sparse_features(self.batch_size, self.n_features, self.p, generator(self.seed, step, 101))
