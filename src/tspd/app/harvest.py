"""`tspd harvest`: precompute what the subcomponent view needs over a dataset sample (firing
frequency, CI histogram, top-activating contexts, sign of the inner activation when active) into
`dashboard.sqlite` in the run folder, which the server reads.

Example:
    >>> from tspd.app.harvest import harvest
    >>> summary = harvest("runs/induction")             # doctest: +SKIP
    >>> summary["seconds"] < 120                       # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path

import torch
from torch import Tensor

from tspd.app.adapters import Adapter, adapter_for
from tspd.config import ConfigError
from tspd.decomposition import Decomposition, atomic_write_bytes, load, run_folder_lock

DB_NAME = "dashboard.sqlite"
SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE examples(id INTEGER PRIMARY KEY, labels TEXT NOT NULL);
CREATE TABLE subcomponents(
    site TEXT NOT NULL, idx INTEGER NOT NULL, frequency REAL NOT NULL, mean_ci REAL NOT NULL,
    max_ci REAL NOT NULL, inner_sign REAL NOT NULL, hist TEXT NOT NULL, PRIMARY KEY(site, idx));
CREATE TABLE contexts(
    site TEXT NOT NULL, idx INTEGER NOT NULL, rank INTEGER NOT NULL, example INTEGER NOT NULL,
    position INTEGER NOT NULL, ci REAL NOT NULL, ci_row TEXT NOT NULL, PRIMARY KEY(site, idx, rank));
"""


def fingerprint(run_dir: Path) -> str:
    """A hash of the decomposition file's bytes: a harvest made before a re-run is stale, while a
    copy of the run (`cp -r`: new times, same bytes) keeps its harvest. sha256 reads about 0.75 GB/s
    on one core (a 2-core CPU machine, 2026), about what loading the file costs anyway; it is taken
    when a harvest is written and when a run is loaded, never per request."""
    with open(Path(run_dir) / "decomposition.safetensors", "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def per_position(t: Tensor) -> Tensor:
    """(batch, C) -> (batch, 1, C): a model without positions reads as one position."""
    return t.unsqueeze(1) if t.dim() == 2 else t


@torch.no_grad()
def prompt_ci(dec: Decomposition, batch: Tensor) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """The target's output, each site's CI (batch, positions, C) and inner activations (same shape)."""
    out, inputs = dec.run_target(batch)
    ci, _ = dec.ci_from_logits(dec.ci_logits(inputs))
    inner = {s: per_position(dec.component(s).inner(inputs[s]).float()) for s in dec.site_names}
    return out, {s: per_position(g) for s, g in ci.items()}, inner


class _SiteStats:
    """Running statistics of one site's CI over the sample."""

    def __init__(self, C: int, bins: int, top_k: int):
        self.C, self.bins, self.top_k = C, bins, top_k
        self.n_tokens = 0
        self.active = torch.zeros(C, dtype=torch.float64)
        self.ci_sum = torch.zeros(C, dtype=torch.float64)
        self.ci_max = torch.zeros(C)
        self.inner_active = torch.zeros(C, dtype=torch.float64)
        self.hist = torch.zeros(C * bins, dtype=torch.float64)
        self.top_ci = torch.empty(0, C)
        self.top_token = torch.empty(0, C, dtype=torch.long)  # flat index example * positions + position

    def add(self, ci: Tensor, inner: Tensor, first_token: int, threshold: float) -> None:
        flat, h = ci.flatten(0, 1), inner.flatten(0, 1)  # (tokens, C)
        active = flat > threshold
        self.n_tokens += flat.shape[0]
        self.active += active.sum(0)
        self.ci_sum += flat.sum(0, dtype=torch.float64)
        self.ci_max = torch.maximum(self.ci_max, flat.amax(0))
        self.inner_active += (h * active).sum(0, dtype=torch.float64)
        bin_of = (flat * self.bins).long().clamp(0, self.bins - 1) + torch.arange(self.C) * self.bins
        self.hist.index_add_(0, bin_of.flatten(), torch.ones(bin_of.numel(), dtype=torch.float64))
        k = min(self.top_k, flat.shape[0])
        values, where = flat.topk(k, dim=0)
        self.top_ci = torch.cat([self.top_ci, values])
        self.top_token = torch.cat([self.top_token, where + first_token])
        k = min(self.top_k, self.top_ci.shape[0])
        self.top_ci, keep = self.top_ci.topk(k, dim=0)
        self.top_token = self.top_token.gather(0, keep)


@torch.no_grad()
def harvest(
    run_dir: str | Path,
    adapter: Adapter | None = None,
    n_examples: int | None = None,
    top_k: int = 20,
    batch_size: int = 256,
    bins: int = 20,
    dec: Decomposition | None = None,
) -> dict:
    """Run the decomposition's CI over `n_examples` dataset examples (default: the adapter's) and
    write `dashboard.sqlite` atomically. Returns a summary with the wall time."""
    t0 = time.time()
    run_dir = Path(run_dir)
    made_from = fingerprint(run_dir) if (run_dir / "decomposition.safetensors").exists() else None
    if dec is None:
        try:
            dec = load(run_dir)
        except (OSError, ValueError, RuntimeError):  # (ConfigError is a ValueError) `tspd` reports these as user errors
            raise
        except Exception as err:  # noqa: BLE001 -- e.g. a SafetensorError (a file cut short): a user error, as in `tspd serve`
            raise ConfigError(f"run folder {str(run_dir)!r} could not be loaded: {type(err).__name__}: {err}") from None
    adapter = adapter or adapter_for(dec, run_dir)
    if n_examples is not None and n_examples < 1:
        raise ValueError(f"n_examples must be at least 1, got {n_examples} (None: the target kind's default)")
    n = n_examples if n_examples is not None else adapter.harvest_examples
    data = adapter.sample(n, dec.config.seed)
    threshold = dec.config.eval.active_threshold
    stats = {s: _SiteStats(dec.component(s).C, bins, top_k) for s in dec.site_names}
    positions = 1
    for start in range(0, n, batch_size):
        _, ci, inner = prompt_ci(dec, data[start : start + batch_size])
        for s, g in ci.items():
            positions = g.shape[1]
            stats[s].add(g, inner[s], start * positions, threshold)

    # The CI rows of the top contexts: a second pass over just the examples they come from.
    tokens = torch.cat([st.top_token[st.top_ci > 0] for st in stats.values()])
    examples = sorted(set((tokens // positions).tolist()))
    rows: dict[str, dict[int, Tensor]] = {s: {} for s in stats}
    for i in range(0, len(examples), batch_size):
        ids = examples[i : i + batch_size]
        _, ci, _ = prompt_ci(dec, data[ids])
        for s, g in ci.items():
            for j, e in enumerate(ids):
                rows[s][e] = g[j]

    path = run_dir / DB_NAME

    def build(tmp: str) -> None:
        con = sqlite3.connect(tmp)
        try:
            con.executescript(SCHEMA)
            meta = {
                "schema": SCHEMA_VERSION, "fingerprint": made_from, "n_examples": n, "positions": positions,
                "threshold": threshold, "bins": bins, "top_k": top_k, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
            con.executemany("INSERT INTO examples VALUES (?, ?)", [(e, json.dumps(adapter.input_labels(data[e]))) for e in examples])
            for s, st in stats.items():
                hist = st.hist.view(st.C, bins)
                freq = st.active / st.n_tokens
                sign = torch.sign(st.inner_active)
                con.executemany(
                    "INSERT INTO subcomponents VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(s, c, float(freq[c]), float(st.ci_sum[c] / st.n_tokens), float(st.ci_max[c]), float(sign[c]),
                      json.dumps([int(x) for x in hist[c]])) for c in range(st.C)],
                )
                ctx = []
                for c in range(st.C):
                    for rank, (v, t) in enumerate(zip(st.top_ci[:, c].tolist(), st.top_token[:, c].tolist())):
                        if v > 0:
                            e, p = divmod(t, positions)
                            row = [round(x, 3) for x in rows[s][e][:, c].tolist()]
                            ctx.append((s, c, rank, e, p, v, json.dumps(row)))
                con.executemany("INSERT INTO contexts VALUES (?, ?, ?, ?, ?, ?, ?)", ctx)
            con.commit()
        finally:
            con.close()

    # A unique temporary name, renamed into place: a failed or concurrent harvest never leaves
    # a half-written database where the dashboard reads one. The folder is held meanwhile: a run
    # starting there would move this harvest aside (or clear its temporary file) under it.
    with run_folder_lock(run_dir):
        atomic_write_bytes(path, build)
    return {"path": str(path), "n_examples": n, "positions": positions, "contexts_examples": len(examples),
            "seconds": round(time.time() - t0, 2)}
