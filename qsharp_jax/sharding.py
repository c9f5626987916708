"""Meshes, logical-axis rules and parameter/batch shardings.

Every parameter carries logical axis names (``vocab``, ``embed``, ``mlp``, ``heads``, ``kv_heads``,
``head_dim``, ``layers``, ...). One rule table maps them to the mesh axes ``data``, ``fsdp`` and
``tensor``; everything else (placement at load time, jitted steps) asks this module for
``NamedSharding``s. This is the modern form of ``pmap``: ``jit`` over a ``Mesh`` with explicit
shardings (JAX itself now implements ``pmap`` with ``jit`` + ``shard_map``).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("positions", None),
    ("atoms", None),
    ("length", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh; ``-1`` takes the devices left over (like a reshape)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into fsdp*tensor*... = {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs {math.prod(sizes)} devices, "
            f"have {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
) -> PartitionSpec:
    """Map logical axis names to a ``PartitionSpec`` on ``mesh``.

    A dimension that the mesh axes do not divide is replicated instead (logged): a tiny test model
    on 8 devices must still load, and it stays correct, only less spread out.
    """
    table = dict(rules)
    spec, used = [], set()
    for name, dim in zip(axes, shape):
        if name is not None and name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        target = table.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        if mesh_axes and dim % size:
            log.info("replicating logical axis %r of size %d: not divisible by mesh %s", name, dim, mesh_axes)
            mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def logical_sharding(
    axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def state_shardings(state: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """``NamedSharding`` for every array in an NNX state (abstract or concrete), from its logical axes.

    A variable without axis names is replicated.
    """
    specs = nnx.get_partition_spec(state)

    def one(var: Any, spec: Any) -> Any:
        names = tuple(spec.get_value()) if isinstance(spec, nnx.Variable) else ()
        shape = var.get_value().shape if isinstance(var, nnx.Variable) else var.shape
        names = names or (None,) * len(shape)
        return logical_sharding(names, shape, mesh, rules)

    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    return jax.tree.map(one, state, specs, is_leaf=is_var)


def place(module: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """The NNX ``module`` with its parameters moved onto ``mesh`` by their logical axes."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, put(state, state_shardings(state, mesh, rules)))


def put(tree: Any, shardings: Any) -> Any:
    """``jax.device_put`` that also builds global arrays on a multi-process mesh.

    A leaf bound for devices of other processes must hold the same value on every process (the
    parameters of one seed, a batch every process computed alike): each process places the shards
    its own devices hold (``jax.make_array_from_callback``). A leaf that already is a global array
    is resharded by ``device_put``.
    """

    def one(x: Any, sharding: Any) -> Any:
        if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            return jax.device_put(x, sharding)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys travel as their raw data
            return jax.random.wrap_key_data(one(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    # `shardings` may be a prefix of `tree` (one sharding for an NNX variable, or for everything)
    return jax.tree.map(lambda s, sub: jax.tree.map(lambda x: one(x, s), sub), shardings, tree,
                        is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))


def context_mesh():
    """The mesh of ``jax.set_mesh`` (under jit the only way to know it: traced parameters do not say
    which mesh they are on); None: none, or one device."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 else mesh


def from_process_rows(local: np.ndarray, sharding: NamedSharding, rows: int) -> jax.Array:
    """A global ``[rows, ...]`` array split over its rows by ``sharding``, from this process's rows
    alone (``local``: the rows its devices hold, in order; a pod's host passes only what it made).
    ``jax.make_array_from_process_local_data``; in a single process, ``local`` is every row."""
    return jax.make_array_from_process_local_data(sharding, np.asarray(local), (rows, *np.shape(local)[1:]))


def to_host(tree: Any) -> Any:
    """Numpy copies of a tree of arrays, whole on every process (gathered from the other processes
    where a global array has shards there)."""

    def one(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Shard the leading (batch) axis over ``data`` and ``fsdp``; replicate the rest."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))
