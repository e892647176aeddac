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
import os
import sqlite3
import threading
from pathlib import Path

import torch
from torch import Tensor

from tspd.app.adapters import MAX_INT_DIGITS, Adapter, PromptError, adapter_for, parse_int
from tspd.app.harvest import DB_NAME, fingerprint, per_position, prompt_ci
from tspd.decomposition import load
from tspd.masks import Pass
from tspd.train import METRICS, metric_records

TABLE_FILES = ("census", "causal", "baseline", "facts", "results", "eval")
WRITTEN_BY = {"census": "tspd census", "causal": "tspd causal", "baseline": "tspd baseline", "facts": "tspd facts ablate",
              "results": "tspd eval"}
NOT_SCALARS = {"step", "lr", "p", "l0", "eval"}
# The files tspd.load reads: when one of them changes under a running server, the run is loaded again.
WATCHED_FILES = ("decomposition.safetensors", "config.yaml", "target.safetensors", "target_module.pt",
                 "target_fingerprint.json")


def _show(value, limit: int = 60) -> str:
    """repr(value) for an error message, cut short: a 5000-digit id must not make a 5 kB message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _integer(value) -> int | None:
    """An integer from JSON (int, not bool) or from a query string (ASCII digits, optional '-')."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    return parse_int(value)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _file_keys(run_dir: Path) -> tuple:
    """What tells that a run's files changed, cheaply (one stat per file): inode, size and mtime."""
    keys = []
    for name in WATCHED_FILES:
        try:
            st = os.stat(run_dir / name)
            keys.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            keys.append(None)
    return tuple(keys)


class _Series:
    """Named series padded with None to the rows they are missing from, built in linear time."""

    def __init__(self):
        self.cols: dict[str, list] = {}

    def put(self, key: str, row: int, value) -> None:
        col = self.cols.setdefault(key, [])
        col.extend([None] * (row - len(col)))
        col.append(value)

    def done(self, n: int) -> dict[str, list]:
        for col in self.cols.values():
            col.extend([None] * (n - len(col)))
        return self.cols


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
    """A run folder loaded once (decomposition, target, adapter), serving dashboard queries. It keeps
    what it loaded: RunRegistry (the server) loads a run again when its files change."""

    def __init__(self, run_dir: str | Path, adapter: Adapter | None = None, name: str | None = None):
        self.run_dir = Path(run_dir)
        self.name = name or self.run_dir.name
        # Taken before loading: a file replaced while it loads shows as changed on the next request.
        self.file_keys = _file_keys(self.run_dir)
        try:
            self.fingerprint = fingerprint(self.run_dir)  # of the decomposition this session serves
        except FileNotFoundError:
            self.fingerprint = None  # load() below says what is missing
        dec_key = self.file_keys[0]
        self._legacy_fingerprint = None if dec_key is None else f"{dec_key[2]}:{dec_key[3]}"
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
        """Training curves from metrics.jsonl: scalar loss terms, L0 per site, and the evaluations.

        Every series has one entry per step of its list (None where a row lacks it), in time linear
        in the file. A line that is not a record of the expected shape (a write cut short, a
        hand-edited line) is skipped, as a line a running run is writing."""
        steps, lr, p = [], [], []
        losses, l0 = _Series(), _Series()
        ev_steps: list = []
        alive, ev_l0, recon = _Series(), _Series(), _Series()
        for _, row in metric_records(self.run_dir / METRICS)[0]:
            if "consolidate" in row or not _number(row.get("step")):  # a merge step's record, or no step
                continue
            if "eval" in row:
                ev = row["eval"]
                if not isinstance(ev, dict):
                    continue
                n = len(ev_steps)
                ev_steps.append(row["step"])
                for key, series in (("alive", alive), ("l0", ev_l0)):
                    per_site = ev.get(key)
                    for s, v in (per_site.items() if isinstance(per_site, dict) else ()):
                        if _number(v):
                            series.put(s, n, v)
                for k in ("ci_masked_recon", "stochastic_recon", "ones_recon"):
                    if _number(ev.get(k)):
                        recon.put(k, n, ev[k])
                continue
            n = len(steps)
            steps.append(row["step"])
            lr.append(row["lr"] if _number(row.get("lr")) else None)
            p.append(row["p"] if _number(row.get("p")) else None)
            for k, v in row.items():
                if k not in NOT_SCALARS and _number(v):
                    losses.put(k, n, v)
            per_site = row.get("l0")
            for s, v in (per_site.items() if isinstance(per_site, dict) else ()):
                if _number(v):
                    l0.put(s, n, v)
        train = {"step": steps, "lr": lr, "p": p, "losses": losses.done(len(steps)), "l0": l0.done(len(steps))}
        n = len(ev_steps)
        evals = {"step": ev_steps, "alive": alive.done(n), "l0": ev_l0.done(n), "recon": recon.done(n)}
        return {"train": train, "eval": evals}

    def tables(self) -> dict:
        """The analysis JSON files the run has (census, causal, baseline, facts, results, eval)."""
        out = {}
        for t in TABLE_FILES:
            path = self.run_dir / f"{t}.json"
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                continue
            try:
                out[t] = json.loads(raw)
            except (ValueError, RecursionError) as err:  # cut short or not JSON (UnicodeDecodeError is a ValueError)
                remake = f"write it again with `{WRITTEN_BY[t]} {self.run_dir}` or move it away" if t in WRITTEN_BY else \
                    "move it away (the training run wrote it; the overview works without it)"
                raise AppError(f"{path} is damaged ({type(err).__name__}: {str(err)[:200]}): {remake}", 422) from None
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
        value = _integer(seed)
        if value is None:
            raise AppError(f"'seed' must be an integer (ASCII digits, at most {MAX_INT_DIGITS}, optional '-'), "
                           f"got {_show(seed)}")
        try:
            example = self.adapter.example(value)
        except ValueError as err:  # no dataset to draw from (an adapter made without texts)
            raise AppError(f"no random example: {err}", 409) from None
        return {"prompt": self.adapter.prompt_of(example)}

    def _check_site(self, site) -> None:
        if not isinstance(site, str) or site not in self.dec.site_names:
            raise AppError(f"unknown site {_show(site)}; sites are {self.dec.site_names}", 404)

    def _check_subcomponent(self, site, idx) -> int:
        self._check_site(site)
        C = self.dec.component(site).C
        c = _integer(idx)
        if c is None:
            raise AppError(f"subcomponent id {_show(idx)} is not an integer (ASCII digits); {site} has subcomponents 0..{C - 1}")
        if not 0 <= c < C:
            raise AppError(f"unknown subcomponent {site}:{_show(c)}; {site} has subcomponents 0..{C - 1}", 404)
        return c

    def _check_positions(self, positions, n: int) -> list[int] | None:
        if positions is None:
            return None
        if not isinstance(positions, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in positions):
            raise AppError(f"'positions' must be a list of integers or null (every position), got {_show(positions)}")
        bad = [p for p in positions if not -n <= p < n]
        if bad:
            raise AppError(f"positions {_show(bad)} are outside the prompt, which has positions 0..{n - 1}")
        return [p % n for p in positions]

    def ablate(self, prompt, ablations, base: str = "ones", top_k: int = 8) -> dict:
        """Re-run the prompt with chosen subcomponents at mask 0 (at chosen positions, or all).

        ablations: [{"site": str, "idx": int, "positions": [int] | null}]. base 'ones' keeps every
        other subcomponent at mask 1 (the decomposed weights), 'ci' at its CI. Returns the top outputs
        before and after at every position and the divergence (KL, or MSE for regression) per position.
        """
        batch = self.encode(prompt)
        if base not in ("ones", "ci"):
            raise AppError(f"'base' must be 'ones' (others at mask 1) or 'ci' (others at their CI), got {_show(base)}")
        if not isinstance(ablations, list) or not ablations:
            raise AppError("'ablations' must be a non-empty list of {site, idx, positions} objects")
        n = batch.shape[1] if self.adapter.input_kind == "tokens" else 1
        chosen = []
        for a in ablations:
            if not isinstance(a, dict):
                raise AppError(f"each ablation must be an object {{site, idx, positions}}, got {_show(a)}")
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
    def _harvest(self, read):
        """read(connection) on the run's harvest, or None when the run has none. A harvest that
        cannot be read (not a database, a table or column missing, a value that is not JSON) is a
        422 that says to harvest again."""
        path = self.run_dir / DB_NAME
        if not path.exists():
            return None
        try:
            con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
            try:
                return read(con)
            finally:
                con.close()
        except (sqlite3.Error, ValueError, TypeError, KeyError, IndexError, RecursionError) as err:
            if not path.exists():  # removed while it was being read
                return None
            raise AppError(f"the harvest {path} is damaged ({type(err).__name__}: {str(err)[:200]}); run "
                           f"`tspd harvest {self.run_dir}` again", 422) from None

    def _harvest_status(self) -> dict | None:
        """The harvest's metadata, `stale` when it was made from another decomposition than the one
        this session serves; {"error": message} when it is damaged."""
        def read(con):
            meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
            con.execute("SELECT 1 FROM subcomponents LIMIT 1").fetchall()  # the tables the views read are there
            con.execute("SELECT 1 FROM contexts c JOIN examples e ON e.id = c.example LIMIT 1").fetchall()
            return meta

        try:
            meta = self._harvest(read)
        except AppError as err:
            return {"error": str(err)}
        if meta is None:
            return None
        made_from = meta.get("fingerprint")
        # Harvests made before content fingerprints hold "size:mtime_ns" of the file.
        legacy = not (isinstance(made_from, str) and made_from.startswith("sha256:"))
        meta["stale"] = made_from != (self._legacy_fingerprint if legacy else self.fingerprint)
        return meta

    def subcomponent_list(self, site) -> dict:
        """Every subcomponent of a site with its harvested frequency and mean CI (most frequent first)."""
        self._check_site(site)
        rows = self._harvest(lambda con: con.execute(
            "SELECT idx, frequency, mean_ci, max_ci FROM subcomponents WHERE site = ? ORDER BY frequency DESC, max_ci DESC",
            (site,)).fetchall())
        if rows is None:
            return {"site": site, "harvested": False, "items": [{"idx": c} for c in range(self.dec.component(site).C)]}
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

        def read(con):
            row = con.execute("SELECT frequency, mean_ci, max_ci, inner_sign, hist FROM subcomponents "
                              "WHERE site = ? AND idx = ?", (site, c)).fetchone()
            if row is None:
                return None
            ctx = con.execute(
                "SELECT c.position, c.ci, c.ci_row, e.labels FROM contexts c JOIN examples e ON e.id = c.example "
                "WHERE c.site = ? AND c.idx = ? ORDER BY c.rank", (site, c)).fetchall()
            freq, mean_ci, max_ci, inner_sign, hist = row
            return float(inner_sign), {
                "frequency": freq, "mean_ci": mean_ci, "max_ci": max_ci, "hist": json.loads(hist),
                "contexts": [{"position": p, "ci": round(g, 4), "ci_row": json.loads(r), "tokens": json.loads(t)}
                             for p, g, r, t in ctx],
            }

        sign, sign_known = 1.0, False
        found = self._harvest(read)
        if found is not None:
            inner_sign, result["harvest"] = found
            sign, sign_known = (inner_sign, True) if inner_sign != 0 else (1.0, False)
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
    """The runs under one folder (the folder itself when it is a run), loaded on first use and
    loaded again when their files change (a re-run, a replaced decomposition)."""

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
        self._loading: dict[str, threading.Lock] = {}  # one load of a run at a time; other runs are served meanwhile
        self._lock = threading.Lock()  # guards runs, _sessions and _loading

    def _discover(self) -> dict[str, Path]:
        if (self.root / "decomposition.safetensors").exists():
            return {self.root.name: self.root}
        found = sorted(self.root.glob("*/decomposition.safetensors")) + sorted(self.root.glob("*/*/decomposition.safetensors"))
        return {p.parent.relative_to(self.root).as_posix(): p.parent for p in found}

    def rescan(self) -> dict[str, Path]:
        """Look at the folder again: runs finished since appear, removed ones go (with their sessions)."""
        runs = self._discover()
        with self._lock:
            self.runs = runs
            for gone in set(self._sessions) - set(runs):
                del self._sessions[gone]
        return runs

    def names(self) -> list[str]:
        return list(self.rescan())

    def get(self, name) -> RunSession:
        if name is not None and not isinstance(name, str):
            raise AppError(f"'run' must be a run folder's name (a string), got {_show(name)}")
        runs = self.runs
        if name is None:
            if len(runs) != 1:
                runs = self.rescan()
            if len(runs) != 1:
                raise AppError(f"give the run: run=<name>, one of {list(runs)}")
            name = next(iter(runs))
        if name not in runs or not (runs[name] / "decomposition.safetensors").exists():
            runs = self.rescan()  # a run finished, or was removed, since the last look
        if name not in runs:
            raise AppError(f"no run folder {_show(name)} under {self.root}; runs are {list(runs)}", 404)
        with self._lock:
            loading = self._loading.setdefault(name, threading.Lock())
        with loading:
            with self._lock:
                session = self._sessions.get(name)
            # One stat per file: a session whose files changed (a re-run, a replaced decomposition)
            # would serve what it loaded then, beside a harvest and analysis files made since.
            if session is not None and session.file_keys == _file_keys(session.run_dir):
                return session
            try:
                session = RunSession(runs[name], self.adapter, name)
            except Exception as err:  # noqa: BLE001 -- whatever a damaged folder raises (e.g. SafetensorError): a 422, not a 500
                with self._lock:
                    self._sessions.pop(name, None)
                raise AppError(f"run folder {name!r} could not be loaded: {type(err).__name__}: {err}", 422) from None
            with self._lock:
                self._sessions[name] = session
            return session
