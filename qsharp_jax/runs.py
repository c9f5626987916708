"""A run directory of ``qsharp train``: its config, and what can be done with it afterwards.

``RunConfig`` is everything one run needs (task, models, Algorithm 1's settings, where to write);
:func:`start_or_resume` builds it and runs Algorithm 1 in ``run_dir``; :func:`load_run`,
:func:`evaluate_run`, :func:`sample_run` and :func:`plot_run` read a run back (``qsharp eval``,
``qsharp sample``, ``qsharp plot``).

A run directory holds ``config.json`` (the whole RunConfig), ``data/`` (the aggregated rollouts),
``checkpoints/``, ``metrics.jsonl`` (one line per iteration), ``tensorboard/`` and, after a plot,
``learning_curves.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import jax
import numpy as np

from qsharp_jax import algorithm, distributed, rollout
from qsharp_jax import config as config_lib
from qsharp_jax import sharding as sharding_lib
from qsharp_jax.lock import RunLock
from qsharp_jax.models.build import ModelSpec, build_reference, build_value
from qsharp_jax.models.transformer import Transformer
from qsharp_jax.models.value import HeadConfig, ValueModel
from qsharp_jax.storage import aside_name, atomic_write, check_local_path
from qsharp_jax.tasks import TASKS, Task, make_task
from qsharp_jax.tasks.math_task import MathTaskConfig
from qsharp_jax.train import TrainState

_GUIDANCE_LABEL = {"qsharp": "Q♯", "cd": "CD", "bernoulli": "Q♯ (Bernoulli)"}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything ``qsharp train`` needs.

    Fields:
      run_dir: where the run lives (created; a run there is resumed).
      task: a registered task name (:data:`qsharp_jax.tasks.TASKS`).
      reference: π_ref (a local Hugging Face directory, or a fresh model's sizes).
      value: the value model's backbone.
      head: the value head (kind, atoms, V- or Q-type).
      algorithm: Algorithm 1's settings.
      mesh: devices as a (data, fsdp, tensor) mesh, -1 taking what is left; None: one device.
      math: the math task's data, tokenizer and answer checking (read when ``task`` is ``math``).
    """

    run_dir: str = "runs/planted_token"
    task: str = "planted_token"
    reference: ModelSpec = ModelSpec(seed=0)
    value: ModelSpec = ModelSpec(seed=1)
    head: HeadConfig = HeadConfig()
    algorithm: algorithm.AlgorithmConfig = algorithm.AlgorithmConfig()
    mesh: tuple[int, int, int] | None = None
    math: MathTaskConfig = MathTaskConfig()

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; available: {', '.join(sorted(TASKS))}")
        check_local_path(self.run_dir, "run_dir")


def build(cfg: RunConfig) -> tuple[Task, Transformer, ValueModel]:
    """The task, π_ref and the (fresh) value model of ``cfg``, checked against each other."""
    task = make_task(cfg.task, cfg)
    ref = build_reference(cfg.reference)
    value = build_value(cfg.value, cfg.head)
    algorithm.check_setup(cfg.algorithm, task, ref, value)
    return task, ref, value


# RunConfig fields free to change on resume (they change nothing computed): the directory's
# spelling (a moved run, a relative path), the mesh (checkpoints reshard on load; sums change in
# their last float bits) and the algorithm's own.
RESUMABLE_FIELDS = ("run_dir", "mesh", *(f"algorithm.{f}" for f in algorithm.RESUMABLE_FIELDS))


def start_or_resume(cfg: RunConfig, *, progress: bool = True) -> list[dict[str, float]]:
    """Build the task and models of ``cfg`` and run (or resume) Algorithm 1 in ``cfg.run_dir``;
    returns every iteration's metrics.

    Everything is checked before the run directory is created or changed: the config, the task,
    the models against each other and the task, the mesh against the devices, that ``run_dir`` can
    be written. The run holds :class:`~qsharp_jax.lock.RunLock` while it writes. The full config
    is kept as ``run_dir/config.json``; resuming with a different one is refused with the fields
    that differ (:data:`RESUMABLE_FIELDS` may change), unless no iteration was completed yet: then
    the partial run is moved to ``run_dir/abandoned-<time>/`` and the run restarts.
    """
    run_dir = Path(cfg.run_dir)
    config = config_lib.as_json(cfg)
    task, ref, value = build(cfg)
    mesh = run_mesh(cfg)
    algorithm.check_mesh(cfg.algorithm, mesh)
    distributed.check_same_everywhere("the config", config)
    distributed.on_main("run/writable", lambda: _make_writable(run_dir))
    distributed.check_shared_directory(run_dir)
    with contextlib.ExitStack() as stack:
        stack.callback(close_task, task)
        # on a pod process 0 holds the lock and writes what is written once
        distributed.on_main("run/locked", lambda: stack.enter_context(RunLock(run_dir)))
        saved_file = run_dir / "config.json"
        if saved_file.exists():
            saved = _read_json(saved_file)
            defaults = config_lib.as_json(RunConfig())
            if config_lib.differences(saved, config, RESUMABLE_FIELDS, defaults):
                if _completed_iterations(run_dir):
                    config_lib.check_same(saved, config, str(run_dir), RESUMABLE_FIELDS, defaults)
                distributed.barrier("run/config-read")  # every process has read it before it moves
                distributed.on_main("run/abandoned", lambda: _abandon(run_dir))
        distributed.on_main("run/config-written", lambda: atomic_write(
            saved_file, lambda f: f.write(json.dumps(config, indent=1).encode())))
        return algorithm.run(cfg.algorithm, task, ref, value, run_dir, progress=progress, mesh=mesh, lock=False)


def run_mesh(cfg: RunConfig):
    """The run's mesh: :func:`resolve_mesh` of ``cfg.mesh``."""
    return resolve_mesh(cfg.mesh)


def resolve_mesh(mesh: tuple[int, int, int] | None):
    """The devices of ``mesh`` (data, fsdp, tensor); None: one device for a single process and
    every device of the job, as ``data`` shards, for several processes (a pod)."""
    if mesh is not None:
        return sharding_lib.make_mesh(*mesh)
    return sharding_lib.make_mesh(-1, 1, 1) if jax.process_count() > 1 else None


def close_task(task: Task) -> None:
    """Stop what a task runs beside the driver (the math task's answer-checking processes)."""
    getattr(task, "close", lambda: None)()


def _make_writable(run_dir: Path) -> None:
    """Create ``run_dir`` (or refuse, naming why) before any of the run's files."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run_dir {run_dir} is a file, not a directory; choose another run_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=run_dir).close()
    except OSError as error:
        raise ValueError(f"run_dir {run_dir} cannot be written ({error.strerror or error}); choose another "
                         "run_dir or fix its permissions") from None


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{file} cannot be read ({error}); it is not a config.json written by qsharp train") from None


def _completed_iterations(run_dir: Path) -> int:
    """Iterations with a checkpoint (or a metrics line): what a restart would lose."""
    steps = [p for p in (run_dir / "checkpoints").glob("*") if p.name.isdigit()]
    metrics = run_dir / "metrics.jsonl"
    return max(len(steps), len(metrics.read_text().splitlines()) if metrics.exists() else 0)


def _abandon(run_dir: Path) -> None:
    """Move a run that never completed an iteration aside (kept, not deleted) to start afresh."""
    target = run_dir / aside_name("abandoned")
    target.mkdir()
    for name in ("config.json", "data", "checkpoints", "checkpoints-corrupt", "tensorboard", "metrics.jsonl"):
        if (run_dir / name).exists():
            shutil.move(run_dir / name, target / name)
    warnings.warn(f"{run_dir} had completed no iteration under its saved config; that partial run was moved to "
                  f"{target} and the run restarts with the new config", stacklevel=3)


def load_run(run_dir: str | Path, *, mesh: tuple[int, int, int] | None = None
             ) -> tuple[RunConfig, Task, Transformer, TrainState, int]:
    """A trained run: its config, task, π_ref, and the newest checkpoint's train state and iteration.
    ``mesh`` (data, fsdp, tensor): lay π_ref and the state out on these devices, whatever mesh the
    run was trained on (default: :func:`resolve_mesh`'s, one device in a single process)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir}/config.json not found: is {run_dir} a run directory of `qsharp train`?")
    cfg = config_lib.load(RunConfig, run_dir / "config.json")
    task, ref, value = build(cfg)
    devices = resolve_mesh(mesh)
    state, meta = algorithm.latest_state(cfg.algorithm, value, run_dir, mesh=devices)
    if devices is not None:
        ref = sharding_lib.place(ref, devices)
    return cfg, task, ref, state, meta["iteration"]


def evaluate_run(run_dir: str | Path, *, mesh: tuple[int, int, int] | None = None) -> dict[str, float]:
    """Evaluate the newest checkpoint of a run (guided policy and π_ref: reward and KL), on the
    devices of ``mesh`` (as :func:`load_run`; on a pod every process calls it)."""
    cfg, task, ref, state, iteration = load_run(run_dir, mesh=mesh)
    try:
        return {"iteration": iteration, **algorithm.evaluate(cfg.algorithm, task, ref, state, iteration)}
    finally:
        close_task(task)


def sample_run(run_dir: str | Path, num: int = 8, seed: int = 0, *, mesh: tuple[int, int, int] | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``num`` guided completions of the run's evaluation prompts: (prompts, tokens, rewards), on
    the devices of ``mesh`` (as :func:`load_run`)."""
    if num < 1:
        raise ValueError(f"num must be >= 1 (how many evaluation prompts to sample), got {num}")
    cfg, task, ref, state, _ = load_run(run_dir, mesh=mesh)
    try:
        prompts, mask = task.eval_prompts()
        if num > len(prompts):
            raise ValueError(f"num={num} exceeds the task's {len(prompts)} evaluation prompts; ask for at most "
                             f"{len(prompts)}")
        prompts, mask = prompts[:num], mask[:num]
        out, rewards = rollout.generate_chunked(
            ref, prompts, mask, key=jax.random.key(seed), batch=cfg.algorithm.rollout_batch, name="sample",
            score=lambda rows, part: task.reward(prompts[rows], part.tokens, part.mask),
            **algorithm.sampling_settings(cfg.algorithm, task), **algorithm.guidance_args(cfg.algorithm, state))
        return prompts, out.tokens, rewards
    finally:
        close_task(task)


def _guidance_label(run_dir: Path) -> str:
    try:
        guidance = json.loads((run_dir / "config.json").read_text())["algorithm"]["guidance"]
    except (OSError, KeyError, ValueError):
        return "value"
    return _GUIDANCE_LABEL.get(guidance, guidance)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Reward (guided vs π_ref), KL to π_ref and value-fit loss per iteration; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    file = run_dir / "metrics.jsonl"
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: is {run_dir} a run directory of `qsharp train`?")
    history = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    if not history:
        raise ValueError(f"{file} has no iterations yet")
    it = [h["iteration"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    guidance = _guidance_label(run_dir)
    axes[0].plot(it, [h["guided_reward"] for h in history], "o-", label=f"{guidance}-guided")
    axes[0].plot(it, [h["ref_reward"] for h in history], "s--", color="C7", label="π_ref")
    axes[0].set(title="evaluation reward", xlabel="iteration", ylim=(-0.02, 1.02))
    axes[0].legend()
    axes[1].plot(it, [h["guided_kl"] for h in history], "o-")
    axes[1].set(title="KL(π ‖ π_ref) per sequence", xlabel="iteration")
    axes[2].plot(it, [np.nan if h["fit_loss"] is None else h["fit_loss"] for h in history], "o-", color="C3")
    axes[2].set(title="value-model fit loss (last epoch)", xlabel="iteration")
    for ax in axes:
        ax.set_xticks(it)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "learning_curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
