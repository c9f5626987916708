"""``qsharp`` console entry point: ``qsharp <command> [--config FILE] [key=value ...]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
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


def _train(args: argparse.Namespace) -> int:
    from qsharp_jax import plotting, qsharp

    cfg = config.load(qsharp.TrainConfig, args.config, args.overrides)
    history = qsharp.train(cfg)
    print(f"{'iteration':>9} {'examples':>8} {'fit loss':>9} {'guided reward':>13} {'π_ref reward':>12} {'KL':>7}")
    for h in history:
        print(f"{h['iteration']:>9} {h['examples']:>8} {h['fit_loss']:>9.4f} {h['guided_reward']:>13.3f} "
              f"{h['ref_reward']:>12.3f} {h['guided_kl']:>7.3f}")
    print(f"run directory: {cfg.run_dir} (metrics.jsonl, tensorboard/, checkpoints/, data/)")
    print(f"plot: {plotting.plot_run(cfg.run_dir)}")
    return 0


def _star_graph(args: argparse.Namespace) -> int:
    from qsharp_jax import star_graph_experiment as exp

    cfg = config.load(exp.StarGraphConfig, args.config, args.overrides)
    results = exp.run(cfg)
    print()
    print(exp.write_table(results, Path(cfg.run_dir) / "results.md"))
    total = sum(results["seconds"].values())
    print(f"{total / 60:.1f} min (wall clock, all methods); run directory: {cfg.run_dir} (results.json, results.md, accuracy.png)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from qsharp_jax import qsharp

    metrics = qsharp.evaluate_run(args.run_dir)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    return 0


def _sample(args: argparse.Namespace) -> int:
    from qsharp_jax import qsharp

    prompts, tokens, rewards = qsharp.sample_run(args.run_dir, args.num, args.seed)
    for p, t, r in zip(prompts, tokens, rewards):
        print(f"prompt {p.tolist()} -> {t.tolist()}  reward {float(r):g}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from qsharp_jax import plotting

    print(plotting.plot_run(args.run_dir, args.out))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qsharp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tab = sub.add_parser("tabular", help="exact tabular check: Q♯ vs π* vs CD on token trees")
    tab.add_argument("--config", help="YAML file with TabularConfig fields")
    tab.add_argument("overrides", nargs="*", help="key=value overrides, e.g. etas=[0.1] depths=[3]")
    tab.set_defaults(func=_tabular)
    train = sub.add_parser("train", help="run or resume Algorithm 1 (collect, fit, evaluate, checkpoint)")
    train.add_argument("config", nargs="?", help="YAML file with TrainConfig fields")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. algorithm.eta=0.05 run_dir=runs/x")
    train.set_defaults(func=_train)
    star = sub.add_parser("star-graph", help="the star-graph experiment: π_ref pretraining, Q♯, CD, REINFORCE, DPO, RPO")
    star.add_argument("config", nargs="?", help="YAML file with StarGraphConfig fields (experiments/star_graph/)")
    star.add_argument("overrides", nargs="*", help="key=value overrides, e.g. graph.degree=5 run_dir=runs/g55")
    star.set_defaults(func=_star_graph)
    ev = sub.add_parser("eval", help="evaluate a run's newest checkpoint (guided and π_ref)")
    ev.add_argument("run_dir")
    ev.set_defaults(func=_eval)
    sample = sub.add_parser("sample", help="print guided samples from a run's newest checkpoint")
    sample.add_argument("run_dir")
    sample.add_argument("--num", type=int, default=8)
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=_sample)
    plot = sub.add_parser("plot", help="draw a run's learning curves to PNG")
    plot.add_argument("run_dir")
    plot.add_argument("--out", help="PNG path (default: RUN_DIR/learning_curves.png)")
    plot.set_defaults(func=_plot)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"qsharp {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
