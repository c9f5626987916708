"""The paper's Table 1 from sampled answers: pass@1, maj1@k and KL per method, with 95% bootstrap
confidence intervals over problems and breakdowns by a problem attribute (MATH's level, subject).

Pure numpy on what evaluation produced: for each method, per problem, its k samples' answers,
their correctness and their KL to π_ref.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from qsharp_jax.tasks.math import answers_match, majority_answer

METRICS = ("pass@1", "maj1@k", "kl")


@dataclasses.dataclass(frozen=True)
class Samples:
    """One method's evaluation samples.

    Fields:
      answers: ``[problems][samples]`` extracted answers (None: no answer).
      correct: bool ``[problems, samples]``.
      kl: float ``[problems, samples]``, Σ_t KL(π_t ‖ π_ref,t) of each sample.
    """

    answers: Sequence[Sequence[str | None]]
    correct: np.ndarray
    kl: np.ndarray

    def __post_init__(self):
        correct, kl = np.asarray(self.correct), np.asarray(self.kl)
        if correct.ndim != 2 or correct.shape != kl.shape or len(self.answers) != correct.shape[0] or \
                any(len(a) != correct.shape[1] for a in self.answers):
            raise ValueError(f"answers [problems][samples], correct and kl [problems, samples] must agree; got "
                             f"{len(self.answers)} answer lists, correct {correct.shape}, kl {kl.shape}")


def per_problem(samples: Samples, golds: Sequence[str], k: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Each problem's pass@1 (mean over its samples), maj1@k hit (0/1) and mean KL: ``[problems]``."""
    if len(golds) != len(samples.answers):
        raise ValueError(f"{len(golds)} gold answers for {len(samples.answers)} problems")
    if not 1 <= k <= np.shape(samples.correct)[1]:
        raise ValueError(f"k={k} must lie in [1, samples per problem = {np.shape(samples.correct)[1]}]")
    rng = np.random.default_rng(seed)
    majority = [majority_answer(list(a[:k]), rng) for a in samples.answers]
    return {"pass@1": np.asarray(samples.correct, np.float64).mean(axis=1),
            "maj1@k": np.array([answers_match(m, g) for m, g in zip(majority, golds)], np.float64),
            "kl": np.asarray(samples.kl, np.float64).mean(axis=1)}


def summarize(values: dict[str, np.ndarray], *, resamples: int = 2000, seed: int = 0) -> dict[str, dict[str, float]]:
    """Mean of each per-problem metric and its 95% percentile-bootstrap interval over problems:
    ``{metric: {"mean", "lo", "hi"}}``."""
    n = len(next(iter(values.values())))
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    out = {}
    for name, v in values.items():
        boot = v[draws].mean(axis=1)
        out[name] = {"mean": float(v.mean()), "lo": float(np.percentile(boot, 2.5)),
                     "hi": float(np.percentile(boot, 97.5))}
    return out


def breakdown(values: dict[str, np.ndarray], groups: Sequence[str | None]) -> dict[str, dict[str, float]]:
    """Mean of each metric per group (e.g. MATH's ``Level 1``…``Level 5``): ``{group: {metric: mean}}``,
    with the problem count as ``"problems"``."""
    groups = np.array(["(none)" if g is None else str(g) for g in groups])
    return {g: {"problems": int((groups == g).sum()), **{k: float(v[groups == g].mean()) for k, v in values.items()}}
            for g in sorted(set(groups))}


def table(results: dict[str, dict[str, dict[str, float]]], k: int) -> str:
    """A Markdown table: one row per method, pass@1 and maj1@k in % and KL, each with its 95% CI."""
    rows = [f"| method | pass@1 (%) | maj1@{k} (%) | KL |", "|---|---|---|---|"]
    for method, m in results.items():
        cells = [f"{100 * m[x]['mean']:.1f} [{100 * m[x]['lo']:.1f}, {100 * m[x]['hi']:.1f}]"
                 for x in ("pass@1", "maj1@k")]
        cells.append(f"{m['kl']['mean']:.3f} [{m['kl']['lo']:.3f}, {m['kl']['hi']:.3f}]")
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
