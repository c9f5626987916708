"""``python -m experiments.tabular [CONFIG.yaml] [key=value ...]``: Q♯ guidance against the exact
KL-regularized optimum π* on random token trees, and the paper's Theorem 4.1 tree (``make tabular``)."""

import argparse
import sys

from qsharp_jax import cli


def _run(args: argparse.Namespace) -> int:
    from experiments.tabular import compare

    cfg = cli.load_config(compare.TabularConfig, args)
    rows = compare.run(cfg)
    print("Q♯ guidance vs the exact KL-regularized optimum π* on random token trees")
    print("(J = E[r] − η·KL(π‖π_ref); π_Q♯ and π_CD use the exact return distributions)\n")
    print(compare.format_table(rows))
    print("\nTheorem 4.1 tree: a sure 0.5 vs a 10% chance of 1 — CD follows the mean, Q♯ the optimum\n")
    print(compare.counterexample_table())
    worst = max(r.max_policy_error for r in rows)
    print(f"\nmax |π_Q♯ − π*| over all trees: {worst:.2e}")
    if cfg.plot:
        print(f"plot: {compare.plot_counterexample(cfg.plot)}")
    return 0


main = cli.config_program("python -m experiments.tabular", __doc__, "TabularConfig", "etas=[0.1] depths=[3]", _run)

if __name__ == "__main__":
    sys.exit(main())
