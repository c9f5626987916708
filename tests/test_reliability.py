"""Reliability: non-finite values stopped where they start, strict-JSON metrics, one writer per run
directory, the whole config checked before the run directory is touched, the resume policy, and
write errors (a full disk) that leave the run resumable."""

import dataclasses
import errno
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsharp_jax import algorithm, config, guidance, rollout, runs, storage
from qsharp_jax.lock import RunLock, RunLockedError
from qsharp_jax.models.value import HeadConfig, ValueModel
from qsharp_jax.objectives import value_loss
from qsharp_jax.train import NonFiniteError, OptimizerConfig, fit, init_state, make_optimizer, make_train_epoch, \
    make_train_step
from test_algorithm import V, build
from test_checkpoint import CFG, assert_states_equal
from test_train import toy_batch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["algorithm.iterations=1", "algorithm.prompts_per_iteration=8", "algorithm.epochs=1"]


def tiny_run(run_dir, *overrides) -> runs.RunConfig:
    return config.load(runs.RunConfig, ROOT / "experiments/planted_token/config.yaml",
                       [f"run_dir={run_dir}", *TINY, *overrides])


def test_fit_stops_at_the_first_non_finite_step_with_the_last_finite_state():
    """A NaN return in one example of the fourth batch: the fit names the epoch, the step and the
    example, and hands back exactly the state after the three steps before it (run by hand)."""
    order = np.random.default_rng(1).permutation(64).reshape(8, 8)  # the fit's first-epoch batches
    victim = int(order[3, 2])
    data = {k: np.array(v) for k, v in toy_batch(n=64, seed=3).items()}
    data["rewards"][victim] = np.nan
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2))
    fresh = lambda: init_state(ValueModel(CFG, HeadConfig(), rngs=nnx.Rngs(0)), optimizer, jax.random.key(0))  # noqa
    loss = lambda m, b: value_loss(m, b)  # noqa: E731
    with pytest.raises(NonFiniteError, match=rf"fit 4: non-finite loss, gradient or update \(loss \S+, gradient "
                                             rf"norm nan\) at epoch 0, step 3 of 8 \(batch of examples "
                                             rf"\[.*\b{victim}\b.*\]\)") as caught:
        fit(fresh(), make_train_epoch(loss, optimizer), data, epochs=2, batch_size=8,
            rng=np.random.default_rng(1), desc="fit 4", progress=False)
    state, step = fresh(), make_train_step(loss, optimizer)
    for rows in order[:3]:
        state, _ = step(state, {k: v[rows] for k, v in data.items()})
    assert int(caught.value.state.step) == 3
    assert_states_equal(caught.value.state, state)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(caught.value.state.params))


def test_nan_value_model_is_reported_not_read_as_zero_kl():
    """Guided decoding with a NaN value model flags the rows (it used to return KL 0: "the policy
    equals π_ref"); the driver stops; guided_logits refuses a NaN offset."""
    algo, task, ref, value = build()
    graph, state = nnx.split(value)
    value = nnx.merge(graph, jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), state))
    prompts, mask = task.sample_prompts(np.random.default_rng(0), 5)
    out = rollout.generate(ref, prompts, mask, key=jax.random.key(0), max_new_tokens=3, top_k=V, value_model=value,
                           guidance="qsharp", eta=0.1)
    assert not np.asarray(out.finite).any()
    plain = rollout.generate(ref, prompts, mask, key=jax.random.key(0), max_new_tokens=3, top_k=V)
    assert np.asarray(plain.finite).all()
    with pytest.raises(FloatingPointError, match=r"evaluate/3/guided: the value model's guidance was NaN or "
                                                 r"infinite on 5 of 5 rows"):
        algorithm._generate(algo, ref, prompts, mask, jax.random.key(0), failpoint="evaluate/3/guided",
                            max_new_tokens=3, top_k=V, value_model=value, guidance="qsharp", eta=0.1)
    offsets = jnp.array([[0.1, jnp.nan]])
    with pytest.raises(ValueError, match="offsets hold 1 NaN values"):
        guidance.guided_logits(jnp.zeros((1, 4)), jnp.array([[0, 1]]), offsets)


def test_metrics_are_strict_json(tmp_path):
    """A skipped fit (all rewards equal) is null, not a bare NaN that strict parsers reject."""
    algo, task, ref, value = build()

    class Hopeless(type(task)):
        def reward(self, prompts, completions, mask):
            return np.zeros(len(prompts), np.float32)

    with pytest.warns(UserWarning, match="identical"):
        algorithm.run(dataclasses.replace(algo, iterations=1, epochs=1), Hopeless(), ref, value, tmp_path,
                      progress=False)

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    line = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert line["fit_loss"] is None and line["fit_explained_variance"] is None


def test_one_writer_per_run_directory(tmp_path):
    """A second `qsharp train` on a run directory in use is refused with the holder named; after
    a crash (a lock file that still names a holder) the lock is taken over with a warning."""
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match=rf"in use by another qsharp process \(host \S+, pid {os.getpid()}"):
            RunLock(tmp_path).__enter__()
        second = subprocess.run(
            [sys.executable, "-m", "qsharp_jax.cli", "train", "experiments/planted_token/config.yaml",
             f"run_dir={tmp_path}", *TINY], cwd=ROOT, capture_output=True, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert "is in use by another qsharp process (host " in second.stderr and f"pid {os.getpid()}" in \
            second.stderr
        assert not (tmp_path / "config.json").exists()  # nothing was written
        algo, task, ref, value = build()  # the Python API takes the same lock
        with pytest.raises(RunLockedError, match="in use by another qsharp process"):
            algorithm.run(algo, task, ref, value, tmp_path, progress=False)
        assert not (tmp_path / "data").exists()
    assert (tmp_path / "lock").read_text() == ""  # released cleanly
    (tmp_path / "lock").write_text(json.dumps({"host": "node7", "pid": 123, "since": "yesterday"}))
    with pytest.warns(UserWarning, match="named host node7, pid 123, since yesterday, which ended without"):
        with RunLock(tmp_path):
            assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()


def test_bad_config_leaves_no_run_directory(tmp_path):
    """The mesh against the devices, η, top-k against the vocabulary, the atoms against the
    task's rewards: refused before the run directory exists."""
    for overrides, message in [
        (["mesh=[3,1,1]"], "devices"),
        (["algorithm.top_k=9"], "exceeds π_ref's vocabulary of 8"),
        (["head.v_max=0.5"], "the value head's atoms cover"),
        (["algorithm.guidance=bernoulli"], "needs a bernoulli value head"),
    ]:
        with pytest.raises(ValueError, match=message):
            runs.start_or_resume(tiny_run(tmp_path / "run", *overrides), progress=False)
        assert not (tmp_path / "run").exists(), overrides
    with pytest.raises(ValueError, match=r"algorithm.eta \(the KL coefficient η\) must be > 0"):
        tiny_run(tmp_path / "run", "algorithm.eta=0")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        runs.start_or_resume(tiny_run(tmp_path / "file"), progress=False)


def test_a_run_that_never_completed_an_iteration_restarts_with_a_corrected_config(tmp_path):
    """Killed during its first fit (data of iteration 0 on disk, no checkpoint), a run may be
    restarted with another η: the partial run is moved aside, not mixed in, not deleted. Once an
    iteration is complete, a changed η is refused by name."""
    run_dir = tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, "-m", "qsharp_jax.cli", "train", "experiments/planted_token/config.yaml",
         f"run_dir={run_dir}", *TINY], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "QSHARP_FAILPOINT": "fit/0/0/0"})
    assert killed.returncode == -9 and storage.RolloutStore(run_dir / "data").iterations() == [0]
    with pytest.warns(UserWarning, match="completed no iteration under its saved config"):
        history = runs.start_or_resume(tiny_run(run_dir, "algorithm.eta=0.1"), progress=False)
    assert len(history) == 1
    abandoned = list(run_dir.glob("abandoned-*"))
    assert len(abandoned) == 1 and json.loads((abandoned[0] / "config.json").read_text())["algorithm"]["eta"] == 0.05
    assert (abandoned[0] / "data" / "iteration-00000.npz").exists()
    with pytest.raises(ValueError, match=r"fields that differ: algorithm.eta \(saved 0.1, now 0.2\)"):
        runs.start_or_resume(tiny_run(run_dir, "algorithm.eta=0.2"), progress=False)


def test_resume_policy_run_dir_keep_checkpoints_and_rollout_batch_may_change(tmp_path, monkeypatch):
    """A run moved to another directory, resumed with another keep_checkpoints and a lower
    rollout_batch, ends where the uninterrupted run does: the same tokens, data, fit and rewards;
    the KL (a float sum over the sampled rows) to float rounding, as XLA:CPU's matmuls of
    another batch size round their last bit differently."""
    straight = runs.start_or_resume(tiny_run(tmp_path / "straight", "algorithm.iterations=2"), progress=False)
    runs.start_or_resume(tiny_run(tmp_path / "first"), progress=False)
    os.rename(tmp_path / "first", tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    moved = runs.start_or_resume(tiny_run("moved", "algorithm.iterations=2", "algorithm.keep_checkpoints=1",
                                          "algorithm.rollout_batch=5"), progress=False)
    for m, s in zip(moved, straight, strict=True):
        assert m.keys() == s.keys()
        for key in m:
            if key.endswith("_kl"):
                np.testing.assert_allclose(m[key], s[key], rtol=1e-3, atol=1e-6, err_msg=key)
            else:
                assert m[key] == s[key], key
    with pytest.raises(ValueError, match=r"fields that differ: algorithm.samples_per_prompt"):
        runs.start_or_resume(tiny_run("moved", "algorithm.iterations=2", "algorithm.samples_per_prompt=2"),
                             progress=False)


@pytest.mark.parametrize("where", ["shard", "manifest", "checkpoint", "checksums"])
def test_a_full_disk_leaves_the_run_resumable(tmp_path, monkeypatch, where):
    """ENOSPC while writing the data shard, the manifest, the checkpoint or its checksums: the
    error surfaces (one line in the CLI), what was recorded before is intact, and the rerun ends
    where an uninterrupted run does."""
    expected = runs.start_or_resume(tiny_run(tmp_path / "straight"), progress=False)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    real_write = storage.atomic_write

    def failing_write(path, write, failpoint=None):
        if where in str(failpoint):
            full_disk()
        return real_write(path, write, failpoint)

    if where == "checkpoint":
        import orbax.checkpoint as ocp

        monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    else:
        monkeypatch.setattr(storage, "atomic_write", failing_write)
        monkeypatch.setattr("qsharp_jax.checkpoint.atomic_write", failing_write)
    with pytest.raises(OSError, match="No space left on device"):
        runs.start_or_resume(tiny_run(tmp_path / "run"), progress=False)
    monkeypatch.undo()
    assert not list((tmp_path / "run" / "data").glob(".*.tmp"))  # no partial file left behind
    with pytest.warns(UserWarning, match="checksums.json is missing") if where == "checksums" else nullcontext():
        resumed = runs.start_or_resume(tiny_run(tmp_path / "run"), progress=False)
    assert resumed == expected
