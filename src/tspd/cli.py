"""The `tspd` command: it only parses arguments and calls library functions."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tspd.config import ConfigError, RunConfig

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"


def _recipe(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.exists():
        return p
    candidate = CONFIGS_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(q.stem for q in CONFIGS_DIR.glob("*.yaml")) if CONFIGS_DIR.exists() else []
    raise ConfigError(f"no config file or recipe named {name_or_path!r}; recipes: {', '.join(known)}")


def cmd_decompose(args: argparse.Namespace) -> None:
    from tspd.experiments import decompose_from_config

    overrides = list(args.set or [])
    if args.resume and (Path(args.out) / "config.yaml").exists() and not overrides and args.config is None:
        cfg = RunConfig.from_yaml(Path(args.out) / "config.yaml")
    else:
        if args.config is None:
            raise ConfigError("give a CONFIG.yaml (or --resume with an existing run folder)")
        cfg = RunConfig.from_yaml(_recipe(args.config), overrides)
    decompose_from_config(cfg, args.out, resume=args.resume)
    print(f"decomposition written to {args.out}")


def cmd_train_target(args: argparse.Namespace) -> None:
    from tspd.experiments import train_target

    path = train_target(args.kind, args.out, seed=args.seed, overrides=args.set or [])
    print(f"target written to {path}")


def cmd_run(args: argparse.Namespace) -> None:
    from tspd.experiments import run_experiment

    overrides = list(args.set or [])
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    out = args.out or f"runs/{Path(args.experiment).stem}"
    t0 = time.time()
    result = run_experiment(_recipe(args.experiment), out, overrides, resume=args.resume)
    print(json.dumps(result, indent=2))
    print(f"done in {time.time() - t0:.0f} s; results in {out}")


def cmd_eval(args: argparse.Namespace) -> None:
    from tspd.experiments import evaluate_run

    print(json.dumps(evaluate_run(args.run_dir), indent=2))


def cmd_config_keys(args: argparse.Namespace) -> None:
    from tspd.config import InductionTargetConfig, TMSDataConfig, TMSTargetConfig, describe_keys

    rows = describe_keys()
    for kind_cfg in (TMSTargetConfig, InductionTargetConfig):
        rows += [(f"target.{k} ({kind_cfg().kind})", d, t) for k, d, t in describe_keys(kind_cfg)]
    rows += [(f"data.{k} (tms)", d, t) for k, d, t in describe_keys(TMSDataConfig)]
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
    p.add_argument("experiment", help="recipe name (tms-5-2, tms-40-10) or a config path")
    p.add_argument("--out", help="run folder (default runs/<experiment>)")
    p.add_argument("--seed", type=int, help="decomposition seed")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its checkpoint")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("eval", help="evaluate a finished run and print its metrics")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("config-keys", help="print every config key with its default and meaning (markdown)")
    p.set_defaults(func=cmd_config_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"tspd: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
