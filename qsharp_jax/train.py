"""Fitting value models (and policies): optimizer, train state, jitted (optionally sharded) train
steps and scanned epochs.

Everything here is pure: ``train_step(state, batch) -> (state, metrics)`` with the state donated.
Parameters are a plain nested dict of arrays (``nnx.to_pure_dict``), so the optimizer state and
every sharding are ordinary pytrees; ``state.model()`` rebuilds the NNX module when needed. The
state and steps work for any NNX module and loss: the policy objectives of ``qsharp_jax.policy``
and ``qsharp_jax.baselines`` use them too.

A value-training batch is a dict of arrays (all ``[N, T]`` unless noted):

* ``tokens`` int32, prompt + response, left padded; ``attention_mask`` bool;
* ``loss_mask`` bool: the prefixes whose value is fitted — those ending at the last roll-in token
  or later, whose continuation was sampled from π_ref (Algorithm 1);
* ``rewards`` float32 ``[N]``: the return of each sequence.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from qsharp_jax import losses
from qsharp_jax import sharding as sharding_lib
from qsharp_jax.models.transformer import Transformer
from qsharp_jax.models.value import ValueModel

LossKind = Literal["categorical", "bernoulli", "mse"]
Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup, then cosine / linear decay or a constant rate, and norm clipping.

    Defaults follow the paper's LLM value models: lr 2e-5, weight decay 0.01.
    """

    learning_rate: float = 2e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    decay_steps: int = 0  # after warmup; 0 = constant learning rate
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    end_learning_rate: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    clip_norm: float | None = 1.0


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps) if cfg.warmup_steps else None
    if cfg.schedule == "constant" or cfg.decay_steps == 0:
        decay = optax.constant_schedule(cfg.learning_rate)
    elif cfg.schedule == "cosine":
        alpha = cfg.end_learning_rate / cfg.learning_rate if cfg.learning_rate else 0.0
        decay = optax.cosine_decay_schedule(cfg.learning_rate, cfg.decay_steps, alpha=alpha)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.learning_rate, cfg.end_learning_rate, cfg.decay_steps)
    else:
        raise ValueError(f"schedule must be cosine, linear or constant, got {cfg.schedule!r}")
    if warmup is None:
        return decay
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    return adamw if cfg.clip_norm is None else optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)


@struct.dataclass
class TrainState:
    """params: nested dict of arrays; opt_state: the optimizer's; step: int32 []; rng: a PRNG key."""

    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)

    def model(self) -> nnx.Module:
        """The NNX module (value model or policy) with these parameters."""
        return nnx.merge(self.graphdef, self.params)


def init_state(model: nnx.Module, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    return TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32), rng=rng,
                      graphdef=graphdef)


def value_loss(
    model: ValueModel, batch: Batch, *, kind: LossKind = "categorical", atoms: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Monte-Carlo value loss of a V- or Q-type value model on a batch (see module docstring).

    V-type: the output at position t is the value of the prefix ending at t. Q-type: the output at
    t for token a is the value of that prefix extended by a, so the prefix ending at t is read at
    position t - 1, token ``tokens[t]``.

    The target of every fitted prefix is its sequence's ``rewards`` ``[N]``, or, when the batch has
    ``returns`` float ``[N, T]`` instead, a target per prefix (e.g. auxiliary labels).
    """
    tokens, attention = batch["tokens"], batch["attention_mask"]
    chex.assert_rank(tokens, 2, custom_message="batch['tokens'] must be [N, T]")
    chex.assert_equal_shape([tokens, attention, batch["loss_mask"]],
                            custom_message="tokens, attention_mask and loss_mask must share [N, T]")
    if "returns" in batch:
        chex.assert_shape(batch["returns"], tokens.shape, custom_message="batch['returns'] must be [N, T]")
        returns = batch["returns"].astype(jnp.float32)
    else:
        chex.assert_shape(batch["rewards"], tokens.shape[:1], custom_message="batch['rewards'] must be [N]")
        returns = jnp.broadcast_to(batch["rewards"][:, None].astype(jnp.float32), tokens.shape)
    head = model.head_cfg
    needs = {"categorical": "categorical", "bernoulli": "bernoulli", "mse": "scalar"}
    if kind not in needs:
        raise ValueError(f"loss kind must be categorical, bernoulli or mse, got {kind!r}")
    if needs[kind] != head.kind:
        raise ValueError(f"loss {kind!r} does not fit a {head.kind!r} value head (it needs {needs[kind]!r})")
    out = model(tokens, attention)  # [N, T, (V,) (K)]
    mask = batch["loss_mask"] & attention
    if head.q_type:
        nxt = tokens[:, 1:]
        index = nxt[:, :, None, None] if out.ndim == 4 else nxt[:, :, None]
        out = jnp.take_along_axis(out[:, :-1], index, axis=2)[:, :, 0]
        mask, returns = mask[:, 1:], returns[:, 1:]
    if kind == "categorical":
        atoms = jnp.linspace(0.0, 1.0, head.num_atoms) if atoms is None else atoms
        loss = losses.categorical_return_loss(out, returns, atoms, mask)
        mean = jax.nn.softmax(out) @ atoms
    elif kind == "bernoulli":
        loss = losses.bernoulli_return_loss(out, returns, mask)
        mean = jax.nn.sigmoid(out)
    else:
        loss = losses.mse_return_loss(out, returns, mask)
        mean = out
    return loss, _fit_metrics(mean, returns, mask)


def reference_inputs(ref: Transformer, tokens: jax.Array, attention_mask: jax.Array, *, top_k: int | None) -> Batch:
    """What :func:`bellman_value_loss` needs from the frozen π_ref for a batch.

    ``top_k=None`` (Q-type): ``{"ref_logits": [N, T, V]}``. Otherwise (V-type):
    ``{"ref_top_ids": int32 [N, T, k], "ref_top_logits": [N, T, k]}``, π_ref's k likeliest next
    tokens after each prefix — the tokens guided V-type decoding chooses among.
    """
    logits = jax.lax.stop_gradient(ref(tokens, attention_mask))
    if top_k is None:
        return {"ref_logits": logits}
    top_logits, top_ids = jax.lax.top_k(logits, top_k)
    return {"ref_top_ids": top_ids.astype(jnp.int32), "ref_top_logits": top_logits}


def bellman_value_loss(model: ValueModel, batch: Batch, *, atoms: jax.Array | None = None):
    """Distributional Bellman loss of a categorical value model under π_ref (no max).

    The target for the return distribution of a fitted state-action is the C51 projection of
    ``r + γ·z`` (γ = 1; the reward arrives with the last token) under the π_ref mixture of the
    model's own next-step distributions, with the gradient stopped (a semi-gradient target, as with
    a target network refreshed every step):

    * Q-type: the target for Z(s_t, a_{t+1}) is Σ_a π_ref(a | s_{t+1}) p(· | s_{t+1}, a), exact
      over the vocabulary. Needs ``batch["ref_logits"]`` float ``[N, T, V]``.
    * V-type: the target for Z(s_t) (the prefix ending at t) is Σ_j π̃_ref(c_j | s_t) p(· | s_t c_j)
      over π_ref's top-k next tokens c_j, π̃_ref renormalized over them — the support of guided
      V-type decoding. All T·k branches are scored in one forward
      (:meth:`ValueModel.score_branches`). Needs ``batch["ref_top_ids"]`` int ``[N, T, k]`` and
      ``batch["ref_top_logits"]`` float ``[N, T, k]`` (see :func:`reference_inputs`).

    The last real token of a row is terminal: its target is the reward.
    """
    head = model.head_cfg
    if head.kind != "categorical":
        raise ValueError(f"categorical_bellman needs a categorical value head, got {head.kind!r}")
    tokens, attention = batch["tokens"], batch["attention_mask"]
    chex.assert_rank(tokens, 2, custom_message="batch['tokens'] must be [N, T]")
    atoms = jnp.linspace(0.0, 1.0, head.num_atoms) if atoms is None else atoms
    last = tokens.shape[1] - 1 - jnp.argmax(attention[:, ::-1], axis=1)  # last real token of each row
    if head.q_type:
        if "ref_logits" not in batch:
            raise ValueError("a Q-type categorical_bellman batch needs 'ref_logits' (π_ref's next-token logits "
                             "[N, T, V]; see train.reference_inputs)")
        chex.assert_shape(batch["ref_logits"], (*tokens.shape, model.vocab_size),
                          custom_message="batch['ref_logits'] must be [N, T, V]")
        out = model(tokens, attention)  # [N, T, V, K]
        chosen = jnp.take_along_axis(out[:, :-1], tokens[:, 1:, None, None], axis=2)[:, :, 0]  # Z(s_t, a_{t+1})
        own = jax.nn.softmax(jax.lax.stop_gradient(out[:, 1:]), axis=-1)  # p(· | s_{t+1}, a) for every a
        ref = jax.nn.softmax(batch["ref_logits"][:, 1:].astype(jnp.float32), axis=-1)  # π_ref(a | s_{t+1})
        next_probs = jnp.einsum("ntv,ntvk->ntk", ref, own)
        terminal = jnp.arange(1, tokens.shape[1])[None, :] == last[:, None]
        mask = (batch["loss_mask"] & attention)[:, 1:]
    else:
        ids = batch.get("ref_top_ids")
        if ids is None or "ref_top_logits" not in batch:
            raise ValueError("a V-type categorical_bellman batch needs 'ref_top_ids' and 'ref_top_logits' "
                             "(π_ref's top-k next tokens; see train.reference_inputs)")
        chex.assert_equal_shape([ids, batch["ref_top_logits"]],
                                custom_message="ref_top_ids and ref_top_logits must share [N, T, k]")
        chex.assert_equal_shape_prefix([tokens, ids], 2, custom_message="ref_top_ids must be [N, T, k]")
        chosen, branches = model.score_branches(tokens, attention, ids)  # [N, T, K], [N, T, k, K]
        own = jax.nn.softmax(jax.lax.stop_gradient(branches), axis=-1)
        ref = jax.nn.softmax(batch["ref_top_logits"].astype(jnp.float32), axis=-1)  # renormalized over top-k
        next_probs = jnp.einsum("ntj,ntjk->ntk", ref, own)
        terminal = jnp.arange(tokens.shape[1])[None, :] == last[:, None]
        mask = batch["loss_mask"] & attention
    rewards = jnp.where(terminal, batch["rewards"][:, None], 0.0)
    discounts = jnp.where(terminal, 0.0, 1.0)
    loss = losses.categorical_bellman_loss(chosen, next_probs, rewards, discounts, atoms, mask)
    returns = jnp.broadcast_to(batch["rewards"][:, None], mask.shape).astype(jnp.float32)
    return loss, _fit_metrics(jax.nn.softmax(chosen) @ atoms, returns, mask)


def _fit_metrics(mean: jax.Array, returns: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """How well the predicted mean return explains the observed returns, over fitted positions."""
    fitted = mask.astype(jnp.float32)
    count = jnp.maximum(fitted.sum(), 1.0)
    mean_return = (returns * fitted).sum() / count
    residual = ((mean - returns) ** 2 * fitted).sum() / count
    variance = ((returns - mean_return) ** 2 * fitted).sum() / count
    explained = jnp.where(variance > 0, 1.0 - residual / jnp.where(variance > 0, variance, 1.0), 0.0)
    return {"explained_variance": explained, "fitted_tokens": fitted.sum()}


def _opt_state_shardings(opt_state: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shard optimizer slots like the parameters they mirror (matched by path suffix and shape)."""
    by_path = {
        tuple(path): (leaf.shape, shard)
        for (path, leaf), shard in zip(
            jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(param_shardings)
        )
    }
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        path = tuple(path)
        for start in range(len(path)):
            hit = by_path.get(path[start:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
    """Shardings of a train state on ``mesh``: parameters by their logical axes, optimizer slots
    like their parameters, scalars replicated."""
    abstract = nnx.split(nnx.eval_shape(lambda: nnx.merge(state.graphdef, state.params)))[1]
    param_shardings = nnx.to_pure_dict(
        jax.tree.map(
            lambda v, s: v.replace(s),
            abstract,
            sharding_lib.state_shardings(abstract, mesh),
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    return state.replace(
        params=param_shardings,
        opt_state=_opt_state_shardings(state.opt_state, state.params, param_shardings, mesh),
        step=replicated,
        rng=replicated,
    )


def _step_fn(loss_fn, optimizer):
    def step(state: TrainState, batch: Batch):
        def objective(params):
            return loss_fn(nnx.merge(state.graphdef, params), batch)

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics

    return step


def make_train_epoch(
    loss_fn: Callable[[Any, Batch], tuple[jax.Array, dict[str, jax.Array]]],
    optimizer: optax.GradientTransformation,
    mesh: Mesh | None = None,
    state: TrainState | None = None,
    *,
    prepare: Callable[[Any, Batch], Batch] | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """``train_epoch(state, batches, extra=None) -> (state, metrics)``: many steps in one jitted
    ``lax.scan``.

    ``batches`` holds every array with a leading steps axis (``[S, B, ...]``); metrics come back
    per step (``[S]``). No Python runs between steps, which matters on a CPU where a small model's
    step takes milliseconds. The state is donated. ``prepare(extra, batch) -> batch`` runs inside
    every step before the loss, e.g. to add what a frozen π_ref (``extra``, its parameters) says
    about the batch without materializing that for all steps at once.

    With a ``mesh`` (and a ``state`` to read shapes from), parameters and optimizer slots keep their
    logical-axis shardings and every batch is split over ``data``/``fsdp`` (axis 1 of ``batches``),
    as :func:`make_train_step` does for one step; ``extra`` keeps the shardings it comes with.
    """
    step = _step_fn(loss_fn, optimizer)

    def epoch(state: TrainState, batches: Batch, extra: Any = None):
        body = step if prepare is None else (lambda s, b: step(s, prepare(extra, b)))
        return jax.lax.scan(body, state, batches)

    if mesh is None:
        return jax.jit(epoch, donate_argnums=0)
    if state is None:
        raise ValueError("make_train_epoch(mesh=...) needs `state` to derive the shardings")
    shardings = state_shardings(state, mesh)
    batch_sharding = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp")))
    jitted = jax.jit(epoch, out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())), donate_argnums=0)

    def sharded_epoch(state: TrainState, batches: Batch, extra: Any = None):
        # committed inputs carry their shardings into the jit: the state's are the step's
        return jitted(jax.device_put(state, shardings), jax.device_put(batches, batch_sharding), extra)

    return sharded_epoch


def fit_epochs(
    state: TrainState,
    train_epoch: Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]],
    data: dict[str, Any],
    *,
    epochs: int,
    batch_size: int,
    rng: np.random.Generator,
    desc: str = "fit",
    progress: bool = True,
    chunk: int = 200,
) -> tuple[TrainState, dict[str, float]]:
    """Shuffle ``data`` (a pytree of arrays with a shared leading example axis) every epoch and run
    :func:`make_train_epoch`'s ``train_epoch`` on it, ``chunk`` steps per call. The last partial
    batch of an epoch is dropped (static shapes; a different one each epoch). Returns the state and
    the last epoch's mean metrics.
    """
    leaves = jax.tree.leaves(data)
    n = len(leaves[0])
    if any(len(x) != n for x in leaves):
        raise ValueError(f"data arrays must share their leading (example) axis; got {[len(x) for x in leaves]}")
    if n < batch_size:
        raise ValueError(f"{n} examples are fewer than one batch of {batch_size}; lower batch_size")
    steps = n // batch_size
    metrics: dict[str, float] = {}
    bar = tqdm(total=epochs * steps, desc=desc, disable=not progress, leave=False)
    for _ in range(epochs):
        order = rng.permutation(n)[: steps * batch_size].reshape(steps, batch_size)
        outs = []
        # scans of at most `chunk` steps: a live progress bar and a bounded device copy of the data
        for start in range(0, steps, chunk):
            index = order[start : start + chunk]
            state, out = train_epoch(state, jax.tree.map(lambda x: jnp.asarray(np.asarray(x)[index]), data))
            outs.append(out)
            bar.update(len(index))
            bar.set_postfix(loss=f"{float(out['loss'][-1]):.4f}")
        metrics = {k: float(np.mean(np.concatenate([np.asarray(o[k]) for o in outs]))) for k in outs[0]}
    bar.close()
    return state, metrics


def make_train_step(
    loss_fn: Callable[[ValueModel, Batch], tuple[jax.Array, dict[str, jax.Array]]],
    optimizer: optax.GradientTransformation,
    mesh: Mesh | None = None,
    state: TrainState | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """``train_step(state, batch) -> (state, metrics)``, jitted with the state donated.

    With a ``mesh`` (and a ``state`` to read shapes from), parameters and optimizer slots keep
    their logical-axis shardings and the batch is split over ``data``/``fsdp``; the result equals
    the single-device step up to float reassociation.
    """

    step = _step_fn(loss_fn, optimizer)
    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    if state is None:
        raise ValueError("make_train_step(mesh=...) needs `state` to derive the shardings")
    shardings = state_shardings(state, mesh)
    # one spec for every batch array: the leading (example) axis over data x fsdp, the rest whole
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, replicated), donate_argnums=0
    )
