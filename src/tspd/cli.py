"""The `tspd` command: it only parses arguments and calls library functions."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tspd import distributed
from tspd.cache import AssetError
from tspd.config import ConfigError, RunConfig

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"


def _recipe(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.is_file():  # a folder named like a recipe (e.g. a run's --out) does not hide the recipe
        return p
    candidate = CONFIGS_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(q.stem for q in CONFIGS_DIR.glob("*.yaml")) if CONFIGS_DIR.exists() else []
    raise ConfigError(f"no config file or recipe named {name_or_path!r}; recipes: {', '.join(known)}")


def cmd_decompose(args: argparse.Namespace) -> None:
    from tspd.experiments import decompose_from_config

    overrides = list(args.set or [])
    saved = Path(args.out) / "config.yaml"
    if args.config is None:
        if not args.resume:
            raise ConfigError("give a CONFIG.yaml or recipe name (or --resume to continue the run in --out)")
        if not saved.exists():
            raise ConfigError(f"--resume without a CONFIG reads {saved}, which does not exist: is {args.out} a run "
                              f"folder? Give the CONFIG the run started with")
        cfg = RunConfig.from_yaml(saved, overrides)  # the run's own config, with any --set on top
    else:
        cfg = RunConfig.from_yaml(_recipe(args.config), overrides)
    decompose_from_config(cfg, args.out, resume=args.resume)
    if distributed.world().main:
        print(f"decomposition written to {args.out}")


def cmd_train_target(args: argparse.Namespace) -> None:
    from tspd.experiments import train_target

    path = train_target(args.kind, args.out, seed=args.seed, overrides=args.set or [])
    print(f"target written to {path}")


def _run_folder(args: argparse.Namespace) -> str | None:
    """The run folder of `tspd decompose` / `tspd run` (run's default: runs/<experiment>); None for other commands."""
    if getattr(args, "func", None) is cmd_run:
        return args.out or f"runs/{Path(args.experiment).stem}"
    return args.out if getattr(args, "func", None) is cmd_decompose else None


def cmd_run(args: argparse.Namespace) -> None:
    from tspd.experiments import run_experiment

    overrides = list(args.set or [])
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
        if Path(args.experiment).stem == "induction":
            overrides.append(f"target.seed={args.seed}")
    out = _run_folder(args)
    t0 = time.time()
    result = run_experiment(_recipe(args.experiment), out, overrides, resume=args.resume)
    if not distributed.world().main:  # under torchrun, rank 0 reports
        return
    print(json.dumps(result, indent=2))
    print(f"done in {time.time() - t0:.0f} s; results in {out}")


def cmd_eval(args: argparse.Namespace) -> None:
    from tspd.experiments import evaluate_run

    print(json.dumps(evaluate_run(args.run_dir), indent=2))


def cmd_circuit_check(args: argparse.Namespace) -> None:
    import yaml

    from tspd.analysis.induction import CIRCUIT_VARIANTS, circuit_only_check
    from pydantic import ValidationError

    from tspd.config import InductionTargetConfig, _explain
    from tspd.data.induction import InductionTask
    from tspd.decomposition import write_json
    from tspd.targets import build_target

    print(f"last-position KL (nats) / accuracy with Q/K/V outputs kept only at their roles; {args.n_sequences} sequences")
    print(f"{'target':40}{'accuracy':>10}" + "".join(f"{v:>22}" for v in CIRCUIT_VARIANTS))
    for folder in map(Path, args.target_dirs):
        weights, settings = folder / "target.safetensors", folder / "target.yaml"
        if not (weights.exists() and settings.exists()):
            raise ConfigError(f"{folder} has no target.safetensors + target.yaml; make one with `tspd train-target induction --out DIR`")
        saved = yaml.safe_load(settings.read_text())
        kind = saved.get("kind", "induction") if isinstance(saved, dict) else None
        if kind != "induction":
            raise ConfigError(f"{folder} holds a {kind} target; circuit-check takes induction targets "
                              "(`tspd train-target induction --out DIR`, or an induction run folder)")
        try:
            tcfg = InductionTargetConfig(**{**saved, "path": str(weights)})
        except ValidationError as err:
            raise ConfigError(f"{settings} does not describe an induction target: {_explain(err, str(settings))}") from None
        res = circuit_only_check(build_target(tcfg), InductionTask(tcfg.n_tokens, tcfg.seq_len), n_sequences=args.n_sequences)
        if args.write:
            write_json(folder / "circuit_check.json", res)
        cells = "".join(f"{res[v]['kl']:>13.3f} / {res[v]['accuracy']:.3f}" for v in CIRCUIT_VARIANTS)
        print(f"{str(folder)[-40:]:40}{res['target_accuracy']:>10.4f}{cells}")


def cmd_census(args: argparse.Namespace) -> None:
    from tspd.analysis.induction import check_circuit
    from tspd.experiments import census_run
    from tspd.report.induction import short

    table = census_run(args.run_dir, n_sequences=args.n_sequences)
    roles = table["roles"]
    print(f"active: CI > {table['threshold']} on {table['n_sequences']} held-out sequences")
    print(f"{'site':6}" + "".join(f"{r:>10}" for r in roles) + f"{'distinct':>10}")
    for s, row in table["sites"].items():
        print(f"{short(s):6}" + "".join(f"{row['mean_active'][r]:10.3f}" for r in roles) + f"{row['distinct_active']:10d}")
    print(f"total distinct {table['total_distinct']}; active per token {table['active_per_token']:.3f}, per sequence "
          f"{table['active_per_input']:.2f}")
    print(f"faithfulness {table['faithfulness']:.3g}; KL CI-masked {table['recon_kl_ci_masked']:.3g}, stochastic "
          f"{table['recon_kl_stochastic']:.3g}")
    def kls(d: dict) -> str:
        return ", ".join(f"{k.replace('_', ' ')} {v:.3g}" for k, v in d.items())

    print(f"attention-pattern KL, all rows: {kls(table['attention_kl'])}; at the circuit's rows: "
          f"{kls(table['attention_kl_circuit_rows'])}")
    print(f"accuracy target {table['accuracy']['target']:.4f}, CI-masked {table['accuracy']['ci_masked']:.4f}")
    for name, ok in check_circuit(table).items():
        print(f"  [{'pass' if ok else 'FAIL'}] {name}")
    print(f"written {Path(args.run_dir) / 'census.json'} and census_heatmap.png")


def cmd_causal(args: argparse.Namespace) -> None:
    from tspd.experiments import causal_run

    print(json.dumps(causal_run(args.run_dir), indent=2))


def cmd_baseline(args: argparse.Namespace) -> None:
    from tspd.experiments import baseline_run

    result = baseline_run(args.run_dir)
    print(f"SVD baseline needs {result['pieces_needed']} rank-1 pieces to reach SPD's KL {result['spd_kl']:.3g} "
          f"(SPD: {result['spd_active_per_token']:.2f} active per token, {result['spd_active_per_input']:.2f} per "
          f"sequence, {result['spd_total_distinct']} in total); written {Path(args.run_dir) / 'baseline.json'}")
    if result["matched"] and result["pieces_needed"] == 0:
        print("note: 0 pieces means SPD's KL is no better than keeping none of the sites' rank-1 pieces: the "
              "decomposition does not reproduce the target yet (too few steps, or a faithfulness problem)")


def cmd_report(args: argparse.Namespace) -> None:
    from tspd.report.induction import induction_report

    print(f"written {induction_report(args.run_dir)}")


def cmd_facts(args: argparse.Namespace) -> None:
    from tspd.analysis import facts_study

    if args.action != "ablate" and args.run_dir is not None:
        raise ConfigError(f"tspd facts {args.action} takes no RUN_DIR (it studies --model); use --out DIR for where to write")
    out = args.out or ("runs/facts" if args.action != "ablate" else args.run_dir)
    if args.action == "screen":
        r = facts_study.screen_model(args.model, out, facts_file=args.facts)
        print(json.dumps({k: r[k] for k in ("overall", "accuracy", "by_template", "default_answer")}, indent=2))
    elif args.action == "scan":
        r = facts_study.scan_model(args.model, out, facts_file=args.facts)
        print(f"MLP drop per layer: {[round(v, 3) for v in r['mlp']]}")
        print(f"attention drop per layer: {[round(v, 3) for v in r['attn']]}")
        print(f"largest MLP drop at layer {r['best_mlp_layer']}; scan.json and scan.png in {out}")
    else:
        if args.run_dir is None:
            raise ConfigError("tspd facts ablate needs RUN_DIR (a finished language-model decomposition)")
        r = facts_study.facts_ablate(args.run_dir, k=args.k, select=args.select, collateral_weight=args.collateral_weight,
                                      n_candidates=args.candidates, min_ci=args.min_ci, min_gap=args.min_gap,
                                      choose_size=args.choose_size, out_dir=out,
                                      name_at_start=not args.name_not_first, facts_file=args.facts)
        f = r["faithfulness"]
        print(f"faithfulness on held-out text: KL {f['kl_per_token']:.4f} nats/token, CE +{f['ce_increase']:.4f}, "
              f"{f['active_per_token']:.1f} active/token")
        for sport, row in r["sports"].items():
            if "both" not in row:
                print(f"{sport:18} skipped: {row['skipped']}")
                continue
            print(f"{sport:18} own {row['both']['target_effect']:7.3f}  others {row['both']['collateral_facts']:7.3f}  "
                  f"random {row['random_target_effect']:7.3f}  svd {row['svd']['target_effect']:7.3f}  "
                  f"text KL {row['text']['kl']:.4f}  {'PASS' if row['passes'] else 'fail'}")
        print(f"facts.json, facts.html and figures in {out}")


def _int_in(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high] (no upper bound when high is None)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < low or (high is not None and v > high):
            raise argparse.ArgumentTypeError(
                f"must be {'at least ' + str(low) if high is None else f'between {low} and {high}'}, got {v}")
        return v

    return parse


def _float_in(low: float, high: float | None = None):
    """A number >= low (and <= high); NaN fails both comparisons."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if high is None and not v >= low:
            raise argparse.ArgumentTypeError(f"must be at least {low:g}, got {text}")
        if high is not None and not low <= v <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low:g}, {high:g}], got {text}")
        return v

    return parse


def _asset_list(text: str) -> list[str]:
    from tspd.cache import ASSETS

    names = [w.strip() for w in text.split(",") if w.strip()]
    unknown = [n for n in names if n not in ASSETS]
    if unknown or not names:
        given = ", ".join(unknown) or "(none given)"
        raise argparse.ArgumentTypeError(f"unknown asset(s) {given}; choose from {', '.join(ASSETS)}")
    return names


def cmd_assets(args: argparse.Namespace) -> None:
    from tspd.cache import fetch_assets

    for row in fetch_assets(args.what, args.cache):
        print(f"{row['name']:15} {row['mib']:8.1f} MiB {row['seconds']:7.1f} s  {row['path']}")


def cmd_harvest(args: argparse.Namespace) -> None:
    from tspd.app.harvest import harvest

    if args.n_examples is not None and args.n_examples < 1:
        raise ConfigError(f"--n-examples must be at least 1, got {args.n_examples}; leave it out for the target kind's default")
    summary = harvest(args.run_dir, n_examples=args.n_examples, top_k=args.top_k)
    print(f"harvested {summary['n_examples']} examples in {summary['seconds']:.1f} s; written {summary['path']}")


def cmd_serve(args: argparse.Namespace) -> None:
    from tspd.app.server import serve

    serve(args.run_dir, host=args.host, port=args.port, threads=args.threads or None)


def _sites_source(what: str) -> tuple:
    """(model, site patterns or None, label) for `tspd sites`: a Hugging Face model (a name or a
    folder with config.json, built on the meta device), a run folder, or a config file / recipe."""
    from tspd.targets import build_target
    from tspd.targets.huggingface import TINY, model_skeleton

    path = Path(what)
    if what in TINY or what == "smollm2" or (path / "config.json").is_file():
        return model_skeleton(what), None, what
    if (path / "config.yaml").is_file():
        path = path / "config.yaml"  # a run folder: the config it ran with
    elif path.is_dir():
        raise ConfigError(f"{what} holds neither config.json (a Hugging Face model) nor config.yaml (a tspd run folder)")
    elif not path.is_file() and not (CONFIGS_DIR / f"{what}.yaml").exists():
        raise ConfigError(f"{what!r} is none of: a config file, a recipe ({', '.join(sorted(q.stem for q in CONFIGS_DIR.glob('*.yaml')))}), "
                          f"a run folder, 'smollm2', {', '.join(repr(k) for k in TINY)}, a folder holding a Hugging Face model")
    cfg = RunConfig.from_yaml(path if path.is_file() else _recipe(what))
    if cfg.target is None:
        raise ConfigError(f"{what} has no target section (a Python-API run): list the sites of the model from Python, "
                          "tspd.components.describe_sites(model)")
    model = model_skeleton(cfg.target.model) if cfg.target.kind == "huggingface" else build_target(cfg.target, train=False)
    return model, [(site.pattern, site.C) for site in cfg.sites], f"{what} (target {getattr(cfg.target, 'model', cfg.target.kind)})"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10**6 else f"{n / 1e3:.1f}k" if n >= 10**4 else str(n)


def cmd_sites(args: argparse.Namespace) -> None:
    from tspd.components import describe_sites

    if args.C is not None and not args.pattern:
        raise ConfigError("--C goes with --pattern (the size of V and U for the globs tried); a config's sites have their own C")
    model, patterns, label = _sites_source(args.source)
    if args.pattern:
        patterns = [(g, args.C or 1) for g in args.pattern]
    infos = describe_sites(model, patterns)
    if args.pattern and args.C is None:
        for info in infos:
            info.C = None  # patterns tried without a C: shapes only
    if args.json:
        print(json.dumps([{**vars(i), "tied_with": list(i.tied_with), "weight_params": i.weight_params,
                           "factor_params": i.factor_params} for i in infos], indent=1))
        return
    what = f"chosen by {len(patterns)} pattern(s): {', '.join(g for g, _ in patterns)}" if patterns else "decomposable modules"
    print(f"{label}: {type(model).__name__}, {len(infos)} {what}")
    with_c = any(i.C is not None for i in infos)
    rows = [("module", "type", "d_in", "d_out", "weight") + (("C", "V+U") if with_c else ())]
    notes = [""]
    for i in infos:
        row = (i.name, i.module_type, str(i.d_in), str(i.d_out), _count(i.weight_params))
        if with_c:
            row += (str(i.C), f"{_count(i.factor_params)} ({i.factor_params / i.weight_params:.2f}x)")
        rows.append(row)
        notes.append(f"tied: {', '.join(i.tied_with)} uses the same weight and keeps the target's" if i.tied_with else "")
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for r, note in zip(rows, notes):
        line = "  ".join(c.ljust(w) if k < 2 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths)))
        print(line + ("  " + note if note else ""))
    weights = sum(i.weight_params for i in infos)
    if with_c:
        factors = sum(i.factor_params or 0 for i in infos)
        print(f"total: {len(infos)} sites, {_count(weights)} weight parameters, V and U {_count(factors)} ({factors / max(weights, 1):.2f}x)")
    else:
        print(f"total: {len(infos)} modules, {_count(weights)} weight parameters")


def cmd_config_keys(args: argparse.Namespace) -> None:
    from tspd.config import KIND_CONFIGS, SiteConfig, describe_keys, kind_of

    rows = describe_keys()
    rows += [(f"sites[].{k}", d, t) for k, d, t in describe_keys(SiteConfig)]
    for section, kinds in KIND_CONFIGS:
        for kind_cfg in kinds:
            rows += [(f"{section}.{k} ({kind_of(kind_cfg)})", d, t or f"selects this {section} kind")
                     for k, d, t in describe_keys(kind_cfg)]
    print("| key | default | meaning |\n|---|---|---|")
    for key, default, text in rows:
        print(f"| `{key}` | `{default}` | {text} |")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tspd", description="Stochastic Parameter Decomposition for transformers")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("decompose", help="decompose the target a config names")
    p.add_argument("config", nargs="?", help="CONFIG.yaml or a recipe name from configs/")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.set_defaults(func=cmd_decompose)

    p = sub.add_parser("train-target", help="train a toy target and save it")
    p.add_argument("kind", choices=["tms-5-2", "tms-40-10", "induction"], help="which toy target")
    p.add_argument("--out", required=True, help="folder for the target")
    p.add_argument("--seed", type=int, default=None, help="target seed")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a target key, e.g. train_steps=2000")
    p.set_defaults(func=cmd_train_target)

    p = sub.add_parser("run", help="run an experiment end to end (target, decomposition, metrics, figures)")
    p.add_argument("experiment", help="recipe name from configs/ (tms-5-2, tms-40-10, induction, smollm2-facts, ...) or a config path")
    p.add_argument("--out", help="run folder (default runs/<experiment>)")
    p.add_argument("--seed", type=int, help="decomposition seed (induction: the target seed too)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its checkpoint")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("eval", help="evaluate a finished run and print its metrics")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("circuit-check", help="induction targets: how much of each is the 2-step circuit (before decomposing)")
    p.add_argument("target_dirs", nargs="+", help="folders with target.safetensors + target.yaml (train-target output)")
    p.add_argument("--n-sequences", type=_int_in(1), default=2000, help="held-out sequences to evaluate")
    p.add_argument("--write", action="store_true", help="also write circuit_check.json into each folder")
    p.set_defaults(func=cmd_circuit_check)

    p = sub.add_parser("census", help="induction runs: the circuit census (paper's Table 1) -> census.json")
    p.add_argument("run_dir")
    p.add_argument("--n-sequences", type=_int_in(1), default=2000, help="held-out sequences to evaluate")
    p.set_defaults(func=cmd_census)

    p = sub.add_parser("causal", help="induction runs: ablate each site's active subcomponents -> causal.json")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_causal)

    p = sub.add_parser("baseline", help="induction runs: greedy rank-1 SVD baseline (paper's Figure 2) -> baseline.json")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("report", help="induction runs: (re)write report.html from the run's JSON files")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("harvest", help="dashboard: precompute subcomponent statistics into RUN_DIR/dashboard.sqlite")
    p.add_argument("run_dir")
    p.add_argument("--n-examples", type=int, default=None, help="dataset examples (default: per target kind)")
    p.add_argument("--top-k", type=_int_in(1), default=20, help="top-activating contexts kept per subcomponent")
    p.set_defaults(func=cmd_harvest)

    p = sub.add_parser("serve", help="dashboard: serve a run (or a folder of runs) at a local URL")
    p.add_argument("run_dir", help="a run folder, or a folder holding run folders")
    p.add_argument("--port", type=_int_in(0, 65535), default=8765, help="port (0: a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--threads", type=_int_in(0, 1024), default=1, help="torch CPU threads (0: torch's default; raise for large models)")
    p.set_defaults(func=cmd_serve)

    # Listed for --help only: main() hands `tspd bench ...` to the harness's parser (tspd.bench).
    p = sub.add_parser("facts", help="the athlete -> sport facts study: screen, layer scan, ablation (SPEC 6.3)")
    p.add_argument("action", choices=["screen", "scan", "ablate"])
    p.add_argument("run_dir", nargs="?", help="ablate: the decomposition's run folder")
    p.add_argument("--model", default="smollm2", help="screen/scan: smollm2, tiny-gpt2, tiny-llama or a model folder")
    p.add_argument("--out", default=None,
                   help="output folder (screen/scan: default runs/facts; ablate: default RUN_DIR, give another to keep "
                        "several selection settings side by side)")
    p.add_argument("--facts", default=None, metavar="FILE",
                   help="athletes and templates from this JSON instead of the shipped tspd/data/facts.json (same layout: "
                        "templates with {name} once, sports with an answer and athletes' full names)")
    p.add_argument("--k", type=_int_in(1), default=4, help="ablate: at most this many subcomponents per sport")
    p.add_argument("--select", choices=["causal", "attribution", "ci"], default="causal",
                   help="ablate: causal = CI candidates ranked by ablating each on discovery prompts; attribution = "
                        "candidates by a gradient estimate of their effect (no CI gap needed; for dense "
                        "decompositions), then measured like causal; ci = CI only")
    p.add_argument("--collateral-weight", type=_float_in(0.0), default=1.0,
                   help="ablate (causal, attribution): score = drop on the sport - W x |change on other sports| (default 1)")
    p.add_argument("--candidates", type=_int_in(1), default=24,
                   help="ablate (causal, attribution): at most this many candidates per sport are tested on discovery prompts (default 24)")
    p.add_argument("--min-ci", type=_float_in(0.0, 1.0), default=0.5,
                   help="ablate: name-token CI bar (ci: min_ci; causal candidates: min_ci / 2); default 0.5")
    p.add_argument("--min-gap", type=_float_in(0.0, 1.0), default=0.25,
                   help="ablate: CI gap above other sports (ci: min_gap; causal candidates: min_gap / 2); default 0.25")
    p.add_argument("--choose-size", action="store_true",
                   help="ablate (causal, attribution): keep the prefix of the k ranked pieces whose joint ablation scores best on discovery prompts")
    p.add_argument("--name-not-first", action="store_true",
                   help="ablate: leave out prompts whose name is their first token (position 0; with no BOS token, as in "
                        "SmolLM2, that position usually acts as an attention sink and behaves unlike later ones), for discovery and held-out athletes alike")
    p.set_defaults(func=cmd_facts)
    sub.add_parser("bench", help="time SPD steps on the standard cases (tspd bench --help; benchmarks/README.md)")

    p = sub.add_parser("assets", help="fetch and cache the offline models, tokenizer and text (README: Assets)")
    p.add_argument("--what", type=_asset_list, default="smollm2,gpt2-tokenizer,wiki",
                   help="comma-separated: smollm2, gpt2-tokenizer, wiki")
    p.add_argument("--cache", help="cache folder (default $TSPD_CACHE or ~/.cache/tspd)")
    p.set_defaults(func=cmd_assets)

    p = sub.add_parser("sites", help="list the modules a model offers as sites, or those a config's patterns choose, with shapes")
    p.add_argument("source", help="a config file or recipe (its target and sites), a run folder, or a model: smollm2, "
                                  "tiny-gpt2, tiny-llama or a Hugging Face folder (read from config.json alone)")
    p.add_argument("--pattern", action="append", metavar="GLOB", help="try these site globs instead of the config's (repeatable)")
    p.add_argument("--C", type=_int_in(1), default=None, help="with --pattern: C per site, to see the size of V and U")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=cmd_sites)

    p = sub.add_parser("config-keys", help="print every config key with its default and meaning (markdown)")
    p.set_defaults(func=cmd_config_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its options belong to the harness's own parser
        from tspd.bench import main as bench_main

        try:
            bench_main(argv[1:])
        except KeyError as err:  # an unknown case name
            print(f"tspd: error: {err.args[0]}", file=sys.stderr)
            return 2
        return 0
    args = None
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
        distributed.leave(wait=True)
    except BrokenPipeError:  # output piped into `head` and the like: not an error of the command
        try:
            sys.stdout = open(os.devnull, "w")  # so the interpreter's final flush does not complain
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        if os.environ.get("TSPD_TRACEBACK"):
            raise
        out = _run_folder(args) if args is not None else None
        how = (f"; continue from the last checkpoint with the same command and --resume (run folder {out})"
               if out and (Path(out) / "checkpoint.pt").exists() else "")
        print(f"\ntspd: interrupted{how}", file=sys.stderr)
        return 130
    except (ConfigError, OSError, AssetError, ValueError, RuntimeError) as err:
        # The messages written for users (bad config, facts file, missing asset, a run that
        # diverged) name the problem and the fix; the traceback only on request.
        if os.environ.get("TSPD_TRACEBACK"):
            raise
        print(f"tspd: error: {err}", file=sys.stderr)
        if not isinstance(err, (ConfigError, OSError, AssetError)):
            print("tspd: (set TSPD_TRACEBACK=1 to see where it was raised)", file=sys.stderr)
        return 2
    finally:
        distributed.leave()
    return 0


if __name__ == "__main__":
    sys.exit(main())
