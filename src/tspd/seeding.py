"""Deterministic per-step random streams: a run is reproducible, and resumable, from (seed, step).

Each stream is a torch.Generator seeded from integers (seed, step, a stream id, a rank ...) by
`stream_seed`, which mixes them with splitmix64's finaliser after every part and folds the 64 bits
into the 32 that torch's CPU generator uses (its Mersenne Twister reads only the seed's low 32 bits):
streams of different seeds, steps or ids are unrelated.

Until 2026-12-03 the parts were combined boost-style (`h ^= p + K + (h << 6) + (h >> 2)`), which
collides structurally: (seed 0, step s + 64) and (seed 1, step s) gave the same stream for ~99 % of
steps, so seed replicates saw nearly the same batches and mask noise shifted in time, and a run
met some of its own streams twice. Results recorded before then used that mixer; the environment
variable TSPD_LEGACY_STREAMS=1 brings it back to reproduce them, and a checkpoint records its
run's mixer so a resume keeps it (`use_legacy_streams`).
"""

from __future__ import annotations

import os

import torch

_M64 = 0xFFFFFFFFFFFFFFFF
_legacy: bool | None = None  # None: from the environment (TSPD_LEGACY_STREAMS)


def legacy_streams() -> bool:
    """Whether streams are seeded by the pre-2026-12-03 mixer (see the module docstring)."""
    if _legacy is not None:
        return _legacy
    return os.environ.get("TSPD_LEGACY_STREAMS", "0").strip().lower() in ("1", "true", "yes", "on")


def use_legacy_streams(on: bool | None) -> None:
    """Pin the mixer for this process (a resumed run takes its checkpoint's); None: back to the environment."""
    global _legacy
    _legacy = on


def _splitmix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def stream_seed(*parts: int) -> int:
    """A seed mixed from integers (seed, step, rank, stream id ...), below 2**32 (all torch's CPU
    generator reads); 63 bits from the legacy mixer."""
    if legacy_streams():
        h = 0x9E3779B97F4A7C15
        for p in parts:
            h ^= (p & _M64) + 0x9E3779B97F4A7C15 + ((h << 6) & _M64) + (h >> 2)
            h &= _M64
        return h & 0x7FFFFFFFFFFFFFFF
    h = _splitmix(len(parts))
    for p in parts:
        h = _splitmix(h ^ (p & _M64))
    return (h ^ (h >> 32)) & 0xFFFFFFFF


def generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(*parts))
