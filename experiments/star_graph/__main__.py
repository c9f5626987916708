"""``python -m experiments.star_graph [CONFIG.yaml] [key=value ...]``: the six-method comparison
(``make demo`` runs demo.yaml). Prints the table; results go to the config's run_dir."""

import argparse
import sys
from pathlib import Path

from qsharp_jax import cli


def _run(args: argparse.Namespace) -> int:
    from experiments.star_graph import harness

    cfg = cli.load_config(harness.StarGraphConfig, args)
    results = harness.run(cfg)
    print()
    print(harness.write_table(results, Path(cfg.run_dir) / "results.md"))
    total = sum(results["seconds"].values())
    print(f"{total / 60:.1f} min (wall clock, all methods); run directory: {cfg.run_dir} "
          "(results.json, results.md, accuracy.png)")
    return 0


main = cli.config_program("python -m experiments.star_graph", __doc__, "StarGraphConfig", "graph.degree=5 run_dir=runs/g55", _run)

if __name__ == "__main__":
    sys.exit(main())
