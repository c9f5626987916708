"""Training any NNX module on any loss: optimizer, train state, jitted (optionally sharded) train
steps and epochs, and the one fit loop.

Everything here is pure: ``train_step(state, batch) -> (state, metrics)`` with the state donated.
Parameters are a plain nested dict of arrays (``nnx.to_pure_dict``), so the optimizer state and
every sharding are ordinary pytrees; ``state.model()`` rebuilds the NNX module when needed. The
losses come from :mod:`qsharp_jax.objectives` (value models, language models) and
:mod:`qsharp_jax.baselines` (policies): ``loss_fn(model, batch) -> (loss, metrics)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from qsharp_jax import failpoints
from qsharp_jax import sharding as sharding_lib

Batch = dict[str, jax.Array]
LossFn = Callable[[Any, Batch], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup, then cosine / linear decay or a constant rate, and norm clipping.

    Fields:
      learning_rate: peak rate after warmup (paper's LLM value models: 2e-5).
      weight_decay: AdamW's decoupled decay (paper: 0.01).
      warmup_steps: optimizer steps of linear warmup from 0 (0: none).
      decay_steps: steps of decay after warmup; 0 keeps the rate constant.
      schedule: the decay's shape: ``cosine``, ``linear`` or ``constant``.
      end_learning_rate: the rate reached after ``decay_steps``.
      b1, b2: Adam's moment decays.
      clip_norm: clip the gradient's global norm to this (None: no clipping).
    """

    learning_rate: float = 2e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    decay_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    end_learning_rate: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    clip_norm: float | None = 1.0

    def __post_init__(self):
        if not (self.learning_rate >= 0 and self.end_learning_rate >= 0 and self.weight_decay >= 0):
            raise ValueError(f"optimizer: learning_rate, end_learning_rate and weight_decay must be >= 0, got "
                             f"{self.learning_rate}, {self.end_learning_rate}, {self.weight_decay}")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ValueError(f"optimizer: warmup_steps and decay_steps must be >= 0, got {self.warmup_steps}, "
                             f"{self.decay_steps}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"optimizer.schedule must be cosine, linear or constant, got {self.schedule!r}")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ValueError(f"optimizer: b1 and b2 must lie in [0, 1), got {self.b1}, {self.b2}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"optimizer.clip_norm must be > 0 or null, got {self.clip_norm}")


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
    params = nnx.to_pure_dict(state)  # as they are (a restore's template may hold consumed buffers)
    # what is made here is committed to its device, as the train step's outputs are: jit keys its
    # cache on committedness, so a fresh counter or key would compile the step again at the next call
    commit = lambda tree: jax.tree.map(  # noqa: E731 -- traced (eval_shape, jit): nothing to commit
        lambda x: x if isinstance(x, jax.core.Tracer) or x.committed else jax.device_put(x, x.sharding), tree)
    return TrainState(params=params, opt_state=commit(optimizer.init(params)), step=commit(jnp.zeros((), jnp.int32)),
                      rng=commit(rng), graphdef=graphdef)


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


class NonFiniteError(FloatingPointError):
    """A fit met a non-finite loss, gradient or update; ``state`` is the last finite train state."""

    def __init__(self, message: str, state: TrainState):
        super().__init__(message)
        self.state = state


def _step_fn(loss_fn, optimizer):
    def step(state: TrainState, batch: Batch, halt: jax.Array | bool = False):
        def objective(params):
            return loss_fn(nnx.merge(state.graphdef, params), batch)

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        grad_norm = optax.tree.norm(grads)
        # a non-finite step (or any step after one, `halt`) leaves the state as it was: the caller
        # reads `finite` and stops with the last good state instead of training on NaN
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
        new = state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                            step=state.step + 1)
        keep = finite & ~jnp.asarray(halt)
        new = jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, state)
        return new, {**metrics, "loss": loss, "grad_norm": grad_norm, "finite": finite}

    return step


def make_train_epoch(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    mesh: Mesh | None = None,
    state: TrainState | None = None,
    *,
    prepare: Callable[[Any, Batch], Batch] | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """``train_epoch(state, batches, extra=None) -> (state, metrics)``: one jitted step per batch
    of a chunk.

    ``batches`` holds every array with a leading steps axis (``[S, B, ...]``; numpy arrays stay on
    the host and each step's batch is copied over as it runs); metrics come back per step
    (``[S]``), with ``finite`` False from the first step whose loss, gradient or update was not
    finite: that step and every later one left the state unchanged. The state is donated.
    ``prepare(extra, batch) -> batch`` runs inside every step before the loss, e.g. to add what a
    frozen π_ref (``extra``, its parameters) says about the batch without materializing that for
    all steps at once.

    Why not one ``lax.scan`` over the steps: on XLA:CPU the scanned loop runs at about half the
    speed of separate calls once the step holds no host callback (``make bench``:
    ``experiments/bench/fit_bench.py`` measures the ways side by side).

    With a ``mesh`` (and a ``state`` to read shapes from), parameters and optimizer slots keep their
    logical-axis shardings and every batch is split over ``data``/``fsdp``, as
    :func:`make_train_step` does; ``extra`` keeps the shardings it comes with.
    """
    step = make_train_step(loss_fn, optimizer, mesh, state, prepare=prepare)

    def train_epoch(state: TrainState, batches: Batch, extra: Any = None):
        metrics = []
        finite = jnp.bool_(True)  # on the device: no host sync per step
        for index in range(jax.tree.leaves(batches)[0].shape[0]):
            state, out = step(state, jax.tree.map(lambda x: x[index], batches), extra, ~finite)
            finite = finite & out["finite"]
            metrics.append(out)
        return state, jax.tree.map(lambda *per_step: jnp.stack(per_step), *metrics)

    train_epoch.step = step  # the jitted step, for inspection (e.g. its jaxpr)
    return train_epoch


def fit(
    state: TrainState,
    train_epoch: Callable[..., tuple[TrainState, dict[str, jax.Array]]],
    data: dict[str, Any],
    *,
    epochs: int,
    batch_size: int,
    rng: np.random.Generator,
    last_batch: Literal["drop", "mask"] = "drop",
    extra: Any = None,
    desc: str = "fit",
    progress: bool = True,
    chunk: int = 200,
    failpoint: str | None = None,
) -> tuple[TrainState, dict[str, float]]:
    """Fit on ``data`` for ``epochs`` epochs: the one fit loop of the library.

    Every epoch shuffles ``data`` (a pytree of arrays with a shared leading example axis) with
    ``rng`` and runs :func:`make_train_epoch`'s ``train_epoch`` on it, ``chunk`` steps per call (a
    live progress bar). ``last_batch``: what happens to the
    ``n % batch_size`` examples left over — ``"drop"`` them (a different few each epoch), or
    ``"mask"``: fill the last batch with copies of example 0 whose ``loss_mask`` is False, so every
    example is fitted (needs ``data["loss_mask"]``). ``extra`` is passed on to ``train_epoch``.
    ``failpoint``: names the chunks (``<failpoint>/<epoch>/<first step>``) for
    :mod:`qsharp_jax.failpoints`.

    Returns the state and the last epoch's mean metrics (over its steps; none for 0 epochs).
    Raises :class:`NonFiniteError` (naming the epoch, step and examples; ``.state`` the last finite
    state) at the first non-finite loss, gradient or update.
    """
    leaves = jax.tree.leaves(data)
    n = len(leaves[0])
    if any(len(x) != n for x in leaves):
        raise ValueError(f"data arrays must share their leading (example) axis; got {[len(x) for x in leaves]}")
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"fit needs epochs >= 0 and batch_size >= 1, got {epochs} and {batch_size}")
    if last_batch == "mask":
        if "loss_mask" not in data:
            raise ValueError("last_batch='mask' masks padding rows through data['loss_mask'], which is missing")
        steps = -(-n // batch_size)
    elif last_batch == "drop":
        if n < batch_size:
            raise ValueError(f"{n} examples are fewer than one batch of {batch_size}; lower batch_size")
        steps = n // batch_size
    else:
        raise ValueError(f"last_batch must be 'drop' or 'mask', got {last_batch!r}")
    args = () if extra is None else (extra,)
    metrics: dict[str, float] = {}
    bar = tqdm(total=epochs * steps, desc=desc, disable=not progress, leave=False)
    for epoch in range(epochs):
        order = rng.permutation(n)
        order = np.concatenate([order, np.full(steps * batch_size - n, -1)]) if last_batch == "mask" else \
            order[: steps * batch_size]
        order = order.reshape(steps, batch_size)
        outs = []
        for start in range(0, steps, chunk):
            index = order[start : start + chunk]
            batches = jax.tree.map(lambda x: np.asarray(x)[np.maximum(index, 0)], data)
            if last_batch == "mask":  # padding rows fit nothing
                real = (index >= 0).reshape(index.shape + (1,) * (batches["loss_mask"].ndim - 2))
                batches = {**batches, "loss_mask": batches["loss_mask"] & real}
            state, out = train_epoch(state, batches, *args)
            out = sharding_lib.to_host(out)
            finite = out["finite"]
            if not finite.all():
                bar.close()
                bad = int(np.argmin(finite))
                examples = index[bad][index[bad] >= 0]
                raise NonFiniteError(
                    f"{desc}: non-finite loss, gradient or update (loss {float(out['loss'][bad]):.6g}, gradient "
                    f"norm {float(out['grad_norm'][bad]):.6g}) at epoch {epoch}, step {start + bad} of {steps} (batch of "
                    f"examples {_summary(examples)}); stopped with the last finite state. Check the data of "
                    "those examples, and lower optimizer.learning_rate or set optimizer.clip_norm", state)
            outs.append(out)
            bar.update(len(index))
            bar.set_postfix(loss=f"{float(out['loss'][-1]):.4f}")
            if failpoint:
                failpoints.reach(f"{failpoint}/{epoch}/{start}")
        metrics = {k: float(np.mean(np.concatenate([np.asarray(o[k]) for o in outs]))) for k in outs[0]
                   if k != "finite"}
    bar.close()
    return state, metrics


def _summary(examples: np.ndarray) -> str:
    shown = ", ".join(str(i) for i in examples[:8])
    return f"[{shown}{', ...' if len(examples) > 8 else ''}]"


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    mesh: Mesh | None = None,
    state: TrainState | None = None,
    *,
    prepare: Callable[[Any, Batch], Batch] | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """``train_step(state, batch, extra=None, halt=False) -> (state, metrics)``, jitted with the
    state donated. A step whose loss, gradient or update is not finite (``metrics["finite"]``
    False), or one told to ``halt``, returns the state unchanged.

    ``prepare(extra, batch) -> batch`` runs inside the step before the loss (see
    :func:`make_train_epoch`). With a ``mesh`` (and a ``state`` to read shapes from), parameters and
    optimizer slots keep their logical-axis shardings and the batch is split over ``data``/``fsdp``;
    the result equals the single-device step up to float reassociation. ``extra`` keeps the
    shardings it comes with.
    """
    step = _step_fn(loss_fn, optimizer)

    def prepared_step(state: TrainState, batch: Batch, extra: Any = None, halt: jax.Array | bool = False):
        return step(state, batch if prepare is None else prepare(extra, batch), halt)

    if mesh is None:
        return jax.jit(prepared_step, donate_argnums=0)
    if state is None:
        raise ValueError("make_train_step(mesh=...) needs `state` to derive the shardings")
    shardings = state_shardings(state, mesh)
    # one spec for every batch array: the leading (example) axis over data x fsdp, the rest whole
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    jitted = jax.jit(prepared_step, out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
                     donate_argnums=0)

    def sharded_step(state: TrainState, batch: Batch, extra: Any = None, halt: jax.Array | bool = False):
        # committed inputs carry their shardings into the jit: the state's are the step's; the mesh
        # in context lets a Pallas attention kernel split itself over it (models.flash)
        with jax.set_mesh(mesh):
            return jitted(sharding_lib.put(state, shardings), sharding_lib.put(batch, batch_sharding), extra, halt)

    sharded_step.jitted = jitted  # for lowering from abstract inputs (qsharp plan)
    return sharded_step
