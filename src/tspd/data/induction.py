"""Induction sequences `[BOS] t t ... S M t t ... S` (SPEC §6.1): predict M at the last position."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tspd.seeding import generator

ROLES = ("first_s", "m", "final_s", "other")


@dataclass(frozen=True)
class InductionTask:
    """Token ids: 0..n_tokens-1 ordinary, n_tokens = BOS, n_tokens + 1 = S."""

    n_tokens: int = 128
    seq_len: int = 64

    @property
    def bos(self) -> int:
        return self.n_tokens

    @property
    def special(self) -> int:
        return self.n_tokens + 1

    @property
    def vocab_size(self) -> int:
        return self.n_tokens + 2

    def sample(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """(tokens (n, T), labels (n,), first-S positions (n,)). The first S sits at 1..T-3, so M
        (at first-S + 1) is never the last token; labels are the token M."""
        T = self.seq_len
        if T < 4:
            raise ValueError(f"seq_len must be at least 4 for [BOS] S M S, got {T}")
        tokens = torch.randint(0, self.n_tokens, (n, T), generator=gen)
        tokens[:, 0] = self.bos
        first_s = torch.randint(1, T - 2, (n,), generator=gen)
        rows = torch.arange(n)
        tokens[rows, first_s] = self.special
        tokens[:, -1] = self.special
        labels = tokens[rows, first_s + 1]
        return tokens, labels, first_s

    def roles(self, first_s: Tensor) -> Tensor:
        """Role index per (example, position): 0 first_s, 1 m, 2 final_s, 3 other (ROLES order)."""
        n, T = first_s.shape[0], self.seq_len
        roles = torch.full((n, T), 3, dtype=torch.long)
        rows = torch.arange(n)
        roles[rows, first_s] = 0
        roles[rows, first_s + 1] = 1
        roles[:, -1] = 2
        return roles


class InductionData:
    """`InductionData(task, batch_size, seed)(step)` -> token batch (n, T) for that step."""

    def __init__(self, task: InductionTask, batch_size: int, seed: int = 0):
        self.task, self.batch_size, self.seed = task, batch_size, seed

    def __call__(self, step: int) -> Tensor:
        return self.task.sample(self.batch_size, generator(self.seed, step, 404))[0]
