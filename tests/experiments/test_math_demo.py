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


@pytest.mark.parametrize("q_type", [True, False])
def test_carry_decisions_equal_each_decision_computed_alone(tmp_path, q_type):
    """Each carry's choice probabilities, recomputed per prefix from a right-padded forward (the
    function left-pads) and the offsets' formulas in numpy (log Σ p_k e^{z_k/η} for Q♯, Σ p_k z_k/η
    for CD): the batched computation and its per-carry rows agree (untrained models: the arithmetic
    is the test, not the learning)."""
    import jax.numpy as jnp

    from experiments.math import arithmetic
    from qsharp_jax.models.build import build_reference
    from qsharp_jax.models.value import HeadConfig, value_from_reference
    from qsharp_jax.tasks.math_data import chat_prompt

    head = {"kind": "categorical", "num_atoms": 11, "q_type": q_type}
    cfg = config.load(demo.MathDemoConfig, None, [f"run_dir={tmp_path}", *TINY, f"head={json.dumps(head)}"])
    tokenizer = arithmetic.make_tokenizer()
    problems = arithmetic.make_problems(cfg.problems, 200, np.random.default_rng(0))
    problem = max(problems, key=lambda p: int(p.level))  # several carries: several rows
    ref = build_reference(cfg.reference)
    value = value_from_reference(ref, HeadConfig(**head), seed=1)
    rows = demo.carry_decisions(cfg, tokenizer, [problem], ref, value)
    points = arithmetic.carry_points(*arithmetic.numbers(problem))
    assert int(problem.level) >= 2 and [r["carries_ahead"] for r in rows] == sorted(p[3] for p in points)

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def at_last(fn, sequences):  # fn's output at each sequence's last token, right-padded: [n, ...]
        width = max(map(len, sequences))
        ids = np.array([s + [tokenizer.pad_token_id] * (width - len(s)) for s in sequences])
        mask = np.arange(width) < np.array([len(s) for s in sequences])[:, None]
        out = np.asarray(fn(jnp.asarray(ids), jnp.asarray(mask)), np.float64)
        return out[np.arange(len(sequences)), [len(s) - 1 for s in sequences]]

    prompt = encode(chat_prompt(tokenizer, problem.problem))
    prefixes = [prompt + encode(text) for text, *_ in points]
    pairs = np.array([[encode(kept)[0], encode(lost)[0]] for _, kept, lost, _ in points])  # [n, 2]
    ref_logits = at_last(ref, prefixes)  # unnormalized: only ratios of the two digits' weights are used
    p_ref = np.take_along_axis(np.exp(ref_logits - ref_logits.max(-1, keepdims=True)), pairs, axis=1)
    if q_type:
        logits = np.take_along_axis(at_last(value, prefixes), pairs[:, :, None], axis=1)
    else:
        logits = np.stack([at_last(value, [p + [t] for p, t in zip(prefixes, pairs[:, j])]) for j in (0, 1)], 1)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)  # [n, 2, atoms]
    atoms, eta = np.asarray(cfg.head.atoms, np.float64), cfg.algorithm.eta
    offsets = {"pretrained": np.zeros(pairs.shape), "cd": probs @ atoms / eta,
               "qsharp": np.log(probs @ np.exp(atoms / eta))}
    for i, (*_, ahead) in enumerate(points):
        row = next(r for r in rows if r["carries_ahead"] == ahead)
        assert row["decisions"] == 1
        for method, offset in offsets.items():
            w = p_ref[i] * np.exp(offset[i])
            assert row[method] == pytest.approx(w[0] / w.sum(), rel=1e-4, abs=1e-6), method
        assert [row["value_kept"], row["value_lost"]] == pytest.approx(probs[i] @ atoms, rel=1e-4, abs=1e-6)
