"""report.html of an induction run: target training, decomposition curves, the census (Table 1),
the causal check and the SVD baseline (Figure 2), from the JSON files the analysis wrote."""

from __future__ import annotations

import json
from pathlib import Path

from tspd.report.html import esc, image, table, write_page

SHORT = {"q_proj": "Q", "k_proj": "K", "v_proj": "V", "o_proj": "O"}


def short(site: str) -> str:
    """blocks.0.attn.k_proj -> K0."""
    parts = site.split(".")
    if len(parts) == 4 and parts[0] == "blocks" and parts[3] in SHORT:
        return f"{SHORT[parts[3]]}{parts[1]}"
    return site


def _load(run_dir: Path, name: str) -> dict | None:
    p = run_dir / name
    return json.loads(p.read_text()) if p.exists() else None


def induction_report(run_dir: str | Path) -> Path:
    from tspd.analysis.induction import check_circuit
    from tspd.report.figures import training_curves_figure

    from tspd.config import ConfigError, RunConfig

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        what = "does not exist" if not run_dir.exists() else "holds no config.yaml"
        raise ConfigError(f"{run_dir} {what}: give the folder of an induction run (`tspd run induction --out DIR`)")
    target = RunConfig.from_yaml(run_dir / "config.yaml").target
    kind = target.kind if target is not None else None
    if kind != "induction":
        raise ConfigError(f"{run_dir} is a {kind!r} run; `tspd report` writes the induction experiment's page")
    sections: list[tuple[str, str]] = []
    hist = _load(run_dir, "target_history.json")
    if hist:
        final = hist.get("final", {})
        sections.append(("Target: the toy induction transformer", (
            f"<p>Held-out last-position accuracy {final.get('accuracy', float('nan')):.4f}, loss "
            f"{final.get('loss', float('nan')):.4g} after {final.get('step')} steps; phase change near step "
            f"{hist.get('phase_change_step')}.</p>" + image(run_dir / "target_loss_curve.png"))))
    if (run_dir / "metrics.jsonl").exists():
        training_curves_figure(run_dir / "metrics.jsonl", run_dir / "training_curves.png")
        sections.append(("Decomposition training", image(run_dir / "training_curves.png")))
    census = _load(run_dir, "census.json")
    if census:
        roles = census["roles"]
        rows = [
            [short(s)] + [r["mean_active"][x] for x in roles] + [r["distinct_active"], r.get("expected_role")]
            for s, r in census["sites"].items()
        ]
        checks = check_circuit(census)
        acc = census["accuracy"]
        summary = table(["quantity", "value"], [
            ["total distinct active", census["total_distinct"]],
            ["active per token (all sites)", census["active_per_token"]],
            ["active per sequence (union over positions)", census["active_per_input"]],
            ["faithfulness (mean squared weight error)", census["faithfulness"]],
            ["KL, CI-masked model (last position)", census["recon_kl_ci_masked"]],
            ["KL, stochastic masks (last position)", census["recon_kl_stochastic"]],
            ["attention-pattern KL, layer 0 (all query positions)", census["attention_kl"]["layer_0"]],
            ["attention-pattern KL, layer 1 (all query positions)", census["attention_kl"]["layer_1"]],
            ["attention-pattern KL at M, layer 0", census["attention_kl_circuit_rows"]["layer_0"]],
            ["attention-pattern KL at the final S, layer 1", census["attention_kl_circuit_rows"]["layer_1"]],
            ["accuracy, target", acc["target"]],
            ["accuracy, CI-masked model", acc["ci_masked"]],
        ])
        att = census["circuit_attention"]
        att_rows = [[k, att["target"][k], att["ci_masked"][k]] for k in att["target"]]
        sections.append((f"Circuit census (paper's Table 1), CI > {census['threshold']}, {census['n_sequences']} sequences", (
            table(["site"] + [f"mean active at {x}" for x in roles] + ["distinct active", "expected role"], rows)
            + summary
            + table(["circuit attention weight", "target", "CI-masked"], att_rows)
            + table(["acceptance check", "result"], [[k, v] for k, v in checks.items()])
            + image(run_dir / "census_heatmap.png"))))
    causal = _load(run_dir, "causal.json")
    if causal:
        rows = []
        for s, r in causal["sites"].items():
            a, c = r["active"], r["control"]
            rows.append([short(s), len(r["ablated"]), a["accuracy"], c["accuracy"], a["layer_0_m_to_first_s"],
                         a["layer_1_final_s_to_m"], a["attention_kl"]["layer_0"], a["attention_kl"]["layer_1"]])
        none = causal["none"]
        sections.append(("Causal check: ablate one site's active subcomponents", (
            f"<p>Every other subcomponent at mask 1 (the decomposed model minus the ablated rank-1 pieces), "
            f"{causal['n_sequences']} held-out sequences. Without ablation: accuracy {none['accuracy']:.4f}, "
            f"layer-0 M→first S attention {none['layer_0_m_to_first_s']:.3f}, layer-1 final S→M "
            f"{none['layer_1_final_s_to_m']:.3f}. The control ablates as many never-active subcomponents.</p>"
            + table(["site", "ablated", "accuracy", "control accuracy", "L0 M→first S", "L1 final S→M",
                     "attention KL L0", "attention KL L1"], rows)
            + image(run_dir / "causal_check.png"))))
    base = _load(run_dir, "baseline.json")
    if base:
        sections.append(("SPD vs greedy rank-1 SVD (paper's Figure 2)", (
            f"<p>The baseline adds, one at a time, the singular rank-1 piece (of any site) that most lowers the "
            f"last-position KL, until it matches SPD's CI-masked KL {base['spd_kl']:.3g}.</p>"
            + table(["", "rank-1 pieces"], [
                ["SVD baseline needs (for every input)", base["pieces_needed"] if base["matched"] else f"not matched with all {base['available_pieces']}"],
                ["SPD active per token", base["spd_active_per_token"]],
                ["SPD active per sequence", base["spd_active_per_input"]],
                ["SPD distinct in total", base["spd_total_distinct"]],
            ])
            + image(run_dir / "baseline.png"))))
    cfg = run_dir / "config.yaml"
    if cfg.exists():
        sections.append(("Config", f"<pre>{esc(cfg.read_text())}</pre>"))
    return write_page(run_dir / "report.html", f"tspd induction run: {run_dir.name}", sections)
