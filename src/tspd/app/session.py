"""One loaded run as the dashboard sees it: overview, prompt analysis, ablation, subcomponents.
Every method returns plain JSON-ready data and raises AppError (with an HTTP status) for input it
cannot take; the HTTP layer (server.py) only routes.

Example:
    >>> from tspd.app.session import RunSession
    >>> s = RunSession("runs/induction")                                    # doctest: +SKIP
    >>> s.analyse("BOS 7 3 S 42 11 S")["predictions"][-1][0]["label"]       # doctest: +SKIP
    '42'
    >>> s.ablate("BOS 7 3 S 42 11 S", [{"site": "blocks.1.attn.v_proj", "idx": 4}])["divergence"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import torch
from torch import Tensor

from tspd.app.adapters import Adapter, PromptError, adapter_for
from tspd.app.harvest import DB_NAME, fingerprint, per_position, prompt_ci
from tspd.decomposition import load
from tspd.masks import Pass
from tspd.train import METRICS, metric_records

TABLE_FILES = ("census", "causal", "baseline", "facts", "results", "eval")
NOT_SCALARS = {"step", "lr", "p", "l0", "eval"}



def _is_int_text(text: str) -> bool:
    """An optionally negative integer in ASCII digits ('²'.isdigit() is True but int('²') fails)."""
    digits = text[1:] if text.startswith("-") else text
    return digits.isascii() and digits.isdigit()

class AppError(Exception):
    """A request the dashboard cannot serve; `status` is the HTTP status (4xx), the message says why."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _sig(v: float, digits: int = 4) -> float:
    """v to `digits` significant digits: small probabilities and KLs keep their size."""
    return float(f"{v:.{digits}g}")


def _round(values: Tensor, digits: int = 4) -> list[float]:
    return [_sig(v, digits) for v in values.tolist()]


class RunSession:
    """A run folder loaded once (decomposition, target, adapter), serving dashboard queries."""

    def __init__(self, run_dir: str | Path, adapter: Adapter | None = None, name: str | None = None):
        self.run_dir = Path(run_dir)
        self.name = name or self.run_dir.name
        self.dec = load(self.run_dir)
        self.adapter = adapter or adapter_for(self.dec, self.run_dir)
        self.threshold = self.dec.config.eval.active_threshold
        # A pass swaps stand-in modules into the one shared target: passes must not interleave.
        self.lock = threading.Lock()

    # ---- overview ------------------------------------------------------------------------
    def info(self) -> dict:
        a, cfg = self.adapter, self.dec.config
        sites = []
        for s in self.dec.site_names:
            comps = self.dec.component(s)
            sites.append({"name": s, "C": comps.C, "kind": comps.kind, "d_in": comps.d_in, "d_out": comps.d_out,
                          "readout": a.readout(s) is not None})
        return {
            "run": self.name, "path": str(self.run_dir), "target_kind": cfg.target.kind if cfg.target else None,
            "input_kind": a.input_kind, "output_kind": a.output_kind, "context_length": a.context_length,
            "example_prompt": a.example_prompt, "prompt_help": a.prompt_help, "threshold": self.threshold,
            "sites": sites, "config_yaml": cfg.to_yaml(), "harvest": self._harvest_status(),
            "tables": [t for t in TABLE_FILES if (self.run_dir / f"{t}.json").exists()],
        }

    def metrics(self) -> dict:
        """Training curves from metrics.jsonl: scalar loss terms, L0 per site, and the evaluations."""
        train: dict = {"step": [], "lr": [], "p": [], "losses": {}, "l0": {}}
        evals: dict = {"step": [], "alive": {}, "l0": {}, "recon": {}}
        for _, row in metric_records(self.run_dir / METRICS)[0]:  # skips a line a running run is writing
            if "consolidate" in row:  # a merge step's record, not a training row
                continue
            if "eval" in row:
                ev = row["eval"]
                evals["step"].append(row["step"])
                for s, v in ev.get("alive", {}).items():
                    evals["alive"].setdefault(s, []).append(v)
                for s, v in ev.get("l0", {}).items():
                    evals["l0"].setdefault(s, []).append(v)
                for k in ("ci_masked_recon", "stochastic_recon", "ones_recon"):
                    if k in ev:
                        evals["recon"].setdefault(k, []).append(ev[k])
                continue
            n = len(train["step"])
            train["step"].append(row.get("step"))
            train["lr"].append(row.get("lr"))
            train["p"].append(row.get("p"))
            for k, v in row.items():
                if k not in NOT_SCALARS and isinstance(v, (int, float)):
                    train["losses"].setdefault(k, [None] * n).append(v)
            for s, v in row.get("l0", {}).items():
                train["l0"].setdefault(s, [None] * n).append(v)
        return {"train": train, "eval": evals}

    def tables(self) -> dict:
        """The analysis JSON files the run has (census, causal, baseline, facts, results, eval)."""
        out = {}
        for t in TABLE_FILES:
            path = self.run_dir / f"{t}.json"
            if path.exists():
                out[t] = json.loads(path.read_text())
        return out

    # ---- prompt and ablation --------------------------------------------------------------
    def encode(self, prompt) -> Tensor:
        if not isinstance(prompt, str):
            raise AppError(f"'prompt' must be a string, got {type(prompt).__name__}")
        try:
            return self.adapter.encode(prompt)
        except PromptError as err:
            raise AppError(str(err)) from None

    def _outputs(self, out: Tensor) -> Tensor:
        """(positions, n_outputs) of the first example: logits for LMs, values for regression."""
        return per_position(out.float())[0]

    def _top(self, out: Tensor, k: int) -> list[list[dict]]:
        """Top-k outputs per position: probabilities for a distribution, values otherwise."""
        scores = out.softmax(-1) if self.adapter.output_kind == "distribution" else out
        values, ids = scores.topk(min(k, scores.shape[-1]), dim=-1)
        return [
            [{"id": i, "label": self.adapter.output_label(i), "value": _sig(v)} for v, i in zip(vs, js)]
            for vs, js in zip(values.tolist(), ids.tolist())
        ]

    def analyse(self, prompt, top_k: int = 8) -> dict:
        """Tokens, per site the CI (positions x subcomponents active somewhere in the prompt, ordered
        by where they first fire) and the top outputs at every position."""
        batch = self.encode(prompt)
        with self.lock, torch.no_grad():
            out, ci, _ = prompt_ci(self.dec, batch)
        sites = []
        for s, g in ci.items():
            g = g[0]  # (positions, C)
            peak = g.amax(0)
            first = (g > self.threshold).float().argmax(0)
            active = [c for c in range(g.shape[1]) if peak[c] > self.threshold]
            active.sort(key=lambda c: (int(first[c]), -float(peak[c])))
            sites.append({"site": s, "C": g.shape[1], "rows": [{"idx": c, "ci": [round(x, 3) for x in g[:, c].tolist()]} for c in active]})
        return {"tokens": self.adapter.input_labels(batch[0]), "threshold": self.threshold, "sites": sites,
                "predictions": self._top(self._outputs(out), top_k)}

    def sample_prompt(self, seed) -> dict:
        """A dataset example as prompt text (seed: any integer)."""
        if not (isinstance(seed, int) or (isinstance(seed, str) and _is_int_text(seed))) or isinstance(seed, bool):
            raise AppError(f"'seed' must be an integer, got {seed!r}")
        example = self.adapter.example(int(seed))
        return {"prompt": self.adapter.prompt_of(example)}

    def _check_subcomponent(self, site, idx) -> int:
        if not isinstance(site, str) or site not in self.dec.site_names:
            raise AppError(f"unknown site {site!r}; sites are {self.dec.site_names}", 404)
        C = self.dec.component(site).C
        integer = isinstance(idx, int) and not isinstance(idx, bool)
        if not (integer or (isinstance(idx, str) and _is_int_text(idx.strip()))):
            raise AppError(f"subcomponent id {idx!r} is not an integer; {site} has subcomponents 0..{C - 1}")
        c = int(idx)
        if not 0 <= c < C:
            raise AppError(f"unknown subcomponent {site}:{c}; {site} has subcomponents 0..{C - 1}", 404)
        return c

    def _check_positions(self, positions, n: int) -> list[int] | None:
        if positions is None:
            return None
        if not isinstance(positions, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in positions):
            raise AppError(f"'positions' must be a list of integers or null (every position), got {positions!r}")
        bad = [p for p in positions if not -n <= p < n]
        if bad:
            raise AppError(f"positions {bad} are outside the prompt, which has positions 0..{n - 1}")
        return [p % n for p in positions]

    def ablate(self, prompt, ablations, base: str = "ones", top_k: int = 8) -> dict:
        """Re-run the prompt with chosen subcomponents at mask 0 (at chosen positions, or all).

        ablations: [{"site": str, "idx": int, "positions": [int] | null}]. base 'ones' keeps every
        other subcomponent at mask 1 (the decomposed weights), 'ci' at its CI. Returns the top outputs
        before and after at every position and the divergence (KL, or MSE for regression) per position.
        """
        batch = self.encode(prompt)
        if base not in ("ones", "ci"):
            raise AppError(f"'base' must be 'ones' (others at mask 1) or 'ci' (others at their CI), got {base!r}")
        if not isinstance(ablations, list) or not ablations:
            raise AppError("'ablations' must be a non-empty list of {site, idx, positions} objects")
        n = batch.shape[1] if self.adapter.input_kind == "tokens" else 1
        chosen = []
        for a in ablations:
            if not isinstance(a, dict):
                raise AppError(f"each ablation must be an object {{site, idx, positions}}, got {a!r}")
            chosen.append((a.get("site"), self._check_subcomponent(a.get("site"), a.get("idx")),
                           self._check_positions(a.get("positions"), n)))
        with self.lock, torch.no_grad():
            target_out, inputs = self.dec.run_target(batch)
            ci, _ = self.dec.ci_from_logits(self.dec.ci_logits(inputs))
            ref = self.dec.ones_pass(ci)
            if base == "ci":
                ref.masks = {s: g.clone() for s, g in ci.items()}
            masks = {s: m.clone() for s, m in ref.masks.items()}
            for site, c, positions in chosen:
                m = per_position(masks[site])  # a view: writes reach masks[site]
                if positions is None:
                    m[..., c] = 0.0
                else:
                    m[:, positions, c] = 0.0
            before, after = self.dec.run_passes(batch, [ref, Pass(masks=masks, delta=ref.delta)])
        before, after, target = self._outputs(before), self._outputs(after), self._outputs(target_out)
        return {
            "tokens": self.adapter.input_labels(batch[0]), "base": base,
            "ablated": [{"site": s, "idx": c, "positions": p} for s, c, p in chosen],
            "divergence": {"kind": self._divergence_kind(), "per_position": _round(self._divergence(before, after))},
            "target_vs_unablated": _round(self._divergence(target, before)),
            "changes": self._changes(before, after, top_k),
        }

    def _divergence_kind(self) -> str:
        return "kl" if self.adapter.output_kind == "distribution" else "mse"

    def _divergence(self, ref: Tensor, other: Tensor) -> Tensor:
        """Per position: KL(ref || other) over the vocabulary, or the MSE of the values."""
        if self.adapter.output_kind == "distribution":
            lp, lq = ref.log_softmax(-1), other.log_softmax(-1)
            return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)
        return (ref - other).pow(2).mean(-1)

    def _changes(self, before: Tensor, after: Tensor, k: int) -> list[list[dict]]:
        """Per position, the union of the top-k outputs before and after, with both values."""
        dist = self.adapter.output_kind == "distribution"
        b, a = (before.softmax(-1), after.softmax(-1)) if dist else (before, after)
        k = min(k, b.shape[-1])
        out = []
        for pb, pa in zip(b, a):
            ids = list(dict.fromkeys(pb.topk(k).indices.tolist() + pa.topk(k).indices.tolist()))
            ids.sort(key=lambda i: -float(pb[i]))
            out.append([{"id": i, "label": self.adapter.output_label(i), "before": _sig(float(pb[i])),
                         "after": _sig(float(pa[i]))} for i in ids])
        return out

    # ---- subcomponents -------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection | None:
        path = self.run_dir / DB_NAME
        if not path.exists():
            return None
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True)

    def _harvest_status(self) -> dict | None:
        con = self._db()
        if con is None:
            return None
        with con:
            meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
        con.close()
        meta["stale"] = meta.get("fingerprint") != fingerprint(self.run_dir)
        return meta

    def subcomponent_list(self, site) -> dict:
        """Every subcomponent of a site with its harvested frequency and mean CI (most frequent first)."""
        if not isinstance(site, str) or site not in self.dec.site_names:
            raise AppError(f"unknown site {site!r}; sites are {self.dec.site_names}", 404)
        con = self._db()
        if con is None:
            return {"site": site, "harvested": False, "items": [{"idx": c} for c in range(self.dec.component(site).C)]}
        rows = con.execute(
            "SELECT idx, frequency, mean_ci, max_ci FROM subcomponents WHERE site = ? ORDER BY frequency DESC, max_ci DESC",
            (site,)).fetchall()
        con.close()
        return {"site": site, "harvested": True,
                "items": [{"idx": i, "frequency": f, "mean_ci": m, "max_ci": x} for i, f, m, x in rows]}

    def subcomponent(self, site, idx, n_effects: int = 10) -> dict:
        """Norms, harvested statistics and top contexts, and the outputs its U direction raises and
        lowers most (through the adapter's readout; signed by the inner activation when active)."""
        c = self._check_subcomponent(site, idx)
        comps = self.dec.component(site)
        u, v = comps.U[c].detach().float(), comps.V[:, c].detach().float()
        result: dict = {"site": site, "idx": c, "C": comps.C, "norm": float(u.norm() * v.norm()),
                        "u_norm": float(u.norm()), "v_norm": float(v.norm()), "harvest": None, "effects": None}
        sign, sign_known = 1.0, False
        con = self._db()
        if con is not None:
            with con:
                row = con.execute("SELECT frequency, mean_ci, max_ci, inner_sign, hist FROM subcomponents "
                                  "WHERE site = ? AND idx = ?", (site, c)).fetchone()
                ctx = con.execute(
                    "SELECT c.position, c.ci, c.ci_row, e.labels FROM contexts c JOIN examples e ON e.id = c.example "
                    "WHERE c.site = ? AND c.idx = ? ORDER BY c.rank", (site, c)).fetchall()
            con.close()
            if row is not None:
                freq, mean_ci, max_ci, inner_sign, hist = row
                sign, sign_known = (inner_sign, True) if inner_sign != 0 else (1.0, False)
                result["harvest"] = {
                    "frequency": freq, "mean_ci": mean_ci, "max_ci": max_ci, "hist": json.loads(hist),
                    "contexts": [{"position": p, "ci": round(g, 4), "ci_row": json.loads(r), "tokens": json.loads(t)}
                                 for p, g, r, t in ctx],
                }
        readout = self.adapter.readout(site)
        if readout is not None:
            effect = sign * (u @ readout.detach().float())
            k = min(n_effects, effect.shape[0])
            up, down = effect.topk(k), (-effect).topk(k)
            # Only outputs it moves that way: with few outputs (TMS) the two lists would overlap.
            result["effects"] = {
                "sign_from_harvest": sign_known,
                "raises": [{"label": self.adapter.output_label(i), "value": _sig(x)}
                           for x, i in zip(up.values.tolist(), up.indices.tolist()) if x > 0],
                "lowers": [{"label": self.adapter.output_label(i), "value": _sig(-x)}
                           for x, i in zip(down.values.tolist(), down.indices.tolist()) if x > 0],
            }
        return result


class RunRegistry:
    """The runs under one folder (the folder itself when it is a run), loaded on first use."""

    def __init__(self, root: str | Path, adapter: Adapter | None = None):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder; give a tspd run folder (or a folder of runs)")
        self.adapter = adapter
        self.runs = self._discover()
        if not self.runs:
            raise FileNotFoundError(
                f"{root} is not a tspd run folder (no decomposition.safetensors) and holds none; give the --out "
                "folder of `tspd run` or `tspd decompose`"
            )
        self._sessions: dict[str, RunSession] = {}
        self._lock = threading.Lock()

    def _discover(self) -> dict[str, Path]:
        if (self.root / "decomposition.safetensors").exists():
            return {self.root.name: self.root}
        found = sorted(self.root.glob("*/decomposition.safetensors")) + sorted(self.root.glob("*/*/decomposition.safetensors"))
        return {p.parent.relative_to(self.root).as_posix(): p.parent for p in found}

    def names(self) -> list[str]:
        return list(self.runs)

    def get(self, name) -> RunSession:
        if name is not None and not isinstance(name, str):
            raise AppError(f"'run' must be a run folder's name (a string), got {name!r}")
        if name is None:
            if len(self.runs) == 1:
                name = next(iter(self.runs))
            else:
                raise AppError(f"give the run: run=<name>, one of {self.names()}")
        if name not in self.runs:
            self.runs = self._discover()  # a run finished since the server started
        if name not in self.runs:
            raise AppError(f"no run folder {name!r} under {self.root}; runs are {self.names()}", 404)
        with self._lock:
            if name not in self._sessions:
                try:
                    self._sessions[name] = RunSession(self.runs[name], self.adapter, name)
                except Exception as err:  # noqa: BLE001 -- whatever a damaged folder raises (e.g. SafetensorError): a 422, not a 500
                    raise AppError(f"run folder {name!r} could not be loaded: {type(err).__name__}: {err}", 422) from None
            return self._sessions[name]
