"""Fault injection: `qsharp train` killed with SIGKILL at the run's own progress markers
(:mod:`qsharp_jax.failpoints`), then resumed with the same command, ends with metrics byte-identical
to an uninterrupted run.

``make test`` runs one chain of kills through collection, the store, the fit and the checkpoint;
``make test-faults`` (marker ``faults``) kills at every one of the points below, each in its own run.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST_COMPILE

ROOT = Path(__file__).resolve().parents[1]
COMMAND = [sys.executable, "-m", "qsharp_jax.cli", "train", "experiments/planted_token/config.yaml",
           "algorithm.iterations=2", "algorithm.prompts_per_iteration=16", "algorithm.epochs=2",
           "algorithm.rollout_batch=32"]


def _points(i: int) -> list[str]:
    """The kill points of iteration i (64 rollouts in 2 chunks, 2 fit epochs, 24 evaluation prompts)."""
    return [
        f"iteration/{i}/start", f"collect/{i}/0", f"collect/{i}/32",
        f"store/{i}/shard/written", f"store/{i}/shard/renamed", f"store/{i}/manifest/written",
        f"store/{i}/manifest/renamed", f"fit/{i}/0/0", f"fit/{i}/1/0", f"evaluate/{i}/ref/0",
        f"evaluate/{i}/guided/0", f"checkpoint/{i}/save", f"checkpoint/{i}/checksums/written",
        f"checkpoint/{i}/checksums/renamed", f"metrics/{i}/written", f"metrics/{i}/renamed",
    ]


POINTS = _points(0) + _points(1)
CHAIN = ["store/0/shard/written", "fit/0/1/0", "checkpoint/1/checksums/written", "metrics/1/written"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A shared persistent compilation cache: every run after the first skips XLA compilation (a
    cached executable is the same code, so the numbers do not change)."""
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax-cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
            **FAST_COMPILE, "PYTHONPATH": str(ROOT)}


def train(run_dir: Path, env: dict, failpoint: str | None = None) -> subprocess.Popen:
    env = {**env, "QSHARP_FAILPOINT": failpoint} if failpoint else {k: v for k, v in env.items()
                                                                    if k != "QSHARP_FAILPOINT"}
    return subprocess.Popen([*COMMAND, f"run_dir={run_dir}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    code, err = finish(train(run_dir, env))
    assert code == 0, err
    return (run_dir / "metrics.jsonl").read_bytes()


def kill_and_resume(run_dir: Path, env: dict, points: list[str]) -> bytes:
    for point in points:
        code, err = finish(train(run_dir, env, point))
        assert code == -signal.SIGKILL, f"the run was not killed at {point} (a point it never reached?): {err[-2000:]}"
    code, err = finish(train(run_dir, env))
    assert code == 0, err
    assert "Traceback" not in err, err
    return (run_dir / "metrics.jsonl").read_bytes()


def test_a_chain_of_kills_resumes_to_the_same_metrics(tmp_path, env, reference):
    """Killed while writing a data shard, mid-fit, between a checkpoint and its checksums (the
    resumed run skips that checkpoint and redoes its iteration) and before the metrics file's
    rename; each run resumes the previous one."""
    assert kill_and_resume(tmp_path, env, CHAIN) == reference


@pytest.mark.faults
@pytest.mark.parametrize("point", POINTS)
def test_killed_at_every_point_resumes_to_the_same_metrics(tmp_path, env, reference, point):
    assert kill_and_resume(tmp_path, env, [point]) == reference


def test_there_are_at_least_twenty_points_over_every_stage():
    assert len(set(POINTS)) >= 20
    assert {p.split("/")[0] for p in POINTS} >= {"collect", "store", "fit", "evaluate", "checkpoint", "metrics"}
