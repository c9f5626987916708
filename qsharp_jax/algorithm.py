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

import contextlib
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from qsharp_jax import config as config_lib
from qsharp_jax import distributed, failpoints, objectives, packing, rollout
from qsharp_jax import sharding as sharding_lib
from qsharp_jax.checkpoint import Checkpoints
from qsharp_jax.lock import RunLock
from qsharp_jax.models.transformer import Transformer
from qsharp_jax.models.value import ValueModel, check_compatible
from qsharp_jax.storage import RolloutStore, atomic_write
from qsharp_jax.tasks import Task, prompt_rows
from qsharp_jax.train import OptimizerConfig, TrainState, fit, init_state, make_optimizer, make_train_epoch, state_shardings

__all__ = ["AlgorithmConfig", "Task", "check_mesh", "check_setup", "evaluate", "guidance_args", "latest_state", "run", "sampling_settings"]

Guidance = Literal["qsharp", "cd", "bernoulli"]
ValueLoss = Literal["categorical", "bernoulli", "mse", "categorical_bellman"]


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
    """Algorithm 1's settings (the paper's values for its math runs in brackets where it states one).

    Fields:
      iterations: rounds of collect → aggregate → fit → evaluate. A run can be extended later.
      prompts_per_iteration: prompts drawn from the task per round.
      samples_per_prompt: rollouts per prompt (each with its own switch time).
      max_new_tokens: response length bound; switch times are drawn uniformly in [0, max_new_tokens).
      eta: η, the KL coefficient (> 0; small = strong guidance). The official code's flag is 1/η.
      top_k: π_ref's candidates a V-type value model scores, and the final policy's top-k.
      temperature: of the final (guided) policy when sampling (> 0) [0.8].
      top_p: nucleus sampling of the final policy: keep its most likely tokens up to this mass
        (in (0, 1]; 1 = off) [0.9].
      guidance: ``qsharp`` (the optimal offset; categorical head), ``cd`` (the mean return,
        CD/VAS; categorical head) or ``bernoulli`` (Q♯ for 0/1 rewards; Bernoulli head).
      lookahead: d >= 1: a V-type model values each candidate d π_ref steps later (π_ref's most
        likely d − 1 tokens, then its top-k continuations, combined by the Bellman equation of the
        guidance's value; see ``rollout.generate``), for models that learn a value better further
        on; 0: where the candidate stands. ``true`` / ``false`` (configs and run directories written
        when this was a flag) read as 1 / 0.
      loss: the value fit: ``categorical`` (Q♯'s distributional MLE), ``bernoulli``, ``mse``
        (scalar head) or ``categorical_bellman`` (distributional Bellman evaluation of π_ref).
      epochs: passes over all data aggregated so far, per iteration.
      batch_size: examples per optimizer step (packed sequences with ``pack_length``).
      pack_length: tokens per packed sequence of the fit: rows are packed end to end, each kept to
        itself (:mod:`qsharp_jax.packing`), so steps train on no padding; for a V-type value model
        the samples of a prompt share its tokens (encoded once). At least the longest prompt +
        response. 0: one padded row per example. Not with ``categorical_bellman``.
      warm_start: keep fitting one value model (False: re-initialize it every iteration).
      drop_no_variation: fit only prompts whose samples got different rewards.
      seed: every draw is keyed by (seed, iteration, row).
      keep_checkpoints: how many of the newest checkpoints to keep (>= 1).
      rollout_slots: continuous batching: each call's ``rollout_batch`` rows queue for this many
        decoding slots, a finished row's slot taking the next row inside the compiled loop (the
        same tokens as the static loop, less time on rows of uneven length); 0: each call decodes
        its rows together until the longest ends. A multiple of ``samples_per_prompt`` shares
        each prompt's prefill among its samples.
      rollout_batch: rows per ``rollout.generate`` call; lower it when rollouts run out of memory
        (the KV caches of π_ref and the value model, k candidates per row with V-type guidance,
        (lookahead − 1 + k)·k more tokens per row with ``lookahead``).
      optimizer: the value model's optimizer.
    """

    iterations: int = 3
    prompts_per_iteration: int = 64
    samples_per_prompt: int = 4
    max_new_tokens: int = 16
    eta: float = 0.1
    top_k: int = 10
    temperature: float = 1.0
    top_p: float = 1.0
    guidance: Guidance = "qsharp"
    lookahead: int | bool = 0
    loss: ValueLoss = "categorical"
    epochs: int = 2
    batch_size: int = 32
    pack_length: int = 0
    warm_start: bool = True
    drop_no_variation: bool = False
    seed: int = 0
    keep_checkpoints: int = 2
    rollout_batch: int = 4096
    rollout_slots: int = 0
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-3, weight_decay=0.0)

    def __post_init__(self):
        positive = ("iterations", "prompts_per_iteration", "samples_per_prompt", "max_new_tokens", "top_k", "epochs",
                    "batch_size", "keep_checkpoints", "rollout_batch")
        bad = [f"{name}={getattr(self, name)}" for name in positive if getattr(self, name) < 1]
        if bad:
            raise ValueError(f"algorithm: these must be >= 1: {', '.join(bad)}")
        if isinstance(self.lookahead, bool):
            object.__setattr__(self, "lookahead", int(self.lookahead))
        if self.lookahead < 0:
            raise ValueError(f"algorithm.lookahead (π_ref steps) must be >= 0, got {self.lookahead}")
        if not self.eta > 0:
            raise ValueError(f"algorithm.eta (the KL coefficient η) must be > 0, got {self.eta}; the official "
                             "code's `eta` flag is 1/η")
        if not self.temperature > 0:
            raise ValueError(f"algorithm.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"algorithm.top_p must lie in (0, 1] (1: no nucleus cut), got {self.top_p}")
        if self.guidance not in ("qsharp", "cd", "bernoulli"):
            raise ValueError(f"algorithm.guidance must be qsharp, cd or bernoulli, got {self.guidance!r}")
        if self.loss not in objectives.HEAD_OF_LOSS:
            raise ValueError(f"algorithm.loss must be one of {', '.join(objectives.HEAD_OF_LOSS)}, got {self.loss!r}")
        if self.rollout_slots < 0:
            raise ValueError(f"algorithm.rollout_slots must be >= 0 (0: the static loop), got {self.rollout_slots}")
        if self.pack_length < 0:
            raise ValueError(f"algorithm.pack_length must be >= 0 (0: no packing), got {self.pack_length}")
        if self.pack_length and self.loss == "categorical_bellman":
            raise ValueError("algorithm.pack_length packs the Monte-Carlo losses' rows; categorical_bellman's targets "
                             "come from π_ref on each padded row: set pack_length=0")


# Fields that may change when a run is resumed: more `iterations` extend it; `keep_checkpoints`
# changes nothing computed; `rollout_batch` and `rollout_slots` change no token (every row draws
# from its own key, whatever chunk or slot it is generated in) — only the last float bits of
# log-probs and KL, which XLA rounds differently for another batch size.
RESUMABLE_FIELDS = ("iterations", "keep_checkpoints", "rollout_batch", "rollout_slots")


def check_setup(cfg: AlgorithmConfig, task: Task, ref: Transformer, value: ValueModel) -> None:
    """Everything about a run that can be checked before any work: the value head fits the loss
    and the guidance, top-k fits the vocabulary, the atoms cover the task's rewards."""
    head = value.head_cfg
    objectives.check_loss_fits_head(cfg.loss, head)
    needed = "bernoulli" if cfg.guidance == "bernoulli" else "categorical"
    if head.kind != needed:
        raise ValueError(f"guidance={cfg.guidance!r} needs a {needed} value head, the value model has {head.kind!r}")
    check_compatible(ref, value)
    task_vocab = getattr(task, "vocab_size", ref.cfg.vocab_size)
    if task_vocab > ref.cfg.vocab_size:  # fewer is fine: checkpoints pad their embeddings (Qwen2.5)
        raise ValueError(f"the task's tokenizer has {task_vocab} tokens but π_ref's vocabulary only "
                         f"{ref.cfg.vocab_size}: token ids would fall outside the embedding")
    if cfg.top_k > ref.cfg.vocab_size:
        raise ValueError(f"algorithm.top_k={cfg.top_k} exceeds π_ref's vocabulary of {ref.cfg.vocab_size} tokens")
    _check_positions(cfg, task, ref, value)
    lo, hi = task.reward_range
    if lo < head.v_min or hi > head.v_max:
        raise ValueError(f"the task's rewards lie in [{lo:g}, {hi:g}] but the value head's atoms cover "
                         f"[{head.v_min:g}, {head.v_max:g}]; set head.v_min / head.v_max to cover the rewards")


def check_mesh(cfg: AlgorithmConfig, mesh: Mesh | None) -> None:
    """A train step splits whole examples over the mesh's data × fsdp devices, so
    ``cfg.batch_size`` must be a multiple of their count (rollout chunks are rounded up
    themselves). None: one device, nothing to check."""
    if mesh is None:
        return
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % shards:
        up = shards * -(-cfg.batch_size // shards)
        raise ValueError(f"algorithm.batch_size={cfg.batch_size} does not split over the mesh's data x fsdp = "
                         f"{shards} devices (each takes whole examples): set algorithm.batch_size={up} (or another "
                         f"multiple of {shards}), or move devices to the tensor axis (mesh=[data, fsdp, tensor] with "
                         f"data x fsdp dividing {cfg.batch_size})")


def _check_positions(cfg: AlgorithmConfig, task: Task, ref: Transformer, value: ValueModel) -> None:
    """Prompts plus responses must fit the models' positions: an error for learned position tables
    (GPT-2), a warning beyond a RoPE model's trained context."""
    width = max(task.eval_prompts()[0].shape[1], task.sample_prompts(np.random.default_rng(0), 1)[0].shape[1])
    for name, model in (("π_ref", ref.cfg), ("the value model", value.backbone.cfg)):
        if width + cfg.max_new_tokens <= model.max_positions:
            continue
        message = (f"prompts of up to {width} tokens + algorithm.max_new_tokens={cfg.max_new_tokens} exceed "
                   f"{name}'s {model.max_positions} positions")
        if model.positions == "learned":
            raise ValueError(message + "; lower algorithm.max_new_tokens or the prompt length (math.max_prompt_len)")
        warnings.warn(message + " (its trained context; RoPE decodes on, with less reliable results)", stacklevel=3)
    value_cfg = value.backbone.cfg
    if cfg.pack_length and cfg.pack_length < width + cfg.max_new_tokens:  # refused now, not after collecting
        raise ValueError(f"algorithm.pack_length={cfg.pack_length} is shorter than a row (prompts of up to {width} "
                         f"tokens + algorithm.max_new_tokens={cfg.max_new_tokens}); raise it or set 0 (no packing)")
    if cfg.pack_length > value_cfg.max_positions and value_cfg.positions == "learned":
        raise ValueError(f"algorithm.pack_length={cfg.pack_length} exceeds the value model's {value_cfg.max_positions} "
                         "learned positions; lower it")


def _records(prompts, prompt_mask, out: rollout.Rollout, switch: np.ndarray, rewards, group) -> dict[str, np.ndarray]:
    """Value-training records: fit the prefixes ending at the last roll-in token or later."""
    tokens = np.concatenate([prompts, np.asarray(out.tokens)], axis=1)
    attention = np.concatenate([prompt_mask, np.asarray(out.mask)], axis=1)
    p = prompts.shape[1]
    position = np.arange(tokens.shape[1])[None, :]
    loss_mask = (position >= p - 1 + switch[:, None]) & attention
    return {"tokens": tokens.astype(np.int32), "attention_mask": attention, "loss_mask": loss_mask,
            "rewards": rewards.astype(np.float32), "group": group.astype(np.int64)}


def _check_rewards(rewards: Any, n: int, task: Task) -> np.ndarray:
    """The task's rewards, checked where they enter: shape, finite, inside its reward range."""
    rewards = np.asarray(rewards, np.float64)
    if rewards.shape != (n,):
        raise ValueError(f"task.reward returned shape {rewards.shape}, expected ({n},)")
    if not np.all(np.isfinite(rewards)):
        raise ValueError(f"task.reward returned non-finite rewards: {rewards[~np.isfinite(rewards)][:5]}")
    lo, hi = task.reward_range
    if rewards.min() < lo or rewards.max() > hi:
        raise ValueError(f"rewards must lie in [{lo:g}, {hi:g}] (the task's reward_range); got "
                         f"{rewards.min():g} .. {rewards.max():g}")
    return rewards


def run(
    cfg: AlgorithmConfig, task: Task, ref: Transformer, value: ValueModel, run_dir: str | Path, *,
    progress: bool = True, mesh: Mesh | None = None, lock: bool = True,
    diagnostics: Callable[[ValueModel, int], dict[str, float]] | None = None,
) -> list[dict[str, float]]:
    """Run (or resume) Algorithm 1 in ``run_dir``; returns the metrics of every iteration.

    With a ``mesh``, π_ref and the value model are placed by their logical-axis shardings, the
    train step shards parameters, optimizer state and batches, and rollouts run on the mesh.
    ``lock``: hold ``run_dir``'s :class:`~qsharp_jax.lock.RunLock` while running (False: the
    caller holds it, as :func:`qsharp_jax.runs.start_or_resume` does). ``diagnostics(value_model,
    iteration) -> {name: float}``: more metrics of each iteration's fitted value model (e.g. its
    loss per response position on held-out data), recorded with that iteration's metrics.
    """
    check_setup(cfg, task, ref, value)
    check_mesh(cfg, mesh)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir) if lock and jax.process_index() == 0 else contextlib.nullcontext():
        return _run(cfg, task, ref, value, run_dir, progress, mesh, diagnostics)


def _run(cfg: AlgorithmConfig, task: Task, ref: Transformer, value: ValueModel, run_dir: Path, progress: bool,
         mesh: Mesh | None, diagnostics) -> list[dict[str, float]]:
    config = config_lib.as_json(cfg)
    store = RolloutStore(run_dir / "data")
    checkpoints = Checkpoints(run_dir / "checkpoints", keep=cfg.keep_checkpoints, writer=distributed.is_main())
    optimizer = make_optimizer(cfg.optimizer)
    fresh = init_state(value, optimizer, jax.random.key(cfg.seed))
    if mesh is not None:
        ref = sharding_lib.place(ref, mesh)
        fresh = sharding_lib.put(fresh, state_shardings(fresh, mesh))
    if cfg.loss == "categorical_bellman":
        ref_graph, extra = nnx.split(ref)
        top_k = None if value.head_cfg.q_type else cfg.top_k

        def prepare(ref_state, batch):  # π_ref is frozen: what the targets need from it joins each batch
            return {**batch, **objectives.reference_inputs(nnx.merge(ref_graph, ref_state), batch["tokens"],
                                                           batch["attention_mask"], top_k=top_k)}

        train_epoch = make_train_epoch(objectives.bellman_value_loss, optimizer, mesh, fresh, prepare=prepare)
    else:
        train_epoch = make_train_epoch(lambda m, b: objectives.value_loss(m, b, kind=cfg.loss), optimizer, mesh, fresh)
        extra = None

    restored = checkpoints.restore(fresh, config, ignore=RESUMABLE_FIELDS, quarantine=True,
                                   defaults=config_lib.as_json(AlgorithmConfig()))
    state, history = (restored[0], restored[1]["history"]) if restored else (fresh, [])
    start = len(history)
    # on a pod every process computes and process 0 writes what is written once (distributed.on_main)
    for iteration in tqdm(range(start, cfg.iterations), desc="Q♯ iterations",
                          disable=not progress or not distributed.is_main(),
                          initial=start, total=cfg.iterations):
        failpoints.reach(f"iteration/{iteration}/start")
        distributed.barrier(f"iteration/{iteration}/start")  # every process reads the same store
        if iteration not in store.iterations():
            records = _collect(cfg, task, ref, state, iteration)
            distributed.on_main(f"collect/{iteration}/stored", lambda: store.append(iteration, records))
        if not cfg.warm_start:  # a copy: the train epoch donates (consumes) its input state
            state = jax.tree.map(jnp.copy, fresh)
        state, fitted = _fit(cfg, state, train_epoch, store.load(), iteration, progress, extra,
                             share_prompts=not value.head_cfg.q_type)
        metrics = _strict({"iteration": iteration, "examples": len(store), **fitted,
                           **evaluate(cfg, task, ref, state, iteration),
                           **(diagnostics(state.model(), iteration) if diagnostics else {})})
        history.append(metrics)
        distributed.on_main(f"tensorboard/{iteration}", lambda: _write_scalars(run_dir, metrics))
        checkpoints.save(iteration, state, {"iteration": iteration, "config": config, "history": history})
        distributed.on_main(f"metrics/{iteration}",
                            lambda: _write_metrics(run_dir, history, failpoint=f"metrics/{iteration}"))
    if start == cfg.iterations:  # nothing left to do, but a kill may have come between checkpoint and metrics
        distributed.on_main("run/metrics", lambda: _write_metrics(run_dir, history))
    distributed.barrier("run/end")
    return history


def _write_scalars(run_dir: Path, metrics: dict[str, Any]) -> None:
    """One iteration's metrics as TensorBoard scalars in ``run_dir/tensorboard``."""
    from tensorboardX import SummaryWriter  # here: it imports PyTorch where installed (3 s)

    with SummaryWriter(str(run_dir / "tensorboard")) as writer:
        for name, value in metrics.items():
            if name != "iteration" and value is not None:  # None: a skipped fit
                writer.add_scalar(name, value, metrics["iteration"])


def _write_metrics(run_dir: Path, history: list[dict[str, Any]], failpoint: str | None = None) -> None:
    """``metrics.jsonl``, one line per iteration, as the newest checkpoint has them; strict JSON
    (``allow_nan=False``): a metric that is not a number is a bug, not a value."""
    text = "".join(json.dumps(m, allow_nan=False) + "\n" for m in history).encode()
    file = run_dir / "metrics.jsonl"
    if failpoint is None and file.exists() and file.read_bytes() == text:
        return
    atomic_write(file, lambda f: f.write(text), failpoint=failpoint)


def _strict(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics as strict JSON values: an undefined number (e.g. the explained variance of constant
    returns) is None (``null``), never a bare ``NaN``."""
    return {k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in metrics.items()}


def sampling_settings(cfg: AlgorithmConfig, task: Task) -> dict[str, Any]:
    """Decoding settings shared by collection, evaluation and sampling."""
    return dict(max_new_tokens=cfg.max_new_tokens, top_k=cfg.top_k, temperature=cfg.temperature, top_p=cfg.top_p,
                eos_id=task.eos_id, pad_id=task.pad_id)


def _generate(cfg: AlgorithmConfig, ref: Transformer, prompts, mask, key: jax.Array, *, failpoint: str,
              score=None, **kwargs):
    """:func:`rollout.generate_chunked` in chunks of ``cfg.rollout_batch`` rows (continuous with
    ``cfg.rollout_slots``)."""
    slots = {"slots": cfg.rollout_slots} if cfg.rollout_slots else {}
    return rollout.generate_chunked(ref, prompts, mask, key=key, batch=cfg.rollout_batch, name=failpoint, score=score,
                                    **slots, **kwargs)


def guidance_args(cfg: AlgorithmConfig, state: TrainState) -> dict[str, Any]:
    """The guidance arguments of ``rollout.generate`` for the current value model."""
    return dict(value_model=state.model(), guidance=cfg.guidance, eta=cfg.eta, lookahead=cfg.lookahead)


def _collect(cfg: AlgorithmConfig, task: Task, ref: Transformer, state: TrainState, iteration: int):
    rng = np.random.default_rng([cfg.seed, iteration, 0])
    k, n = cfg.samples_per_prompt, cfg.prompts_per_iteration * cfg.samples_per_prompt  # row r: prompt r // k
    mine = rollout.process_rows(ref, n, cfg.rollout_batch)  # on a pod: the rows this host decodes
    drawn = np.unique(mine // k)
    prompts, mask = prompt_rows(task, rng, cfg.prompts_per_iteration, drawn)  # only this host's prompts are made
    prompts, mask = (x[np.searchsorted(drawn, mine // k)] for x in (prompts, mask))
    group = iteration * cfg.prompts_per_iteration + np.arange(n) // k
    switch = rng.integers(0, cfg.max_new_tokens, size=n)  # uniform over the response
    guided = {} if iteration == 0 else guidance_args(cfg, state)  # iteration 0 rolls in with π_ref
    out, rewards = _generate(cfg, ref, prompts, mask, jax.random.fold_in(jax.random.key(cfg.seed), iteration),
                             failpoint=f"collect/{iteration}", switch_time=switch.astype(np.int32), total_rows=n,
                             samples_per_prompt=k,
                             score=_scorer(task, prompts, mine), **sampling_settings(cfg, task), **guided)
    if jax.process_count() > 1:  # the store (written by process 0) holds every row's prompt; every process joins
        prompts, mask = (rollout.gather_rows(x, mine, n) for x in (prompts, mask))
    return _records(prompts, mask, out, switch, _check_rewards(rewards, n, task), group)


def _scorer(task: Task, prompts: np.ndarray, rows_held: np.ndarray | None = None):
    """The task's rewards of a chunk of rows (run by ``generate_chunked`` beside the next chunk's
    decoding, so answer checking stays off the accelerator's critical path). ``prompts``: of the
    global rows ``rows_held`` (None: of every row)."""
    def score(rows, out):
        at = rows if rows_held is None else np.searchsorted(rows_held, rows)
        return np.asarray(task.reward(prompts[at], out.tokens, out.mask), np.float64)

    return score


def _fit(cfg: AlgorithmConfig, state: TrainState, train_epoch, data: dict[str, np.ndarray], iteration: int,
         progress: bool, extra=None, share_prompts: bool = False):
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
        return state, {"fit_examples": n, "fit_loss": None, "fit_explained_variance": None}
    keys = ("tokens", "attention_mask", "loss_mask", "rewards")
    groups, data = data["group"], {k: data[k] for k in keys}
    if cfg.pack_length:  # rows end to end, each kept to itself: the steps train on no padding
        # a V-type model's answers of one prompt share its encoding (a Q-type model's cannot)
        packed = packing.pack_rows(data, cfg.pack_length, groups if share_prompts else None)
        data = {k: packed[k] for k in (packing.SHARED_BATCH_KEYS if share_prompts else packing.BATCH_KEYS)}
    state, metrics = fit(state, train_epoch, data, epochs=cfg.epochs, batch_size=cfg.batch_size,
                         rng=np.random.default_rng([cfg.seed, iteration, 1]), last_batch="mask", extra=extra,
                         desc=f"fit {iteration}", progress=progress, failpoint=f"fit/{iteration}")
    return state, {"fit_examples": n, "fit_loss": metrics["loss"],
                   "fit_explained_variance": metrics["explained_variance"]}


def evaluate(cfg: AlgorithmConfig, task: Task, ref: Transformer, state: TrainState, iteration: int) -> dict[str, float]:
    """Mean reward and KL to π_ref on the task's evaluation prompts, of π_ref (``ref_*``) and of
    the guided policy (``guided_*``); the draws are keyed by (seed, iteration)."""
    prompts, mask = task.eval_prompts()
    key = jax.random.fold_in(jax.random.key(cfg.seed + 1), iteration)
    results = {}
    for name, extra in (("ref", {}), ("guided", guidance_args(cfg, state))):
        out, rewards = _generate(cfg, ref, prompts, mask, key, failpoint=f"evaluate/{iteration}/{name}",
                                 score=_scorer(task, prompts), **sampling_settings(cfg, task), **extra)
        rewards = _check_rewards(rewards, len(prompts), task)
        results[f"{name}_reward"] = float(rewards.mean())
        results[f"{name}_kl"] = float(np.asarray(out.kl).mean())
    return results


def latest_state(cfg: AlgorithmConfig, value: ValueModel, run_dir: str | Path, *,
                 mesh: Mesh | None = None) -> tuple[TrainState, dict[str, Any]]:
    """The newest checkpoint of :func:`run` in ``run_dir`` as a train state of ``value``'s structure,
    and its metadata (``meta["iteration"]``). With a ``mesh``, the state is laid out on it by its
    logical axes, whatever mesh it was saved from (orbax reshards on load)."""
    template = init_state(value, make_optimizer(cfg.optimizer), jax.random.key(cfg.seed))
    if mesh is not None:
        template = sharding_lib.put(template, state_shardings(template, mesh))
    restored = Checkpoints(Path(run_dir) / "checkpoints").restore(template)
    if restored is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints has no checkpoint yet")
    return restored
