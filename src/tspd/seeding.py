"""Deterministic per-step random streams: a run is reproducible, and resumable, from (seed, step)."""

from __future__ import annotations

import torch


def stream_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (seed, step, rank, stream id ...)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (p & 0xFFFFFFFFFFFFFFFF) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)
        h &= 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(*parts))
