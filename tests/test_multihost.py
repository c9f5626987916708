"""Multi-host runs, proven with several CPU processes on localhost: each is one JAX process with 4
fake devices, joined through a local coordinator (gloo collectives), as hosts of a pod would be.

The 2-process `qsharp train` must equal the single-process run on the same 8-device mesh, write
one shared run directory, and leave checkpoints that restore onto another mesh; `qsharp eval` and
`sample` over 2 processes print what one prints (`eval-math`: tests/test_math_run.py); processes
that disagree, a run directory they do not share and a coordinator that never answers are refused,
and an error on process 0 stops them all.
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from processes import TOY, free_port, launch, numbers, printed
from qsharp_jax import cli, runs

SMALL = ["mesh=[-1,1,1]", "algorithm.prompts_per_iteration=16", "algorithm.epochs=2", "algorithm.iterations=2"]


def jax_leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_like_one(tmp_path, capsys):
    """Collection, fit, evaluation and checkpoints of `qsharp train` over 2 processes × 4 devices
    equal one process over the same 8-device mesh; the checkpoint restores onto other meshes, and
    one process resumes the run."""
    shared = tmp_path / "two"
    for rc, _, err in launch(lambda i: ["train", TOY, f"run_dir={shared}", *SMALL]):
        assert rc == 0, err[-3000:]
    single = tmp_path / "one"
    assert cli.main(["train", TOY, f"run_dir={single}", *SMALL]) == 0
    two, one = _metrics(shared), _metrics(single)
    assert [m["iteration"] for m in two] == [0, 1] and [m["examples"] for m in two] == [64, 128]
    for a, b in zip(two, one):
        assert a.keys() == b.keys()
        for k in a:  # tokens are the same draws; losses and KL up to float reassociation. The guided
            # policy is within ~1e-5 of π_ref here: its KL is a difference of nearly equal float32
            # log-probs, whose rounding (~1e-6) moves with the reduction order (seen: 2.16e-5 vs 2.05e-5)
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5 if k.endswith("kl") else 1e-6), k
    # one shared directory: one config, one store, one checkpoint per iteration
    assert sorted(p.name for p in (shared / "checkpoints").iterdir()) == ["0", "1"]
    assert json.loads((shared / "data" / "manifest.json").read_text()) == \
        json.loads((single / "data" / "manifest.json").read_text())
    assert not list(shared.glob(".shared-check-*"))
    # saved on (data 8) by two processes; restored on one device, on (data 2, fsdp 4) and (data 8)
    states = [runs.load_run(shared, mesh=mesh)[3] for mesh in (None, (2, 4, 1), (8, 1, 1))]
    reference = runs.load_run(single)[3]
    flat = [np.concatenate([np.ravel(x) for x in jax_leaves(s.params)]) for s in states]
    for f in flat[1:]:
        np.testing.assert_array_equal(f, flat[0])
    np.testing.assert_allclose(flat[0], np.concatenate([np.ravel(x) for x in jax_leaves(reference.params)]),
                               rtol=1e-4, atol=1e-6)
    laid_out = {tuple(x.sharding.mesh.shape.values()) for x in jax.tree.leaves(states[1].params)}
    assert laid_out == {(2, 4, 1)}
    # `qsharp eval` and `qsharp sample` over the two processes print what one process prints on the same mesh
    evaluated, sampled = (launch(lambda i: [command, str(shared), *extra]) for command, extra in
                          (("eval", []), ("sample", ["--num", "5"])))
    for (rc0, out0, err0), (rc1, out1, err1) in (evaluated, sampled):
        assert rc0 == rc1 == 0, err0[-2000:] + err1[-2000:]
        assert printed(out1) == ""  # process 0 reports for the job
    for command, (_, out, _), extra in (("eval", evaluated[0], []), ("sample", sampled[0], ["--num", "5"])):
        capsys.readouterr()
        assert cli.main([command, str(shared), "--mesh", "8,1,1", *extra]) == 0
        assert numbers(printed(out)) == pytest.approx(numbers(capsys.readouterr().out), rel=1e-4, abs=1e-6), command
    assert len(printed(sampled[0][1]).splitlines()) == 5
    # the run resumes in one process (on the single run's mesh: its programs are compiled already)
    assert cli.main(["train", TOY, f"run_dir={shared}", *SMALL[:-1], "algorithm.iterations=3"]) == 0
    assert [m["iteration"] for m in _metrics(shared)] == [0, 1, 2] and _metrics(shared)[:2] == two


def test_processes_that_disagree_on_the_config_are_refused(tmp_path):
    results = launch(lambda i: ["train", TOY, f"run_dir={tmp_path}/run", *SMALL, f"algorithm.eta={0.05 + 0.05 * i}"])
    for rc, _, err in results:
        assert rc == 2 and "the processes disagree on the config" in err, err[-2000:]
    assert not (tmp_path / "run").exists()


def test_a_run_directory_the_processes_do_not_share_is_refused(tmp_path):
    """The same relative run_dir from two working directories: two directories, as on hosts
    without a shared filesystem."""
    cwds = [tmp_path / "host0", tmp_path / "host1"]
    for c in cwds:
        c.mkdir()
    results = launch(lambda i: ["train", TOY, "run_dir=run", *SMALL], cwds=cwds)
    for rc, _, err in results:
        assert rc == 2 and "is not shared: processes [1]" in err, err[-2000:]
    assert not (cwds[0] / "run" / "config.json").exists()


def test_an_error_on_process_0_stops_every_process(tmp_path):
    """Process 0 alone takes the run's lock; when that fails (another run holds it), process 1
    stops with the same error instead of waiting at the next collective until the time-out."""
    from qsharp_jax.lock import RunLock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with RunLock(run_dir):
        results = launch(lambda i: ["train", TOY, f"run_dir={run_dir}", *SMALL], timeout=120)
    for rc, _, err in results:
        assert rc == 2 and "is in use" in err, err[-2000:]
    assert not (run_dir / "config.json").exists()


def test_a_coordinator_that_never_answers_times_out_naming_it(tmp_path):
    port = free_port()
    (rc, _, err), = launch(lambda i: ["train", TOY, f"run_dir={tmp_path}/run", "--init-timeout", "3",
                                    "--process-id", "1", "--num-processes", "2"], processes=1, port=port, timeout=120)
    assert rc == 2 and f"could not join the job at 127.0.0.1:{port} within 3 s" in err, err[-2000:]


def test_cluster_detection_and_the_environment(monkeypatch):
    from qsharp_jax import distributed

    for name in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                 "OMPI_MCA_orte_hnp_uri", "PMIX_SERVER_URI2"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.detected_cluster() is None
    for name, value in (("SLURM_JOB_ID", "7"), ("SLURM_STEP_NODELIST", "n[1-2]"), ("SLURM_NTASKS", "2"),
                        ("SLURM_PROCID", "1"), ("SLURM_LOCALID", "0")):
        monkeypatch.setenv(name, value)
    assert distributed.detected_cluster() == "SlurmCluster"
    for name in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "12345.0;tcp://10.0.0.2:4242")  # mpirun's
    assert distributed.detected_cluster() == "OmpiCluster"
    monkeypatch.delenv("OMPI_MCA_orte_hnp_uri")
    # a TPU VM of a GKE slice (JAX finds the VM by its TPU; the workers by the environment)
    from jax._src.clusters import cloud_tpu_cluster

    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1k-0,t1k-1")
    assert distributed.detected_cluster() is None  # not on a TPU VM
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")  # no metadata server asked (the GCE detector's check)
    assert distributed.detected_cluster() == "GkeTpuCluster"
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match=r"JAX_NUM_PROCESSES='two' must be an integer"):
        distributed.initialize()
