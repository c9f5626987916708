"""The tabular demonstration: Q♯ guidance equals the KL-regularized optimum, CD does not.

On random token trees whose return distributions are known exactly, the policy formed by
:func:`qsharp_jax.guidance.qsharp_logit_offset` + :func:`qsharp_jax.guidance.guided_logits` is
compared with π* from backward induction, and the objective E[r] − η·KL(π‖π_ref) of π*, π_Q♯,
π_CD and π_ref is reported. A second table shows the paper's Theorem 4.1 situation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from experiments.tabular import exact as tabular
from qsharp_jax import guidance


@dataclasses.dataclass(frozen=True)
class TabularConfig:
    """Which trees to solve. Each (depth, vocab) pair is run for every η and seed.

    Fields: depths (tokens per sequence), vocabs (alphabet sizes), etas (η, > 0), seeds (of the
    random trees), num_atoms (on [0, 1]; the rewards are drawn from these), plot (PNG of the
    Theorem 4.1 curve, or null).
    """

    depths: tuple[int, ...] = (2, 3, 4)
    vocabs: tuple[int, ...] = (2, 3, 5)
    etas: tuple[float, ...] = (1.0, 0.1, 0.01)
    seeds: tuple[int, ...] = (0,)
    num_atoms: int = 11
    plot: str | None = "runs/tabular/objective_vs_eta.png"

    def __post_init__(self):
        if not all(e > 0 for e in self.etas):
            raise ValueError(f"etas (η, the KL coefficient) must all be > 0, got {list(self.etas)}")
        if not all(d >= 1 for d in self.depths) or not all(v >= 2 for v in self.vocabs) or self.num_atoms < 2:
            raise ValueError(f"need depths >= 1, vocabs >= 2 and num_atoms >= 2, got {list(self.depths)}, "
                             f"{list(self.vocabs)}, {self.num_atoms}")


@dataclasses.dataclass(frozen=True)
class Row:
    depth: int
    vocab: int
    eta: float
    seed: int
    max_policy_error: float  # max over prefixes and tokens of |π_Q♯(a|s) − π*(a|s)|
    j_optimal: float
    j_qsharp: float
    j_cd: float
    j_ref: float


# jitted once per shape; η is traced so a sweep over η does not recompile
_qsharp_offset = jax.jit(guidance.qsharp_logit_offset)
_cd_offset = jax.jit(guidance.cd_logit_offset)


def policies(tree: tabular.TokenTree, atoms: np.ndarray, eta: float) -> dict[str, tabular.Policy]:
    """π*, π_Q♯, π_CD and π_ref on ``tree``; the guided ones use exact return distributions."""
    logits = tabular.distribution_logits(tabular.return_distributions(tree, atoms))
    z = jnp.asarray(atoms, jnp.float32)
    eta_ = jnp.float32(eta)
    return {
        "optimal": tabular.optimal_policy(tree, eta),
        "qsharp": tabular.guided_policy(tree, logits, lambda l: _qsharp_offset(l, z, eta_)),
        "cd": tabular.guided_policy(tree, logits, lambda l: _cd_offset(l, z, eta_)),
        "ref": list(tree.ref_probs),
    }


def compare(tree: tabular.TokenTree, atoms: np.ndarray, eta: float, depth: int, vocab: int, seed: int) -> Row:
    pi = policies(tree, atoms, eta)
    err = max(float(np.max(np.abs(q - o))) for q, o in zip(pi["qsharp"], pi["optimal"]))
    j = {name: tabular.objective(tree, p, eta) for name, p in pi.items()}
    return Row(depth, vocab, eta, seed, err, j["optimal"], j["qsharp"], j["cd"], j["ref"])


def run(cfg: TabularConfig) -> list[Row]:
    atoms = np.linspace(0.0, 1.0, cfg.num_atoms)
    jobs = [(d, v, e, s) for d in cfg.depths for v in cfg.vocabs for e in cfg.etas for s in cfg.seeds]
    rows = []
    for depth, vocab, eta, seed in tqdm(jobs, desc="solving token trees", leave=False):
        tree = tabular.random_tree(np.random.default_rng(seed), depth, vocab, atoms)
        rows.append(compare(tree, atoms, eta, depth, vocab, seed))
    return rows


def format_table(rows: list[Row]) -> str:
    head = (
        f"{'depth':>5} {'vocab':>5} {'eta':>6} {'seed':>4} | {'max|π_Q♯−π*|':>13} | "
        f"{'J(π*)':>8} {'J(π_Q♯)':>8} {'J(π_CD)':>8} {'J(π_ref)':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.depth:>5} {r.vocab:>5} {r.eta:>6g} {r.seed:>4} | {r.max_policy_error:>13.2e} | "
            f"{r.j_optimal:>8.4f} {r.j_qsharp:>8.4f} {r.j_cd:>8.4f} {r.j_ref:>8.4f}"
        )
    return "\n".join(lines)


def counterexample_table(etas: tuple[float, ...] = (0.5, 0.1, 0.05)) -> str:
    """Theorem 4.1: P(take the risky subtree) and J under each policy (see cd_counterexample)."""
    tree = tabular.cd_counterexample()
    atoms = np.linspace(0.0, 1.0, 11)
    head = f"{'eta':>5} | {'P(risky): π*':>12} {'π_Q♯':>7} {'π_CD':>7} | {'J(π*)':>7} {'J(π_Q♯)':>7} {'J(π_CD)':>7}"
    lines = [head, "-" * len(head)]
    for eta in etas:
        pi = policies(tree, atoms, eta)
        p = {k: v[0][0, 1] for k, v in pi.items()}
        j = {k: tabular.objective(tree, v, eta) for k, v in pi.items()}
        lines.append(
            f"{eta:>5g} | {p['optimal']:>12.3f} {p['qsharp']:>7.3f} {p['cd']:>7.3f} | "
            f"{j['optimal']:>7.4f} {j['qsharp']:>7.4f} {j['cd']:>7.4f}"
        )
    return "\n".join(lines)


def plot_counterexample(path: str | Path, etas: np.ndarray | None = None) -> Path:
    """Save J(π) against η on the Theorem 4.1 tree for π*, π_Q♯, π_CD and π_ref."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    etas = np.geomspace(0.01, 3.0, 40) if etas is None else etas
    tree = tabular.cd_counterexample()
    atoms = np.linspace(0.0, 1.0, 11)
    curves: dict[str, list[float]] = {"optimal": [], "qsharp": [], "cd": [], "ref": []}
    for eta in etas:
        for name, pol in policies(tree, atoms, float(eta)).items():
            curves[name].append(tabular.objective(tree, pol, float(eta)))
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = {"optimal": ("π* (backward induction)", "k-", 4), "qsharp": ("Q♯", "C0--", 2),
              "cd": ("CD / VAS", "C3-", 2), "ref": ("π_ref", "C7:", 2)}
    for name, (label, style, width) in styles.items():
        ax.plot(etas, curves[name], style, lw=width, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("η (KL coefficient)")
    ax.set_ylabel("E[r] − η·KL(π‖π_ref)")
    ax.set_title("Theorem 4.1 tree: Q♯ is optimal, CD is not")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
