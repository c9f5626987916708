"""``python -m experiments.math [CONFIG.yaml] [key=value ...]``: the CPU math demo (see demo.py)."""

import sys

from qsharp_jax import cli


def _run(args) -> int:
    from experiments.math import demo

    cfg = cli.load_config(demo.MathDemoConfig, args)
    results = demo.run(cfg)
    demo.print_summary(results, cfg.run_dir)
    return 0


main = cli.config_program("python -m experiments.math", __doc__, "MathDemoConfig", "seed=1 run_dir=runs/math_demo_1",
                          _run)

if __name__ == "__main__":
    sys.exit(main())
