"""The append-only rollout store: atomic iterations, checksums, crash leftovers."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from qsharp_jax.storage import RolloutStore, atomic_write


def data(n, t, seed):
    rng = np.random.default_rng(seed)
    return {"tokens": rng.integers(0, 9, size=(n, t)).astype(np.int32), "rewards": rng.random(n).astype(np.float32)}


def test_append_and_load(tmp_path):
    store = RolloutStore(tmp_path)
    a, b = data(3, 4, 0), data(2, 6, 1)
    store.append(0, a)
    store.append(1, b)
    assert store.iterations() == [0, 1] and len(store) == 5
    loaded = store.load()
    np.testing.assert_array_equal(loaded["tokens"][:3, :4], a["tokens"])
    np.testing.assert_array_equal(loaded["tokens"][:3, 4:], 0)  # right-padded to the longest
    np.testing.assert_array_equal(loaded["tokens"][3:], b["tokens"])
    np.testing.assert_array_equal(loaded["rewards"], np.concatenate([a["rewards"], b["rewards"]]))
    np.testing.assert_array_equal(store.load(upto=0)["tokens"], a["tokens"])
    assert RolloutStore(tmp_path).iterations() == [0, 1]  # a new handle sees the same


def test_bad_appends(tmp_path):
    store = RolloutStore(tmp_path)
    store.append(0, data(2, 3, 0))
    with pytest.raises(ValueError, match="already stored"):
        store.append(0, data(2, 3, 0))
    with pytest.raises(ValueError, match="share a leading"):
        store.append(1, {"tokens": np.zeros((2, 3)), "rewards": np.zeros(3)})
    with pytest.raises(ValueError, match="has keys"):
        store.append(1, {"tokens": np.zeros((2, 3))})
    assert store.iterations() == [0]


def test_corrupt_shard_is_detected(tmp_path):
    store = RolloutStore(tmp_path)
    store.append(0, data(2, 3, 0))
    shard = tmp_path / "iteration-00000.npz"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="is corrupt"):
        store.load()


@pytest.mark.parametrize("damage", ["truncated shard", "missing shard", "corrupt manifest", "truncated manifest"])
def test_damaged_store_is_refused_by_name(tmp_path, damage):
    """Whatever is damaged, loading names the file and refuses to train on it."""
    store = RolloutStore(tmp_path)
    store.append(0, data(2, 3, 0))
    shard, manifest = tmp_path / "iteration-00000.npz", tmp_path / "manifest.json"
    if damage == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:50])
        expected = "iteration-00000.npz is corrupt"
    elif damage == "missing shard":
        shard.unlink()
        expected = "iteration-00000.npz is missing"
    elif damage == "corrupt manifest":
        manifest.write_text("{not json")
        expected = "manifest.json is corrupt"
    else:
        manifest.write_bytes(manifest.read_bytes()[:20])
        expected = "manifest.json is corrupt"
    with pytest.raises(ValueError, match=expected):
        RolloutStore(tmp_path).load()


def test_verified_shards_are_read_once_and_changes_still_caught(tmp_path, monkeypatch):
    from qsharp_jax import storage

    store = RolloutStore(tmp_path)
    store.append(0, data(2, 3, 0))
    store.append(1, data(2, 3, 1))
    hashed = []
    real = storage.sha256
    monkeypatch.setattr(storage, "sha256", lambda path: hashed.append(path.name) or real(path))
    first = store.load()
    store.append(2, data(2, 3, 2))
    hashed.clear()
    second = store.load()
    assert hashed == ["iteration-00002.npz"]  # only the new shard is read and verified
    np.testing.assert_array_equal(second["tokens"][:4], first["tokens"])
    second["tokens"][:] = -1  # callers get copies; the cache is untouched
    np.testing.assert_array_equal(store.load()["tokens"][:4], first["tokens"])
    shard = tmp_path / "iteration-00001.npz"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF
    shard.write_bytes(bytes(raw) + b"x")  # a changed file is verified again
    with pytest.raises(ValueError, match="iteration-00001.npz is corrupt"):
        store.load()
    shard.unlink()
    with pytest.raises(ValueError, match="is missing"):
        store.load()


def test_failed_write_records_nothing(tmp_path, monkeypatch):
    store = RolloutStore(tmp_path)
    store.append(0, data(2, 3, 0))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space left"):
        store.append(1, data(2, 3, 1))
    monkeypatch.undo()
    assert store.iterations() == [0]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left
    store.append(1, data(2, 3, 1))  # the retry works
    assert store.iterations() == [0, 1]


def test_kill_during_append_leaves_whole_iterations(tmp_path):
    """A writer killed with SIGKILL at random moments never leaves a half iteration behind."""
    script = textwrap.dedent(f"""
        import numpy as np
        from qsharp_jax.storage import RolloutStore
        store = RolloutStore({str(tmp_path)!r})
        start = max(store.iterations(), default=-1) + 1
        for i in range(start, start + 1000):
            store.append(i, {{"x": np.full((64, 512), i, np.int32)}})
    """)
    for delay in (0.5, 0.8, 1.1):
        proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.getcwd()})
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    store = RolloutStore(tmp_path)
    iterations = store.iterations()
    assert iterations == list(range(len(iterations))) and len(iterations) > 0
    x = store.load()["x"]
    np.testing.assert_array_equal(x, np.repeat(np.arange(len(iterations)), 64)[:, None] * np.ones((1, 512), int))
    json.loads((tmp_path / "manifest.json").read_text())  # the manifest is always valid JSON


def test_atomic_writes_get_the_permissions_of_an_ordinary_file(tmp_path):
    atomic_write(tmp_path / "results.json", lambda f: f.write(b"{}"))
    (tmp_path / "plain.json").write_bytes(b"{}")
    assert (tmp_path / "results.json").stat().st_mode == (tmp_path / "plain.json").stat().st_mode
