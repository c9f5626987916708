"""Append-only on-disk store for Algorithm 1's aggregated data.

Each iteration's data is one ``.npz`` shard; ``manifest.json`` lists the complete shards. Both are
written to a temporary file, flushed to disk and renamed into place, and the manifest is updated
only after its shard is durable — so after a crash (even ``kill -9`` or a full disk) an iteration
is either wholly present or absent, and nothing recorded before is touched. Shards that the
manifest does not list are leftovers of an interrupted write and are ignored (and overwritten on
the retry).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Mapping

import numpy as np

from qsharp_jax import failpoints

MANIFEST = "manifest.json"


@functools.cache
def _file_mode() -> int:
    """What ``open()`` gives a new file: 0666 less the process's umask (read once)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write, failpoint: str | None = None) -> None:
    """Write through ``write(file)`` to a temp file beside ``path``, fsync, then rename over it.

    ``failpoint``: the name of this write for the fault-injection tests (``<name>/written`` before
    the rename, ``<name>/renamed`` after it; see :mod:`qsharp_jax.failpoints`).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode())  # mkstemp's 0600 would hide results from the group
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if failpoint:
            failpoints.reach(f"{failpoint}/written")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    if failpoint:
        failpoints.reach(f"{failpoint}/renamed")


def check_local_path(path: str, field: str) -> None:
    """Refuse a URL (``gs://``, ``s3://``...) where a directory is written: run directories take a
    lock (``flock``) and replace files atomically (``rename``), which object stores do not offer."""
    scheme = path.split("://", 1)[0] if "://" in path else ""
    if scheme:
        raise ValueError(f"{field}={path!r} is a URL ({scheme}://); qsharp writes its directories through a "
                         "filesystem (a run takes a file lock and replaces files atomically, which object stores do "
                         f"not offer): mount the bucket (e.g. gcsfuse) and give {field} the mounted path")


def aside_name(prefix: str) -> str:
    """A unique, time-stamped name for moving something aside (kept, never deleted):
    ``<prefix>-YYYYmmdd-HHMMSS-<nanoseconds>``."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9:09d}"


def sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class RolloutStore:
    """Shards of equal-keyed arrays, one per iteration, concatenated on load along axis 0."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        # verified shard contents, keyed by what would change if the file did: a long run's fit
        # re-reads only the newest shard each iteration instead of re-hashing all of them
        self._verified: dict[tuple, dict[str, np.ndarray]] = {}

    def _manifest(self) -> dict:
        file = self.path / MANIFEST
        if not file.exists():
            return {"shards": []}
        try:
            manifest = json.loads(file.read_text())
            assert isinstance(manifest["shards"], list)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise ValueError(f"{file} is corrupt (not the store's JSON manifest); the store cannot be trusted. "
                             "Restore it from a backup, or start a new run directory") from None
        return manifest

    def iterations(self) -> list[int]:
        """Iterations whose data is complete, in order."""
        return [s["iteration"] for s in self._manifest()["shards"]]

    def __len__(self) -> int:
        return sum(s["examples"] for s in self._manifest()["shards"])

    def append(self, iteration: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Record one iteration's data (all arrays share their leading length)."""
        manifest = self._manifest()
        done = [s["iteration"] for s in manifest["shards"]]
        if iteration in done:
            raise ValueError(f"iteration {iteration} is already stored in {self.path}; data is append-only")
        if done and iteration < max(done):
            raise ValueError(f"iteration {iteration} comes after stored iteration {max(done)}")
        lengths = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in arrays.items()}
        if not arrays or None in lengths.values() or len(set(lengths.values())) != 1:
            raise ValueError(f"arrays must share a leading (example) axis; got leading sizes {lengths}")
        if manifest["shards"]:
            keys = set(manifest["shards"][0]["keys"])
            if set(arrays) != keys:
                raise ValueError(f"iteration {iteration} has keys {sorted(arrays)}, the store has {sorted(keys)}")
        shard = self.path / f"iteration-{iteration:05d}.npz"
        atomic_write(shard, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}),
                     failpoint=f"store/{iteration}/shard")
        manifest["shards"].append({
            "iteration": iteration, "file": shard.name, "examples": int(next(iter(lengths.values()))),
            "keys": sorted(arrays), "sha256": sha256(shard),
        })
        atomic_write(self.path / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()),
                     failpoint=f"store/{iteration}/manifest")

    def load(self, upto: int | None = None) -> dict[str, np.ndarray]:
        """All complete iterations (``<= upto`` if given), concatenated; checksums verified.

        Arrays of different trailing length (e.g. longer responses in a later iteration) are
        right-padded with zeros to the longest.
        """
        shards = [s for s in self._manifest()["shards"] if upto is None or s["iteration"] <= upto]
        if not shards:
            return {}
        parts: dict[str, list[np.ndarray]] = {}
        for s in shards:
            for key, array in self._read(s).items():
                parts.setdefault(key, []).append(array)
        return {key: _concatenate(arrays) for key, arrays in parts.items()}

    def _read(self, shard: dict) -> dict[str, np.ndarray]:
        file = self.path / shard["file"]
        try:
            stat = file.stat()
        except FileNotFoundError:
            raise ValueError(f"{file} is missing; the store cannot be trusted") from None
        key = (shard["file"], shard["sha256"], stat.st_size, stat.st_mtime_ns)
        if key not in self._verified:
            if sha256(file) != shard["sha256"]:
                raise ValueError(f"{file} is corrupt (checksum mismatch); the store cannot be trusted")
            with np.load(file) as data:
                self._verified[key] = {k: data[k] for k in shard["keys"]}
        return self._verified[key]


def _concatenate(arrays: list[np.ndarray]) -> np.ndarray:
    if arrays[0].ndim < 2:
        return np.concatenate(arrays)
    width = max(a.shape[1] for a in arrays)
    padded = [np.pad(a, [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2)) for a in arrays]
    return np.concatenate(padded)
