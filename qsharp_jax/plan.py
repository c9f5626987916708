"""Dry runs at full size without weights (``qsharp plan``): a run's π_ref, value model and train
state are built abstractly (``nnx.eval_shape``: shapes, dtypes and shardings, no memory), and the
rollout and the train step are lowered and compiled for the current devices exactly as the run
would call them. XLA's own memory analysis of each compiled program then gives the bytes per
device; the resident parameters and the KV caches are also counted from the shardings.

On a CPU machine, fake the pod's device count (``qsharp plan --cpu-devices 8``): the layout, the
collectives and the per-device shapes are those of 8 accelerators; XLA:CPU's buffer assignment
approximates an accelerator's (same shapes, other fusion), so treat the totals as estimates.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qsharp_jax import objectives, rollout
from qsharp_jax import sharding as sharding_lib
from qsharp_jax.algorithm import check_mesh
from qsharp_jax.models import hf
from qsharp_jax.models.transformer import Transformer, TransformerConfig
from qsharp_jax.models.value import ValueModel
from qsharp_jax.runs import RunConfig
from qsharp_jax.train import init_state, make_optimizer, make_train_step
from qsharp_jax.train import state_shardings as train_state_shardings

# The keys of the last line ``qsharp plan`` prints (DESIGN.md §4), in order.
SUMMARY_KEYS = ("ref_params_bytes_per_device", "value_state_bytes_per_device", "kv_cache_bytes_per_device",
                "train_activation_bytes_per_device", "total_bytes_per_device")


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What one rollout call and one train step hold: rows per rollout call ``rollout_rows``
    (decoded ``cache_rows`` at a time: continuous batching's slots, else all of them), prompt
    tokens ``prompt_len``, response tokens ``new_tokens``, examples per train step ``train_batch``
    of ``train_len`` tokens."""

    rollout_rows: int
    prompt_len: int
    new_tokens: int
    train_batch: int
    train_len: int
    cache_rows: int = 0  # 0: rollout_rows (the static loop)

    @property
    def slots(self) -> int | None:
        return self.cache_rows if self.cache_rows and self.cache_rows < self.rollout_rows else None


def shapes_of(cfg: RunConfig, mesh: Mesh) -> Shapes:
    """The run's largest shapes: a full rollout chunk (rounded up to the batch shards) of prompts as
    long as the task allows, and train examples of prompt + response."""
    algo = cfg.algorithm
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = min(algo.rollout_batch, algo.prompts_per_iteration * algo.samples_per_prompt)
    prompt_len = cfg.math.max_prompt_len if cfg.task == "math" else 16
    return Shapes(rollout_rows=shards * math.ceil(rows / shards), prompt_len=prompt_len,
                  new_tokens=algo.max_new_tokens, train_batch=algo.batch_size,  # whole shards (check_mesh)
                  train_len=prompt_len + algo.max_new_tokens,
                  cache_rows=algo.rollout_slots)  # continuous batching: caches and logits are the slots'


def _sharded(abstract: Any, shardings: Any) -> Any:
    """Abstract arrays (bare, or inside NNX variables) that carry their shardings (what ``lower``
    reads the layout from)."""
    def one(x, s):
        if isinstance(x, nnx.Variable):
            value = x.get_value()
            return x.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=s))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree.map(one, abstract, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded abstract arrays (the largest shard of each)."""
    total = 0
    for x in jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, nnx.Variable)):
        x = x.get_value() if isinstance(x, nnx.Variable) else x
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        key = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        total += math.prod(shard) * (8 if key else jnp.dtype(x.dtype).itemsize)  # a threefry key: 2 × uint32
    return total


def _abstract_module(cls: type, mesh: Mesh, *args, **kwargs) -> tuple[nnx.GraphDef, Any]:
    graphdef, state = hf.abstract_model(cls, *args, **kwargs)
    return graphdef, _sharded(state, sharding_lib.state_shardings(state, mesh))


def kv_cache_bytes(model: TransformerConfig, rows: int, slots: int, dtype, mesh: Mesh) -> int:
    """Per device: keys and values of every layer for ``rows`` sequences of ``slots`` positions
    (rows over data × fsdp, KV heads over tensor where they divide)."""
    rows_per = math.ceil(rows / (mesh.shape["data"] * mesh.shape["fsdp"]))
    tensor = mesh.shape["tensor"]
    heads_per = model.num_kv_heads // tensor if model.num_kv_heads % tensor == 0 else model.num_kv_heads
    return 2 * model.num_layers * rows_per * heads_per * slots * model.head_dim * jnp.dtype(dtype).itemsize


def _memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    if m is None:  # a backend without the analysis
        return {}
    out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes}
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def plan(cfg: RunConfig, *, compile: bool | tuple[str, ...] = True, report: Callable[[str], None] = print
         ) -> dict[str, Any]:
    """Lower (and ``compile``: all, none, or the named of ``rollout``, ``train_step``) the run's
    rollout and train step at full size on this process's devices; returns the shapes, each
    compiled program's memory analysis and the summary bytes per device (:data:`SUMMARY_KEYS`).
    ``report`` receives a line per stage (progress on long compiles).

    XLA:CPU runs a bfloat16 matmul by copying its weights to float32 (temporaries no GPU or TPU
    allocates: 55 GiB of them for Llama 3 8B), so on CPU bfloat16 models are compiled in float32:
    parameters are counted at their real dtype, and the rollout's temporaries are corrected from
    float32 to real-dtype KV caches; the remaining float32 activations make the figures upper
    bounds.
    """
    if cfg.algorithm.loss == "categorical_bellman":
        raise ValueError("qsharp plan covers the Monte-Carlo value losses; categorical_bellman also runs π_ref "
                         "inside the train step and is not planned yet")
    mesh = sharding_lib.make_mesh(*(cfg.mesh or (-1, 1, 1)))
    check_mesh(cfg.algorithm, mesh)  # what the run itself would refuse
    shapes = shapes_of(cfg, mesh)
    algo = cfg.algorithm
    ref_cfg, value_cfg = cfg.reference.transformer_config(), cfg.value.transformer_config()
    real = {"ref": jnp.dtype(cfg.reference.dtype), "value": jnp.dtype(cfg.value.dtype)}
    on_cpu = jax.devices()[0].platform == "cpu"
    compiled_as = {k: jnp.dtype(jnp.float32) if on_cpu else d for k, d in real.items()}
    report(f"mesh {dict(mesh.shape)} on {mesh.devices.size} {jax.devices()[0].platform} devices; {shapes}"
           + ("; compiled in float32 (XLA:CPU), counted at the real dtypes" if compiled_as != real else ""))
    optimizer = make_optimizer(algo.optimizer)

    def models(dtypes):
        ref = _abstract_module(Transformer, mesh, ref_cfg, dtype=dtypes["ref"])
        value = _abstract_module(ValueModel, mesh, value_cfg, cfg.head, dtype=dtypes["value"])
        state = jax.eval_shape(lambda: init_state(
            ValueModel(value_cfg, cfg.head, dtype=dtypes["value"], rngs=nnx.Rngs(0)), optimizer, jax.random.key(0)))
        return ref, value, state

    (ref_graph, ref_state), (value_graph, value_state), abstract_state = models(compiled_as)
    train_state = _sharded(abstract_state, train_state_shardings(abstract_state, mesh))

    batch2 = sharding_lib.batch_sharding(mesh, 2)
    batch1 = sharding_lib.batch_sharding(mesh, 1)
    rows, p = shapes.rollout_rows, shapes.prompt_len
    prompt_ids = jax.ShapeDtypeStruct((rows, p), jnp.int32, sharding=batch2)
    prompt_mask = jax.ShapeDtypeStruct((rows, p), jnp.bool_, sharding=batch2)
    switch = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=batch1)
    key = jax.eval_shape(lambda: jax.random.key(0))
    settings = dict(max_new_tokens=shapes.new_tokens, top_k=algo.top_k, temperature=algo.temperature,
                    top_p=algo.top_p, eos_id=0, pad_id=0, guidance=algo.guidance, eta=algo.eta)

    if shapes.slots:  # the continuous loop: a queue of rollout_rows rows through the slots
        settings["slots"] = shapes.slots

    def collect(ref_state, value_state, ids, mask, key, switch):
        return rollout.generate(nnx.merge(ref_graph, ref_state), ids, mask, key=key, switch_time=switch,
                                value_model=nnx.merge(value_graph, value_state), **settings)

    step = make_train_step(lambda m, b: objectives.value_loss(m, b, kind=algo.loss), optimizer, mesh, abstract_state)
    example = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    b, t = shapes.train_batch, shapes.train_len
    batch = {"tokens": jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=example),
             "attention_mask": jax.ShapeDtypeStruct((b, t), jnp.bool_, sharding=example),
             "loss_mask": jax.ShapeDtypeStruct((b, t), jnp.bool_, sharding=example),
             "rewards": jax.ShapeDtypeStruct((b,), jnp.float32, sharding=example)}

    programs = {
        "rollout": lambda: _lower_on(mesh, jax.jit(collect), ref_state, value_state, prompt_ids, prompt_mask, key,
                                     switch),
        "train_step": lambda: _lower_on(mesh, step.jitted, train_state, batch, None, False),  # as the run does
    }
    memory: dict[str, dict[str, int]] = {}
    for name, lower in programs.items():
        report(f"lowering the {name}")
        lowered = lower()
        if compile is True or (compile and name in compile):
            report(f"compiling the {name}")
            memory[name] = _memory(lowered.compile())
            if memory[name]:
                report(f"{name} (as compiled): " + " ".join(f"{k}={_gib(v)}" for k, v in memory[name].items()))

    slots = p + shapes.new_tokens

    def kv(dtypes):
        held = shapes.slots or rows  # the rows with caches
        return kv_cache_bytes(ref_cfg, held, slots, dtypes["ref"], mesh) + \
            kv_cache_bytes(value_cfg, held, slots, dtypes["value"], mesh)

    # on CPU the counts need the models again at their real dtypes
    (_, real_ref), _, real_state = models(real) if compiled_as != real else ((None, ref_state), None, abstract_state)
    real_state = _sharded(real_state, train_state_shardings(real_state, mesh))
    rollout_temp = memory.get("rollout", {}).get("temporaries")
    rollout_temp = kv(real) if rollout_temp is None else rollout_temp - kv(compiled_as) + kv(real)
    summary = {"ref_params_bytes_per_device": bytes_per_device(real_ref),
               "value_state_bytes_per_device": bytes_per_device(real_state),
               "kv_cache_bytes_per_device": kv(real),
               "train_activation_bytes_per_device": memory.get("train_step", {}).get("temporaries", 0)}
    # resident: π_ref and the train state; on top, either a rollout (its temporaries hold the
    # caches) or a train step runs at a time
    summary["total_bytes_per_device"] = summary["ref_params_bytes_per_device"] + \
        summary["value_state_bytes_per_device"] + max(rollout_temp, summary["train_activation_bytes_per_device"])
    report("per device: " + ", ".join(f"{k.removesuffix('_bytes_per_device')} {_gib(v)}" for k, v in summary.items()))
    return {"mesh": dict(mesh.shape), "shapes": dataclasses.asdict(shapes), "memory": memory,
            "rollout_temporaries": rollout_temp, "summary": summary}


def _lower_on(mesh: Mesh, fn, *args):
    """``fn.lower(*args)`` with ``mesh`` as the context mesh, as the run has it: the continuous loop
    lays its slots out on it and a Pallas attention kernel splits itself over it (under jit, traced
    parameters do not say which mesh they are on)."""
    with jax.set_mesh(mesh):
        return fn.lower(*args)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}GiB"


_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6,
          "gb": 10**9, "tb": 10**12}


def parse_bytes(text: str) -> float:
    """``16GiB`` / ``80GB`` / ``512MiB`` / a bare number of GiB (``16``) as bytes."""
    raw = text.strip()
    number = raw.rstrip("KMGTiBkmgtib ")
    unit = raw[len(number):].strip().lower()
    try:
        value = float(number)
    except ValueError:
        value = None
    if value is None or unit not in _UNITS or not value > 0:
        raise ValueError(f"device_memory={text!r} must be a positive size like 16GiB, 80GB or 512MiB")
    return value * (2**30 if unit == "" else _UNITS[unit])


def table(summary: dict[str, int], device_memory: float | None = None) -> str:
    """The plan's figures per device as a Markdown table (with the share of ``device_memory``)."""
    rows = ["| per device | bytes | GiB |" + (" of device |" if device_memory else ""),
            "|---|---|---|" + ("---|" if device_memory else "")]
    for k in SUMMARY_KEYS:
        share = f" {summary[k] / device_memory:.0%} |" if device_memory else ""
        rows.append(f"| {k.removesuffix('_bytes_per_device')} | {int(summary[k])} | {summary[k] / 2**30:.2f} |{share}")
    return "\n".join(rows)


def summary_line(summary: dict[str, int]) -> str:
    """The last line of ``qsharp plan``: ``key=bytes`` for :data:`SUMMARY_KEYS`."""
    return " ".join(f"{k}={int(summary[k])}" for k in SUMMARY_KEYS)


def check_fits(summary: dict[str, int], device_memory: float, cfg: RunConfig | None = None) -> None:
    """Refuse a plan that does not fit ``device_memory`` bytes per device, naming what to change
    for the part that needs the most (``cfg``: the run's, for its current settings)."""
    total = summary["total_bytes_per_device"]
    if total <= device_memory:
        return
    parts = ", ".join(f"{k.removesuffix('_bytes_per_device')} {_gib(summary[k])}" for k in SUMMARY_KEYS[:-1])
    resident = summary["ref_params_bytes_per_device"] + summary["value_state_bytes_per_device"]
    algo = cfg.algorithm if cfg is not None else None
    if resident > device_memory:
        advice = ("the parameters alone exceed it: shard them over more devices (raise mesh fsdp or tensor, "
                  "e.g. mesh=[-1,4,1]) or use dtype: bfloat16")
    elif summary["train_activation_bytes_per_device"] >= summary["kv_cache_bytes_per_device"]:
        remat = "" if cfg is None or cfg.value.remat else "set value.remat=true (recompute activations), "
        batch = f"algorithm.batch_size={algo.batch_size}" if algo else "algorithm.batch_size"
        advice = (f"the value model's train step needs the most: {remat}lower {batch}, or split its examples over "
                  "more devices (mesh data x fsdp)")
    else:
        slots = (f"algorithm.rollout_slots={algo.rollout_slots}" if algo and algo.rollout_slots else
                 f"algorithm.rollout_batch={algo.rollout_batch}" if algo else "algorithm.rollout_batch")
        advice = (f"the rollout's KV caches need the most: lower {slots}, or split the rows over more devices (mesh "
                  "data x fsdp; KV heads over tensor)")
    raise ValueError(f"the plan needs {_gib(total)} per device, more than device_memory={_gib(device_memory)} "
                     f"({parts}); {advice}")


__all__ = ["SUMMARY_KEYS", "Shapes", "bytes_per_device", "check_fits", "kv_cache_bytes", "parse_bytes", "plan",
           "shapes_of", "summary_line", "table"]
