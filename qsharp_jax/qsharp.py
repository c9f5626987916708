"""Algorithm 1 of Q♯ as one resumable driver: collect → aggregate → fit → evaluate → checkpoint.

Metrics go to ``run_dir/metrics.jsonl`` (one line per iteration) and TensorBoard
(``run_dir/tensorboard``); ``qsharp plot RUN_DIR`` draws them.

Iteration i: sample prompts, draw a switch time h per sample uniformly over the response, roll in
with the current guided policy for h tokens (iteration 0: π_ref throughout) and roll out with
π_ref, label with the task's reward, append to the on-disk aggregate, fit the value model on all
data so far, evaluate the guided policy and π_ref, and checkpoint.

Everything an iteration draws is keyed by (seed, iteration), so a run that is killed at any point
and restarted with the same command continues from its last complete step and ends exactly where
an uninterrupted run would: data already on disk is reused, the train state comes from the
newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tensorboardX import SummaryWriter
from tqdm import tqdm

from qsharp_jax import rollout
from qsharp_jax import sharding as sharding_lib
from qsharp_jax.checkpoint import Checkpoints
from qsharp_jax.data.storage import RolloutStore, atomic_write
from qsharp_jax.models.build import ModelSpec, build_reference, build_value
from qsharp_jax.models.transformer import Transformer
from qsharp_jax.models.value import HeadConfig, ValueModel
from qsharp_jax.train import (
    OptimizerConfig,
    TrainState,
    bellman_value_loss,
    init_state,
    make_optimizer,
    make_train_epoch,
    reference_inputs,
    state_shardings,
    value_loss,
)


class Task(Protocol):
    """What Algorithm 1 needs from a task. Prompts are left padded to one fixed length."""

    eos_id: int | None
    pad_id: int

    def sample_prompts(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` training prompts: ids int32 ``[n, P]`` and mask bool ``[n, P]``."""

    def eval_prompts(self) -> tuple[np.ndarray, np.ndarray]:
        """The fixed evaluation prompts."""

    def reward(self, prompts: np.ndarray, completions: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """float ``[n]`` in [0, 1] for completions ``[n, N]`` (mask False after EOS)."""


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
    iterations: int = 3
    prompts_per_iteration: int = 64
    samples_per_prompt: int = 4
    max_new_tokens: int = 16
    eta: float = 0.1
    top_k: int = 10
    temperature: float = 1.0
    guidance: str = "qsharp"  # qsharp | cd | bernoulli
    loss: str = "categorical"  # categorical | bernoulli | mse | categorical_bellman
    epochs: int = 2
    batch_size: int = 32
    warm_start: bool = True  # keep fitting one value model (False: re-initialize every iteration)
    drop_no_variation: bool = False  # drop prompts whose samples all got the same reward
    seed: int = 0
    keep_checkpoints: int = 2
    # rows per rollout.generate call: the KV caches of all of an iteration's rollouts at once can
    # exceed memory (π_ref's and the value model's, and k candidates per row with V-type guidance)
    rollout_batch: int = 4096
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-3, weight_decay=0.0)

    def __post_init__(self):
        if self.rollout_batch < 1:
            raise ValueError(f"rollout_batch must be >= 1 (rows per generate call), got {self.rollout_batch}")


def _records(prompts, prompt_mask, out: rollout.Rollout, switch: np.ndarray, rewards, group) -> dict[str, np.ndarray]:
    """Value-training records: fit the prefixes ending at the last roll-in token or later."""
    tokens = np.concatenate([prompts, np.asarray(out.tokens)], axis=1)
    attention = np.concatenate([prompt_mask, np.asarray(out.mask)], axis=1)
    p = prompts.shape[1]
    position = np.arange(tokens.shape[1])[None, :]
    loss_mask = (position >= p - 1 + switch[:, None]) & attention
    return {"tokens": tokens.astype(np.int32), "attention_mask": attention, "loss_mask": loss_mask,
            "rewards": rewards.astype(np.float32), "group": group.astype(np.int64)}


def _check_rewards(rewards: Any, n: int) -> np.ndarray:
    rewards = np.asarray(rewards, np.float64)
    if rewards.shape != (n,):
        raise ValueError(f"reward_fn returned shape {rewards.shape}, expected ({n},)")
    if not np.all(np.isfinite(rewards)):
        raise ValueError(f"reward_fn returned non-finite rewards: {rewards[~np.isfinite(rewards)][:5]}")
    if rewards.min() < 0 or rewards.max() > 1:
        raise ValueError(f"rewards must lie in [0, 1] (the atom range); got {rewards.min()} .. {rewards.max()}")
    return rewards


def run(
    cfg: AlgorithmConfig, task: Task, ref: Transformer, value: ValueModel, run_dir: str | Path, *,
    progress: bool = True, mesh: Mesh | None = None,
) -> list[dict[str, float]]:
    """Run (or resume) Algorithm 1 in ``run_dir``; returns the metrics of every iteration.

    With a ``mesh``, π_ref and the value model are placed by their logical-axis shardings, the
    train step shards parameters, optimizer state and batches, and rollouts run on the mesh.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # everything but the iteration count must match a run being resumed (extending a run is fine)
    config = json.loads(json.dumps(dataclasses.asdict(dataclasses.replace(cfg, iterations=0))))
    store = RolloutStore(run_dir / "data")
    checkpoints = Checkpoints(run_dir / "checkpoints", keep=cfg.keep_checkpoints)
    optimizer = make_optimizer(cfg.optimizer)
    fresh = init_state(value, optimizer, jax.random.key(cfg.seed))
    if mesh is not None:
        ref = sharding_lib.place(ref, mesh)
        fresh = jax.device_put(fresh, state_shardings(fresh, mesh))
    if cfg.loss == "categorical_bellman":
        ref_graph, extra = nnx.split(ref)
        top_k = None if value.head_cfg.q_type else cfg.top_k

        def prepare(ref_state, batch):  # π_ref is frozen: what the targets need from it joins each batch
            return {**batch, **reference_inputs(nnx.merge(ref_graph, ref_state), batch["tokens"],
                                                batch["attention_mask"], top_k=top_k)}

        train_epoch = make_train_epoch(bellman_value_loss, optimizer, mesh, fresh, prepare=prepare)
    else:
        train_epoch = make_train_epoch(lambda m, b: value_loss(m, b, kind=cfg.loss), optimizer, mesh, fresh)
        extra = None

    restored = checkpoints.restore(fresh, config)
    state, history = (restored[0], restored[1]["history"]) if restored else (fresh, [])
    start = len(history)
    for iteration in tqdm(range(start, cfg.iterations), desc="Q♯ iterations", disable=not progress, initial=start,
                          total=cfg.iterations):
        if iteration not in store.iterations():
            store.append(iteration, _collect(cfg, task, ref, state, iteration))
        if not cfg.warm_start:  # a copy: the train epoch donates (consumes) its input state
            state = jax.tree.map(jnp.copy, fresh)
        state, fit = _fit(cfg, state, train_epoch, store.load(), iteration, progress, extra)
        metrics = {"iteration": iteration, "examples": len(store), **fit, **_evaluate(cfg, task, ref, state, iteration)}
        history.append(metrics)
        with SummaryWriter(str(run_dir / "tensorboard")) as writer:
            for name, value_ in metrics.items():
                if name != "iteration" and np.isfinite(value_):  # NaN: a skipped fit
                    writer.add_scalar(name, value_, iteration)
        checkpoints.save(iteration, state, {"iteration": iteration, "config": config, "history": history})
        atomic_write(run_dir / "metrics.jsonl", lambda f: f.write("".join(json.dumps(m) + "\n" for m in history).encode()))
    return history


def _sampling(cfg: AlgorithmConfig, task: Task) -> dict[str, Any]:
    """Decoding settings shared by collection, evaluation and sampling."""
    return dict(max_new_tokens=cfg.max_new_tokens, top_k=cfg.top_k, temperature=cfg.temperature,
                eos_id=task.eos_id, pad_id=task.pad_id)


def _generate(cfg: AlgorithmConfig, ref: Transformer, prompts, mask, key: jax.Array, **kwargs) -> rollout.Rollout:
    """``rollout.generate`` over at most ``cfg.rollout_batch`` rows per call (chunk i samples with
    ``fold_in(key, i)``; a single chunk with ``key`` itself). The last chunk is padded with copies of
    the last row to the same shape, so all chunks share one compilation (fields then numpy arrays)."""
    n, size = len(prompts), cfg.rollout_batch
    if n <= size:
        return rollout.generate(ref, prompts, mask, key=key, **kwargs)
    outs = []
    for i, start in enumerate(range(0, n, size)):
        rows = np.minimum(np.arange(start, start + size), n - 1)
        chunk = {k: (v[rows] if k == "switch_time" else v) for k, v in kwargs.items()}
        out = rollout.generate(ref, prompts[rows], mask[rows], key=jax.random.fold_in(key, i), **chunk)
        outs.append(jax.tree.map(lambda x, m=min(size, n - start): np.asarray(x)[:m], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def _guided(cfg: AlgorithmConfig, state: TrainState) -> dict[str, Any]:
    """The guidance arguments of ``rollout.generate`` for the current value model."""
    return dict(value_model=state.model(), guidance=cfg.guidance, eta=cfg.eta)


def _collect(cfg: AlgorithmConfig, task: Task, ref: Transformer, state: TrainState, iteration: int):
    rng = np.random.default_rng([cfg.seed, iteration, 0])
    prompts, mask = task.sample_prompts(rng, cfg.prompts_per_iteration)
    group = iteration * cfg.prompts_per_iteration + np.arange(len(prompts))
    prompts, mask, group = (np.repeat(x, cfg.samples_per_prompt, axis=0) for x in (prompts, mask, group))
    switch = rng.integers(0, cfg.max_new_tokens, size=len(prompts))  # uniform over the response
    guided = {} if iteration == 0 else _guided(cfg, state)  # iteration 0 rolls in with π_ref
    out = _generate(cfg, ref, prompts, mask, jax.random.fold_in(jax.random.key(cfg.seed), iteration),
                    switch_time=jnp.asarray(switch), **_sampling(cfg, task), **guided)
    rewards = _check_rewards(task.reward(prompts, np.asarray(out.tokens), np.asarray(out.mask)), len(prompts))
    return _records(prompts, mask, out, switch, rewards, group)


def _fit(cfg, state: TrainState, train_epoch, data: dict[str, np.ndarray], iteration: int, progress: bool,
         extra=None, chunk: int = 200):
    if cfg.drop_no_variation:
        groups, inverse = np.unique(data["group"], return_inverse=True)
        lo = np.full(len(groups), np.inf)
        hi = np.full(len(groups), -np.inf)
        np.minimum.at(lo, inverse, data["rewards"])
        np.maximum.at(hi, inverse, data["rewards"])
        keep = (hi > lo)[inverse]
        data = {k: v[keep] for k, v in data.items()}
    n = len(data["rewards"])
    if n == 0 or np.all(data["rewards"] == data["rewards"][0]):
        warnings.warn(f"iteration {iteration}: all {n} rewards are identical; nothing to learn, value model kept",
                      stacklevel=2)
        return state, {"fit_examples": n, "fit_loss": float("nan"), "fit_explained_variance": float("nan")}
    rng = np.random.default_rng([cfg.seed, iteration, 1])
    batches = -(-n // cfg.batch_size)
    keys = ("tokens", "attention_mask", "loss_mask", "rewards")
    bar = tqdm(total=cfg.epochs * batches, desc=f"fit {iteration}", disable=not progress, leave=False)
    for _ in range(cfg.epochs):
        epoch = []
        order = rng.permutation(n)
        order = np.concatenate([order, np.full(batches * cfg.batch_size - n, -1)])  # pad: static shapes
        order = order.reshape(batches, cfg.batch_size)
        # scans of at most `chunk` steps: no Python between steps, a live progress bar
        for start in range(0, batches, chunk):
            index = order[start : start + chunk]
            steps = {k: data[k][np.maximum(index, 0)] for k in keys}
            steps["loss_mask"] = steps["loss_mask"] & (index >= 0)[:, :, None]  # padding rows fit nothing
            state, metrics = train_epoch(state, {k: jnp.asarray(v) for k, v in steps.items()}, extra)
            epoch.append(metrics)
            bar.update(len(index))
            bar.set_postfix(loss=f"{float(metrics['loss'][-1]):.4f}")
    bar.close()
    # last epoch's means (weighted by batches: padding rows only shrink the last one)
    mean = lambda name: float(np.mean(np.concatenate([np.asarray(m[name]) for m in epoch])))  # noqa: E731
    return state, {"fit_examples": n, "fit_loss": mean("loss"), "fit_explained_variance": mean("explained_variance")}


def _evaluate(cfg: AlgorithmConfig, task: Task, ref: Transformer, state: TrainState, iteration: int) -> dict[str, float]:
    prompts, mask = task.eval_prompts()
    key = jax.random.fold_in(jax.random.key(cfg.seed + 1), iteration)
    results = {}
    for name, extra in (("ref", {}), ("guided", _guided(cfg, state))):
        out = _generate(cfg, ref, prompts, mask, key, **_sampling(cfg, task), **extra)
        rewards = _check_rewards(task.reward(prompts, np.asarray(out.tokens), np.asarray(out.mask)), len(prompts))
        results[f"{name}_reward"] = float(rewards.mean())
        results[f"{name}_kl"] = float(np.asarray(out.kl).mean())
    return results


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything ``qsharp train`` needs: task, models, Algorithm 1 settings, run directory."""

    run_dir: str = "runs/planted_token"
    task: str = "planted_token"
    reference: ModelSpec = ModelSpec(seed=0)
    value: ModelSpec = ModelSpec(seed=1)
    head: HeadConfig = HeadConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    # devices: None = one device; else a (data, fsdp, tensor) mesh, -1 taking what is left
    mesh: tuple[int, int, int] | None = None


def _build(cfg: TrainConfig) -> tuple[Task, Transformer, ValueModel]:
    from qsharp_jax.tasks import TASKS

    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; available: {sorted(TASKS)}")
    task = TASKS[cfg.task]()
    ref = build_reference(cfg.reference)
    value = build_value(cfg.value, cfg.head)
    if getattr(task, "vocab_size", ref.cfg.vocab_size) != ref.cfg.vocab_size:
        raise ValueError(f"task {cfg.task!r} uses {task.vocab_size} tokens, the reference model has {ref.cfg.vocab_size}")
    return task, ref, value


def train(cfg: TrainConfig, *, progress: bool = True) -> list[dict[str, float]]:
    """Build the task and models of ``cfg`` and run (or resume) Algorithm 1 in ``cfg.run_dir``.

    The full config is kept as ``run_dir/config.json``; resuming with a different one is refused
    with the fields that differ.
    """
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved_file, config = run_dir / "config.json", json.loads(json.dumps(dataclasses.asdict(cfg)))
    if saved_file.exists():
        flat_saved, flat_now = _flatten(json.loads(saved_file.read_text())), _flatten(config)
        extendable = {"algorithm.iterations"}  # running more iterations of the same run is fine
        differ = sorted(k for k in (set(flat_saved) | set(flat_now)) - extendable if flat_saved.get(k) != flat_now.get(k))
        if differ:
            raise ValueError(f"{run_dir} holds a run with another config; fields that differ: {', '.join(differ)}. "
                             "Use a new run_dir, or the saved config.")
    atomic_write(saved_file, lambda f: f.write(json.dumps(config, indent=1).encode()))
    task, ref, value = _build(cfg)
    mesh = None if cfg.mesh is None else sharding_lib.make_mesh(*cfg.mesh)
    return run(cfg.algorithm, task, ref, value, run_dir, progress=progress, mesh=mesh)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def latest_state(cfg: AlgorithmConfig, value: ValueModel, run_dir: str | Path) -> tuple[TrainState, dict[str, Any]]:
    """The newest checkpoint of :func:`run` in ``run_dir`` as a train state of ``value``'s structure,
    and its metadata (``meta["iteration"]``)."""
    template = init_state(value, make_optimizer(cfg.optimizer), jax.random.key(cfg.seed))
    restored = Checkpoints(Path(run_dir) / "checkpoints").restore(template)
    if restored is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints has no checkpoint yet")
    return restored


def load_run(run_dir: str | Path) -> tuple[TrainConfig, Task, Transformer, TrainState, int]:
    """A trained run: its config, task, π_ref, and the newest checkpoint's train state and iteration."""
    from qsharp_jax import config as config_lib

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir}/config.json not found: is {run_dir} a run directory of `qsharp train`?")
    cfg = config_lib.load(TrainConfig, run_dir / "config.json")
    task, ref, value = _build(cfg)
    state, meta = latest_state(cfg.algorithm, value, run_dir)
    return cfg, task, ref, state, meta["iteration"]


def evaluate_run(run_dir: str | Path) -> dict[str, float]:
    """Evaluate the newest checkpoint of a run (guided policy and π_ref: reward and KL)."""
    cfg, task, ref, state, iteration = load_run(run_dir)
    return {"iteration": iteration, **_evaluate(cfg.algorithm, task, ref, state, iteration)}


def sample_run(run_dir: str | Path, num: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``num`` guided completions of the run's evaluation prompts: (prompts, tokens, rewards)."""
    cfg, task, ref, state, _ = load_run(run_dir)
    prompts, mask = task.eval_prompts()
    prompts, mask = prompts[:num], mask[:num]
    out = rollout.generate(ref, prompts, mask, key=jax.random.key(seed), **_sampling(cfg.algorithm, task),
                           **_guided(cfg.algorithm, state))
    tokens = np.asarray(out.tokens)
    return prompts, tokens, task.reward(prompts, tokens, np.asarray(out.mask))
