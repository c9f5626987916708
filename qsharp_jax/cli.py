"""``qsharp`` console entry point: ``qsharp <command> [--config FILE] [key=value ...]``."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from qsharp_jax import config


def _tabular(args: argparse.Namespace) -> int:
    from qsharp_jax import demo

    cfg = config.load(demo.TabularConfig, args.config, args.overrides)
    rows = demo.run(cfg)
    print("Q♯ guidance vs the exact KL-regularized optimum π* on random token trees")
    print("(J = E[r] − η·KL(π‖π_ref); π_Q♯ and π_CD use the exact return distributions)\n")
    print(demo.format_table(rows))
    print("\nTheorem 4.1 tree: a sure 0.5 vs a 10% chance of 1 — CD follows the mean, Q♯ the optimum\n")
    print(demo.counterexample_table())
    worst = max(r.max_policy_error for r in rows)
    print(f"\nmax |π_Q♯ − π*| over all trees: {worst:.2e}")
    if cfg.plot:
        print(f"plot: {demo.plot_counterexample(cfg.plot)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qsharp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tab = sub.add_parser("tabular", help="exact tabular check: Q♯ vs π* vs CD on token trees")
    tab.add_argument("--config", help="YAML file with TabularConfig fields")
    tab.add_argument("overrides", nargs="*", help="key=value overrides, e.g. etas=[0.1] depths=[3]")
    tab.set_defaults(func=_tabular)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        parser.exit(2, f"qsharp {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
