"""The CPU math demo's harness at miniature size: π_ref's training, Algorithm 1 and the evaluation
run, results.json has the issue's schema, every pass@1 follows from the samples it wrote, the
tables and the plot are written, and a rerun resumes instead of retraining."""

import json

import numpy as np
import pytest

from experiments.math import demo
from qsharp_jax import config

TINY = [
    "sft_problems=256", "train_problems=16", "test_problems=8",
    'reference={"vocab_size": 80, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "mlp_dim": 32, '
    '"max_positions": 96}',
    'sft={"epochs": 1, "batch_size": 64}',
    'algorithm={"iterations": 1, "prompts_per_iteration": 8, "samples_per_prompt": 2, "max_new_tokens": 32, '
    '"eta": 0.1, "top_k": 4, "epochs": 1, "batch_size": 16, "rollout_batch": 16}',
    'evaluation={"samples": 2, "sweep": [1.0], "sweep_samples": 1, "batch": 16}',
]


@pytest.mark.filterwarnings("ignore:iteration 0. all 16 rewards are identical")  # a barely trained π_ref
def test_demo_writes_its_results_and_resumes(tmp_path):
    cfg = config.load(demo.MathDemoConfig, None, [f"run_dir={tmp_path}", *TINY])
    results = demo.run(cfg, progress=False)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["eta"] == 0.1 and sorted(on_disk["methods"]) == ["cd", "pretrained", "qsharp"]
    lines = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 8
    for method, r in on_disk["methods"].items():
        assert {"pass@1", f"maj1@{cfg.evaluation.samples}", "kl"} <= set(r)
        assert r["pass@1"] == pytest.approx(np.mean([row[method]["correct"] for row in lines]))
        # levels are the problems' numbers of carries
        assert set(r["by_level"]) <= {"1", "2", "3", "4", "5"}
    assert on_disk["methods"]["pretrained"]["kl"] == 0.0
    assert sorted((s["eta"], s["method"]) for s in on_disk["sweep"]) == [(1.0, "cd"), (1.0, "qsharp")]
    table = (tmp_path / "results.md").read_text()
    assert "| carries |" in table and "| η | method |" in table and "| carries ahead |" in table
    decisions = on_disk["carry_decisions"]
    # one decision per carry of each test problem
    assert sum(d["decisions"] for d in decisions) == sum(int(p.level) for p in demo._split(cfg)[2])
    for d in decisions:  # probabilities and mean 0/1 returns
        assert all(0 <= d[m] <= 1 for m in ("pretrained", "cd", "qsharp", "value_kept", "value_lost"))
    assert (tmp_path / "kl_sweep.png").stat().st_size > 0
    # a rerun restores π_ref and Algorithm 1 from their checkpoints (nothing rewritten): the same numbers
    saved = {p: p.stat().st_mtime_ns for d in ("reference", "qsharp/checkpoints") for p in (tmp_path / d).rglob("*")}
    again = demo.run(cfg, progress=False)
    assert again["methods"] == results["methods"]
    assert {p: p.stat().st_mtime_ns for p in saved} == saved
