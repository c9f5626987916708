"""``qsharp`` console entry point. Every command that takes a config takes it the same way:
``qsharp <command> [CONFIG.yaml] [key=value ...]`` (the file is optional; overrides win).

User errors (a bad config, a missing run directory) print one line on stderr and exit with 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from qsharp_jax import config
from qsharp_jax.lock import RunLockedError

T = TypeVar("T")


def add_config_arguments(parser: argparse.ArgumentParser, cls_name: str, example: str) -> None:
    """The one config convention: an optional YAML file, then ``key=value`` overrides."""
    parser.add_argument("config", nargs="?", help=f"YAML file with {cls_name} fields")
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")


def load_config(cls: type[T], args: argparse.Namespace) -> T:
    """``cls`` from the parsed config arguments. A first positional that looks like ``key=value``
    (and is not a file) is an override, not a config file."""
    path, overrides = args.config, list(args.overrides)
    if path is not None and "=" in path and not Path(path).exists():
        path, overrides = None, [path, *overrides]
    return config.load(cls, path, overrides)


# What a user can cause and fix (a bad config or argument, a file or directory, a run that diverged,
# a run directory in use): one line on stderr, exit code 2. Anything else is a bug: a traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError, RunLockedError)


def run_command(parser: argparse.ArgumentParser, command: Callable[[argparse.Namespace], int],
                argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run ``command``; a user error ends as one line on stderr, exit code 2."""
    args = parser.parse_args(argv)
    try:
        return command(args)
    except USER_ERRORS as e:
        command_name = getattr(args, "command", None)
        message = " ".join(str(e).split()) or type(e).__name__
        parser.exit(2, f"{parser.prog}{' ' + command_name if command_name else ''}: error: {message}\n")


def config_program(prog: str, description: str | None, cls_name: str, example: str,
                   command: Callable[[argparse.Namespace], int]) -> Callable[[Sequence[str] | None], int]:
    """``main(argv)`` of a one-command program that takes a config the ``qsharp`` way (an
    experiment's ``python -m experiments.<name> [CONFIG] [key=value ...]``)."""

    def main(argv: Sequence[str] | None = None) -> int:
        parser = argparse.ArgumentParser(prog=prog, description=description,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_arguments(parser, cls_name, example)
        return run_command(parser, command, argv)

    return main


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """Multi-host flags (one process per host; each falls back to its environment variable, and
    with none set a single process runs): see :mod:`qsharp_jax.distributed`."""
    group = parser.add_argument_group("multi-host (one process per host)")
    group.add_argument("--coordinator-address", help="HOST:PORT of process 0 (else $JAX_COORDINATOR_ADDRESS)")
    group.add_argument("--num-processes", type=int, help="processes in the job (else $JAX_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, help="this process, 0 .. N-1 (else $JAX_PROCESS_ID)")
    group.add_argument("--init-timeout", type=int, default=300, help="seconds to wait for the other processes")


def _mesh_argument(text: str) -> tuple[int, int, int]:
    try:
        mesh = tuple(int(x) for x in text.split(","))
    except ValueError:
        mesh = ()
    if len(mesh) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not DATA,FSDP,TENSOR (three integers, -1 for the rest), "
                                         "e.g. 2,4,1 or -1,1,1")
    return mesh


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """A trained run to read (``qsharp eval``/``sample``), on one host or every host of a pod."""
    parser.add_argument("run_dir")
    parser.add_argument("--mesh", type=_mesh_argument, help="DATA,FSDP,TENSOR devices to lay the models out on, "
                        "whatever the run trained on (default: one device; on a pod every device as data)")
    add_distributed_arguments(parser)


def _start_processes(args: argparse.Namespace) -> None:
    from qsharp_jax import distributed

    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                           timeout_s=args.init_timeout)


def _train(args: argparse.Namespace) -> int:
    from qsharp_jax import distributed, runs

    _start_processes(args)
    cfg = load_config(runs.RunConfig, args)
    history = runs.start_or_resume(cfg)
    if not distributed.is_main():  # process 0 reports for the job
        return 0
    print(f"{'iteration':>9} {'examples':>8} {'fit loss':>9} {'guided reward':>13} {'π_ref reward':>12} {'KL':>7}")
    for h in history:
        fit_loss = "-" if h["fit_loss"] is None else f"{h['fit_loss']:.4f}"  # None: nothing to fit
        print(f"{h['iteration']:>9} {h['examples']:>8} {fit_loss:>9} {h['guided_reward']:>13.3f} "
              f"{h['ref_reward']:>12.3f} {h['guided_kl']:>7.3f}")
    print(f"run directory: {cfg.run_dir} (metrics.jsonl, tensorboard/, checkpoints/, data/)")
    print(f"plot: {runs.plot_run(cfg.run_dir)}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from qsharp_jax import distributed, runs

    _start_processes(args)
    metrics = runs.evaluate_run(args.run_dir, mesh=args.mesh)
    if distributed.is_main():  # every process computes; process 0 reports
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    return 0


def _sample(args: argparse.Namespace) -> int:
    from qsharp_jax import distributed, runs

    _start_processes(args)
    prompts, tokens, rewards = runs.sample_run(args.run_dir, args.num, args.seed, mesh=args.mesh)
    if not distributed.is_main():  # every process samples; process 0 prints
        return 0
    for p, t, r in zip(prompts, tokens, rewards):
        print(f"prompt {p.tolist()} -> {t.tolist()}  reward {float(r):g}")
    return 0


def _eval_math(args: argparse.Namespace) -> int:
    import json

    from qsharp_jax import distributed, eval_math

    _start_processes(args)
    cfg = config.load(eval_math.EvalMathConfig, None, [f"run={json.dumps(args.run)}", *args.overrides])
    results = eval_math.evaluate_math(cfg)
    if not distributed.is_main():  # every process samples; process 0 writes and reports
        return 0
    out = cfg.out or str(Path(results["run"]) / "eval")
    print(eval_math.markdown(results), end="")
    print(f"written: {out}/eval.json, eval.md, samples.jsonl{', kl_sweep.png' if results['sweep'] else ''}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    import os

    # before JAX starts: N fake CPU devices stand in for a pod's accelerators, and XLA:CPU schedules
    # for memory as accelerators do under pressure (under its default, ordered for concurrency, a
    # remat'd gradient held as much as a plain one: 8 blocks 434 vs 426 MB; memory-ordered 40 vs 295)
    flags = [os.environ.get("XLA_FLAGS", ""), "--xla_cpu_enable_concurrency_optimized_scheduler=false"]
    if args.cpu_devices:
        os.environ["JAX_PLATFORMS"] = "cpu"
        flags.append(f"--xla_force_host_platform_device_count={args.cpu_devices}")
    os.environ["XLA_FLAGS"] = " ".join(flags).strip()
    from qsharp_jax import plan, runs

    # `device_memory=16GiB` may come with the config overrides (DESIGN.md's form of --device-memory)
    device_memory = args.device_memory * 2**30
    for text in [o for o in args.overrides if o.startswith("device_memory=")]:
        args.overrides.remove(text)
        device_memory = plan.parse_bytes(text.partition("=")[2])
    cfg = load_config(runs.RunConfig, args)
    result = plan.plan(cfg, compile=not args.no_compile)
    print(plan.table(result["summary"], device_memory or None))
    if device_memory:
        plan.check_fits(result["summary"], device_memory, cfg)
    print(plan.summary_line(result["summary"]))
    return 0


def _prepare_gsm8k(args: argparse.Namespace) -> int:
    from qsharp_jax.tasks.math_data import prepare_gsm8k

    print(f"prepared: {prepare_gsm8k(args.data_dir, args.train, args.test)} (train_file: tfds:gsm8k/train, "
          f"math.tfds_data_dir: {args.data_dir})")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from qsharp_jax import runs

    print(runs.plot_run(args.run_dir, args.out))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qsharp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run or resume Algorithm 1 (collect, fit, evaluate, checkpoint)")
    add_config_arguments(train, "RunConfig", "algorithm.eta=0.05 run_dir=runs/x")
    add_distributed_arguments(train)
    train.set_defaults(func=_train)
    ev = sub.add_parser("eval", help="evaluate a run's newest checkpoint (guided and π_ref)")
    add_run_arguments(ev)
    ev.set_defaults(func=_eval)
    sample = sub.add_parser("sample", help="print guided samples from a run's newest checkpoint")
    add_run_arguments(sample)
    sample.add_argument("--num", type=int, default=8, help="how many evaluation prompts to sample (>= 1)")
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=_sample)
    em = sub.add_parser("eval-math", help="Table 1 of a math run: π_ref, CD and Q♯ sampled and scored on problems")
    em.add_argument("run", help="a run directory of `qsharp train` (task: math), or its config YAML")
    em.add_argument("overrides", nargs="*", help="EvalMathConfig key=value, e.g. test_file=data/math500.jsonl "
                                                 "samples=8 sweep=[0.05,0.1,0.2] mesh=[-1,1,4]")
    add_distributed_arguments(em)
    em.set_defaults(func=_eval_math)
    pl = sub.add_parser("plan", help="dry run at full size without weights: lower and compile the rollout and the "
                                     "train step, print memory per device")
    add_config_arguments(pl, "RunConfig", "mesh=[-1,1,8] algorithm.rollout_batch=256")
    pl.add_argument("--cpu-devices", type=int, default=0, help="fake this many CPU devices (a pod's count) when "
                                                                "planning on a machine without accelerators")
    pl.add_argument("--device-memory", type=float, default=0.0, help="GiB per device: fail if the plan needs more "
                                                                      "(also as the override device_memory=16GiB)")
    pl.add_argument("--no-compile", action="store_true", help="lower only (seconds; no memory analysis)")
    pl.set_defaults(func=_plan)
    gsm = sub.add_parser("prepare-gsm8k", help="prepare tensorflow-datasets' gsm8k from GSM8K's own JSONL files")
    gsm.add_argument("--train", required=True, help="GSM8K's train.jsonl")
    gsm.add_argument("--test", required=True, help="GSM8K's test.jsonl")
    gsm.add_argument("--data-dir", required=True, help="the tensorflow-datasets data directory to write")
    gsm.set_defaults(func=_prepare_gsm8k)
    plot = sub.add_parser("plot", help="draw a run's learning curves to PNG")
    plot.add_argument("run_dir")
    plot.add_argument("--out", help="PNG path (default: RUN_DIR/learning_curves.png)")
    plot.set_defaults(func=_plot)
    return run_command(parser, lambda args: args.func(args), argv)


if __name__ == "__main__":
    sys.exit(main())
