"""Table-1 metrics: per-problem values agree with pass_at_1 / maj_at_k, the bootstrap interval
brackets the mean and collapses when every problem agrees, breakdowns by group."""

import numpy as np
import pytest

from qsharp_jax.tasks import math as m
from qsharp_jax.tasks.math_eval import Samples, breakdown, per_problem, summarize, table


def random_samples(rng, problems=30, k=8):
    pool = ["1", "2", "3", None]
    answers = [[pool[i] for i in rng.integers(0, 4, size=k)] for _ in range(problems)]
    golds = [str(g) for g in rng.integers(1, 4, size=problems)]
    correct = np.array([[a == g for a in row] for row, g in zip(answers, golds)])
    return Samples(answers, correct, rng.random((problems, k))), golds


def test_per_problem_metrics_agree_with_the_definitions():
    rng = np.random.default_rng(0)
    samples, golds = random_samples(rng)
    values = per_problem(samples, golds, k=8, seed=5)
    assert values["pass@1"].mean() == pytest.approx(m.pass_at_1(samples.correct))
    assert values["maj1@k"].mean() == pytest.approx(m.maj_at_k(samples.answers, golds, 8, seed=5))
    np.testing.assert_allclose(values["kl"], samples.kl.mean(axis=1))
    with pytest.raises(ValueError, match="must agree"):
        Samples(samples.answers[:3], samples.correct, samples.kl)


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_more_problems():
    rng = np.random.default_rng(1)
    small = summarize(per_problem(*random_samples(rng, problems=20), k=8))
    large = summarize(per_problem(*random_samples(rng, problems=2000), k=8))
    for s in (small, large):
        for metric in ("pass@1", "maj1@k", "kl"):
            assert s[metric]["lo"] <= s[metric]["mean"] <= s[metric]["hi"]
    width = lambda s: s["pass@1"]["hi"] - s["pass@1"]["lo"]  # noqa: E731
    assert width(large) < width(small) / 4  # ~1/sqrt(n): sqrt(100) = 10
    every = summarize({"pass@1": np.ones(10), "maj1@k": np.ones(10), "kl": np.full(10, 0.5)})
    assert every["pass@1"] == {"mean": 1.0, "lo": 1.0, "hi": 1.0} and every["kl"]["lo"] == 0.5


def test_breakdown_and_table():
    values = {"pass@1": np.array([1.0, 0.0, 0.5, 1.0]), "maj1@k": np.array([1.0, 0.0, 1.0, 1.0]),
              "kl": np.array([0.1, 0.2, 0.3, 0.4])}
    by_level = breakdown(values, ["Level 1", "Level 2", "Level 1", None])
    assert by_level["Level 1"] == {"problems": 2, "pass@1": 0.75, "maj1@k": 1.0, "kl": pytest.approx(0.2)}
    assert by_level["(none)"]["problems"] == 1
    text = table({"π_ref": summarize(values), "Q♯": summarize(values)}, k=8)
    assert text.splitlines()[0] == "| method | pass@1 (%) | maj1@8 (%) | KL |"
    assert text.splitlines()[2].startswith("| π_ref | 62.5 [")
