"""Multi-host start-up: one JAX runtime over several processes (one per host of a pod).

Every process runs the same program; :func:`initialize` joins them before JAX touches a device.
Where the processes come from:

- explicit arguments (the ``qsharp`` flags ``--coordinator-address``, ``--num-processes``,
  ``--process-id``), else the environment variables ``JAX_COORDINATOR_ADDRESS`` (JAX's own),
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``;
- else a cluster JAX detects by itself: Cloud TPU VMs (GCE / GKE), SLURM (``srun``), Open MPI
  (``mpirun``);
- else nothing: a single process, the default, needs no set-up.

On CPUs the processes exchange data through gloo (``jax_cpu_collectives_implementation``), so
the same code runs as several CPU processes on one machine (the tests do).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import socket
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

__all__ = ["Processes", "barrier", "check_same_everywhere", "check_shared_directory", "detected_cluster", "initialize",
           "is_main"]

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"

# JAX's cluster detectors that need no opt-in (mpi4py's would claim any machine with mpi4py
# installed; Kubernetes needs the `kubernetes` package and is asked for explicitly).
_AUTO_CLUSTERS = ("GceTpuCluster", "GkeTpuCluster", "SlurmCluster", "OmpiCluster")


@dataclasses.dataclass(frozen=True)
class Processes:
    """Where this process stands: ``process_id`` of ``num_processes``, ``local_devices`` of
    ``global_devices``; ``coordinator`` is None for a single process."""

    process_id: int
    num_processes: int
    local_devices: int
    global_devices: int
    coordinator: str | None


def detected_cluster() -> str | None:
    """The name of the cluster environment JAX would join by itself (TPU VM, SLURM, Open MPI), if any.
    Reads the environment (on a Cloud TPU VM, also its metadata server); starts no backend."""
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # a JAX without the detector: only explicit start-up
        return None
    for cluster in ClusterEnv._cluster_types:
        if cluster.__name__ in _AUTO_CLUSTERS and cluster.is_env_present():
            return cluster.__name__
    return None


def _int_env(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"the environment variable {name}={raw!r} must be an integer") from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 300) -> Processes:
    """Join this process to the job's other processes (idempotent; call before any JAX work).

    Arguments win over the environment (module docstring). With none of either and no cluster
    detected, this is a single process and nothing is started. ``timeout_s``: how long to wait for
    the coordinator and the other processes before failing with the coordinator's address in the
    message. Returns where this process stands.
    """
    address = coordinator_address or os.environ.get(ENV_ADDRESS) or None
    count = num_processes if num_processes is not None else _int_env(ENV_COUNT)
    pid = process_id if process_id is not None else _int_env(ENV_ID)
    cluster = detected_cluster()
    explicit = (address, count, pid)
    if jax.distributed.is_initialized():
        return _where()
    if all(x is None for x in explicit) and cluster is None:
        return _where()
    if cluster is None and None in explicit:
        missing = [name for name, x in zip((ENV_ADDRESS, ENV_COUNT, ENV_ID), explicit) if x is None]
        raise ValueError(f"multi-process start-up needs the coordinator's address, the number of processes and "
                         f"this process's id; missing: {', '.join(missing)} (set them, or pass "
                         "--coordinator-address, --num-processes and --process-id)")
    if count is not None and count < 1 or pid is not None and count is not None and not 0 <= pid < count:
        raise ValueError(f"process id {pid} is not in [0, {count}): {ENV_ID} counts from 0 to {ENV_COUNT} − 1")
    if count == 1 and cluster is None:
        return _where()
    endpoint = None if address is None else _split_address(address)
    if _backends_started():
        raise RuntimeError("qsharp_jax.distributed.initialize() must run before JAX uses a device (first thing in "
                           "the program): this process already started its JAX backends")
    if _platforms_include_cpu():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    who, where = f"process {pid} of {count}", address or f"the {cluster} coordinator"
    if endpoint is not None and pid not in (None, 0):
        # JAX's client aborts the whole process (no exception) when the coordinator never answers
        _wait_for_coordinator(endpoint, timeout_s, lambda reason: _join_failed(who, where, timeout_s, reason))
    try:
        jax.distributed.initialize(address, count, pid, initialization_timeout=timeout_s)
    except Exception as e:  # the runtime's own errors say little about which address failed
        raise _join_failed(who, where, timeout_s, " ".join(str(e).split())[:300]) from e
    return _where()


def _join_failed(who: str, where: str, timeout_s: float, reason: str) -> TimeoutError:
    return TimeoutError(f"{who} could not join the job at {where} within {timeout_s:g} s ({reason}); check that "
                        "process 0 runs and that the address is reachable from every host")


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"the coordinator address {address!r} must look like HOST:PORT (e.g. 10.0.0.2:1234)")
    return host.strip("[]"), int(port)


def _wait_for_coordinator(endpoint: tuple[str, int], timeout_s: float, failed) -> None:
    """Return once ``endpoint`` (host, port) accepts a connection; after ``timeout_s`` raise
    ``failed(reason)``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(endpoint, timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise failed(f"no answer: {e}") from None
            time.sleep(0.25)


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:
        return False
    return bool(getattr(xla_bridge, "backends_are_initialized", lambda: False)())


def _platforms_include_cpu() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    return not platforms or "cpu" in platforms.split(",")


def _where() -> Processes:
    coordinator = None
    if jax.distributed.is_initialized():
        from jax._src import distributed as _d

        coordinator = _d.global_state.coordinator_address
    return Processes(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
                     coordinator)


def is_main() -> bool:
    """Whether this process writes what one process writes for all (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (e.g. after process 0 wrote a file the
    others read next). A no-op in a single process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def on_main(name: str, write: Callable[[], Any]) -> None:
    """Run ``write`` on process 0 only (what one process writes for all: a file, a move), then
    wait for every process at the point ``name``. An error of ``write`` is raised on every process
    (the same exception), so the others stop with it instead of waiting at the next collective until
    JAX's heartbeat times out. ``write()`` in a single process."""
    if jax.process_count() == 1:
        write()
        return
    error = None
    if is_main():
        try:
            write()
        except Exception as e:  # noqa: BLE001 -- re-raised below, on every process
            error = e
    every = gather_objects((name, _portable(error)))
    if any(point != name for point, _ in every):
        raise RuntimeError(f"the processes reached different points ({sorted({p for p, _ in every})}): a bug")
    if error is not None:
        raise error
    if every[0][1] is not None:
        raise every[0][1]


def _portable(error: Exception | None) -> Exception | None:
    """``error`` as the other processes can raise it (a RuntimeError with its text if it does not pickle)."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 -- any pickling failure: send the text
        return RuntimeError(f"process 0: {type(error).__name__}: {error}")


def check_shared_directory(directory: str | Path) -> None:
    """Fail on every process unless ``directory`` is one directory that all processes see (a run
    directory on a pod must be on a shared filesystem: process 0 writes what the others read).
    Process 0 leaves a marker file there; every other process must find it. A no-op in a single
    process."""
    if jax.process_count() == 1:
        return
    directory = Path(directory)
    token = hashlib.sha256(f"{os.getpid()}-{time.time_ns()}".encode()).hexdigest()[:16]
    token = _broadcast_text(token)
    marker = directory / f".shared-check-{token}"
    if is_main():
        directory.mkdir(parents=True, exist_ok=True)
        marker.write_text(token)
    barrier(f"shared-check-written-{token}")
    every = _gather(np.asarray([marker.exists() and marker.read_text() == token], np.int32)).ravel()
    barrier(f"shared-check-read-{token}")
    if is_main():
        marker.unlink(missing_ok=True)
    blind = [i for i in range(len(every)) if not every[i]]
    if blind:
        raise ValueError(f"the run directory {directory} is not shared: processes {blind} do not see what process 0 "
                         "wrote there; put it on a filesystem every host mounts at the same path (NFS, Filestore, "
                         "Lustre, GCS through gcsfuse)")


def _gather(mine: np.ndarray) -> np.ndarray:
    """Every process's ``mine`` (a small host array of one shape), stacked by process id."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(mine))


def gather_objects(value: Any) -> list[Any]:
    """Every process's ``value`` (any picklable object: e.g. the answers a host extracted from the
    completions it decoded), listed by process id. A collective: every process must call it, in the
    same order. ``[value]`` in a single process."""
    if jax.process_count() == 1:
        return [value]
    raw = pickle.dumps(value)
    sizes = _gather(np.asarray([len(raw)], np.int32)).ravel()
    padded = np.zeros(-(-int(sizes.max()) // 4), np.int32)  # bytes travel as int32 words (the collectives' type)
    padded.view(np.uint8)[: len(raw)] = np.frombuffer(raw, np.uint8)
    every = _gather(padded)
    return [pickle.loads(every[i].view(np.uint8)[: sizes[i]].tobytes()) for i in range(len(sizes))]


def _broadcast_text(text: str) -> str:
    """Process 0's ``text`` (ASCII, up to 64 characters) on every process."""
    from jax.experimental import multihost_utils

    raw = np.zeros(64, np.int32)
    raw[: len(text)] = np.frombuffer(text.encode(), np.uint8)
    raw = np.asarray(multihost_utils.broadcast_one_to_all(raw))
    return bytes(raw[raw > 0].astype(np.uint8)).decode()


def check_same_everywhere(what: str, value: Any) -> None:
    """Fail on every process unless all processes hold the same ``value`` (JSON-able; compared by
    a hash). A no-op in a single process."""
    if jax.process_count() == 1:
        return
    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).digest()[:8]
    every = _gather(np.frombuffer(digest, np.uint8).astype(np.int32))
    differ = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
    if differ:
        raise ValueError(f"the processes disagree on {what}: processes {differ} differ from process 0 (hash); "
                         "start every process with the same command, config and files")
