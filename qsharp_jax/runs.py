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

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from qsharp_jax import algorithm, rollout
from qsharp_jax import config as config_lib
from qsharp_jax import sharding as sharding_lib
from qsharp_jax.models.build import ModelSpec, build_reference, build_value
from qsharp_jax.models.transformer import Transformer
from qsharp_jax.models.value import HeadConfig, ValueModel
from qsharp_jax.storage import atomic_write
from qsharp_jax.tasks import TASKS, Task, make_task
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
    """

    run_dir: str = "runs/planted_token"
    task: str = "planted_token"
    reference: ModelSpec = ModelSpec(seed=0)
    value: ModelSpec = ModelSpec(seed=1)
    head: HeadConfig = HeadConfig()
    algorithm: algorithm.AlgorithmConfig = algorithm.AlgorithmConfig()
    mesh: tuple[int, int, int] | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; available: {', '.join(sorted(TASKS))}")


def build(cfg: RunConfig) -> tuple[Task, Transformer, ValueModel]:
    """The task, π_ref and the (fresh) value model of ``cfg``, checked against each other."""
    task = make_task(cfg.task)
    ref = build_reference(cfg.reference)
    value = build_value(cfg.value, cfg.head)
    algorithm.check_setup(cfg.algorithm, task, ref, value)
    return task, ref, value


def start_or_resume(cfg: RunConfig, *, progress: bool = True) -> list[dict[str, float]]:
    """Build the task and models of ``cfg`` and run (or resume) Algorithm 1 in ``cfg.run_dir``;
    returns every iteration's metrics.

    The full config is kept as ``run_dir/config.json``; resuming with a different one is refused
    with the fields that differ (``algorithm.iterations`` may grow: that extends the run).
    """
    run_dir = Path(cfg.run_dir)
    config = config_lib.as_json(cfg)
    saved_file = run_dir / "config.json"
    if saved_file.exists():
        config_lib.check_same(json.loads(saved_file.read_text()), config, str(run_dir),
                              ignore=[f"algorithm.{f}" for f in algorithm.RESUMABLE_FIELDS])
    task, ref, value = build(cfg)
    mesh = None if cfg.mesh is None else sharding_lib.make_mesh(*cfg.mesh)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(saved_file, lambda f: f.write(json.dumps(config, indent=1).encode()))
    return algorithm.run(cfg.algorithm, task, ref, value, run_dir, progress=progress, mesh=mesh)


def load_run(run_dir: str | Path) -> tuple[RunConfig, Task, Transformer, TrainState, int]:
    """A trained run: its config, task, π_ref, and the newest checkpoint's train state and iteration."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir}/config.json not found: is {run_dir} a run directory of `qsharp train`?")
    cfg = config_lib.load(RunConfig, run_dir / "config.json")
    task, ref, value = build(cfg)
    state, meta = algorithm.latest_state(cfg.algorithm, value, run_dir)
    return cfg, task, ref, state, meta["iteration"]


def evaluate_run(run_dir: str | Path) -> dict[str, float]:
    """Evaluate the newest checkpoint of a run (guided policy and π_ref: reward and KL)."""
    cfg, task, ref, state, iteration = load_run(run_dir)
    return {"iteration": iteration, **algorithm.evaluate(cfg.algorithm, task, ref, state, iteration)}


def sample_run(run_dir: str | Path, num: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``num`` guided completions of the run's evaluation prompts: (prompts, tokens, rewards)."""
    cfg, task, ref, state, _ = load_run(run_dir)
    prompts, mask = task.eval_prompts()
    prompts, mask = prompts[:num], mask[:num]
    out = rollout.generate(ref, prompts, mask, key=jax.random.key(seed), **algorithm.sampling_settings(cfg.algorithm, task),
                           **algorithm.guidance_args(cfg.algorithm, state))
    tokens = np.asarray(out.tokens)
    return prompts, tokens, task.reward(prompts, tokens, np.asarray(out.mask))


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
    axes[2].plot(it, [h["fit_loss"] for h in history], "o-", color="C3")
    axes[2].set(title="value-model fit loss (last epoch)", xlabel="iteration")
    for ax in axes:
        ax.set_xticks(it)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "learning_curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
