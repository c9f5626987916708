"""Exact small token MDPs: the ground truth that Q♯'s math is checked against.

A ``TokenTree`` is the token MDP of the paper with every sequence enumerated: ``depth`` tokens from a
``vocab``-sized alphabet, deterministic transitions, a reward on each full sequence, and a reference
policy π_ref at every prefix. Nodes at level ``d`` are indexed ``0 .. vocab**d - 1`` and the child
of node ``i`` by token ``a`` is node ``i * vocab + a`` at level ``d + 1``.

Everything about π* here is computed in float64 numpy, by enumeration or backward induction of the
KL-regularized objective, independently of the JAX losses and guidance; :func:`guided_policy` is the
one place that uses the JAX guidance, to build the policies under test.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from qsharp_jax import guidance

Policy = list  # per level d: float [vocab**d, vocab], rows are distributions over the next token


@dataclasses.dataclass(frozen=True)
class TokenTree:
    """A finite token MDP.

    Attributes:
      ref_probs: per level d = 0..depth-1, float ``[vocab**d, vocab]``, π_ref(a | node).
      rewards: float ``[vocab**depth]``, the reward of each full sequence.
    """

    ref_probs: tuple[np.ndarray, ...]
    rewards: np.ndarray

    @property
    def depth(self) -> int:
        return len(self.ref_probs)

    @property
    def vocab(self) -> int:
        return self.ref_probs[0].shape[-1]


def random_tree(
    rng: np.random.Generator, depth: int, vocab: int, reward_values: np.ndarray, concentration: float = 0.5
) -> TokenTree:
    """π_ref ~ Dirichlet(concentration) at each prefix; rewards drawn uniformly from ``reward_values``."""
    if depth < 1 or vocab < 2:
        raise ValueError(f"need depth >= 1 and vocab >= 2, got depth={depth}, vocab={vocab}")
    ref = tuple(rng.dirichlet(np.full(vocab, concentration), size=vocab**d) for d in range(depth))
    # Dirichlet draws can underflow to exact zeros; keep π_ref's support full.
    ref = tuple((p + 1e-6) / (p + 1e-6).sum(-1, keepdims=True) for p in ref)
    rewards = rng.choice(np.asarray(reward_values, np.float64), size=vocab**depth)
    return TokenTree(ref_probs=ref, rewards=rewards)


def cd_counterexample() -> TokenTree:
    """The paper's Theorem 4.1 situation: CD prefers the subtree with the better *mean*.

    Token 0 leads to a sure reward of 0.5; token 1 to reward 1 with π_ref-probability 0.1, else 0.
    CD scores them 0.5 vs 0.1 and mostly picks token 0. The KL-regularized optimum (η = 0.1) values
    token 1 at η·log(0.9 + 0.1·e^{1/η}) ≈ 0.77, because the guided policy can then steer to the
    reward-1 leaf; Q♯ agrees with it.
    """
    ref = (np.array([[0.5, 0.5]]), np.array([[0.5, 0.5], [0.1, 0.9]]))
    return TokenTree(ref_probs=ref, rewards=np.array([0.5, 0.5, 1.0, 0.0]))


def sequence_probs(tree: TokenTree, policy: Policy, level: int = 0) -> np.ndarray:
    """P(full sequence | prefix) under ``policy``: float ``[vocab**level, vocab**(depth-level)]``."""
    probs = np.ones((tree.vocab**level, 1))
    for d in range(level, tree.depth):
        nodes = np.arange(tree.vocab**d).reshape(tree.vocab**level, -1)  # [prefixes, nodes below]
        step = policy[d][nodes]  # [prefixes, nodes below, vocab]
        probs = (probs[:, :, None] * step).reshape(tree.vocab**level, -1)
    return probs


def project_np(values: np.ndarray, atoms: np.ndarray) -> np.ndarray:
    """Two-hot of scalars on atoms by direct interpolation: float ``[N]`` -> ``[N, K]``."""
    values = np.clip(values, atoms[0], atoms[-1])
    hi = np.clip(np.searchsorted(atoms, values, side="right"), 1, len(atoms) - 1)
    lo = hi - 1
    w_hi = (values - atoms[lo]) / (atoms[hi] - atoms[lo])
    out = np.zeros((len(values), len(atoms)))
    np.add.at(out, (np.arange(len(values)), lo), 1.0 - w_hi)
    np.add.at(out, (np.arange(len(values)), hi), w_hi)
    return out


def return_distributions(tree: TokenTree, atoms: np.ndarray, discount: float = 1.0) -> list[np.ndarray]:
    """Exact distribution of π_ref's return from every node, by enumerating all completions.

    The return of the action that enters node n at level L (1..depth) is ``discount**(depth - L)``
    times the final reward, two-hot projected onto ``atoms``. Level 0 (the root) has no entering
    action and is omitted: entry ``L - 1`` is float ``[vocab**L, K]``.
    """
    ref = list(tree.ref_probs)
    out = []
    for level in range(1, tree.depth + 1):
        completions = sequence_probs(tree, ref, level)  # [nodes, leaves below]
        leaves = np.arange(tree.vocab**tree.depth).reshape(tree.vocab**level, -1)
        returns = discount ** (tree.depth - level) * tree.rewards[leaves]  # [nodes, leaves below]
        onehots = project_np(returns.reshape(-1), atoms).reshape(*returns.shape, len(atoms))
        out.append(np.einsum("nl,nlk->nk", completions, onehots))
    return out


def projected_bellman_distributions(
    tree: TokenTree, atoms: np.ndarray, discount: float = 1.0
) -> list[np.ndarray]:
    """Fixed point of the *projected* distributional Bellman operator of π_ref, by backward recursion.

    Leaves: two-hot of the reward; interior nodes: projection of ``discount * atoms`` under the
    π_ref mixture of the children's distributions. With ``discount = 1`` the projection is the
    identity and this equals :func:`return_distributions`; otherwise it differs by projection error
    but keeps the same means. Same layout as :func:`return_distributions`.
    """
    dists = [project_np(tree.rewards, atoms)]
    for level in reversed(range(1, tree.depth)):
        child = dists[0].reshape(tree.vocab**level, tree.vocab, len(atoms))
        mixture = np.einsum("na,nak->nk", tree.ref_probs[level], child)
        moved = project_np(discount * atoms, atoms)  # [K (from), K (to)]
        dists.insert(0, mixture @ moved)
    return dists


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def optimal_values(tree: TokenTree, eta: float) -> list[np.ndarray]:
    """Soft values by backward induction: V(s) = η·log Σ_a π_ref(a|s)·exp(V(s·a)/η), V(leaf) = r.

    Returns per level d = 0..depth, float ``[vocab**d]``.
    """
    values = [tree.rewards]
    for d in reversed(range(tree.depth)):
        child = values[0].reshape(-1, tree.vocab)
        values.insert(0, eta * _logsumexp(np.log(tree.ref_probs[d]) + child / eta, axis=-1))
    return values


def optimal_policy(tree: TokenTree, eta: float) -> Policy:
    """π*(a|s) = π_ref(a|s)·exp((V(s·a) − V(s))/η), the maximizer of E[r] − η·KL(π‖π_ref)."""
    values = optimal_values(tree, eta)
    return [
        tree.ref_probs[d] * np.exp((values[d + 1].reshape(-1, tree.vocab) - values[d][:, None]) / eta)
        for d in range(tree.depth)
    ]


def objective(tree: TokenTree, policy: Policy, eta: float) -> float:
    """E_π[r] − η·KL(π‖π_ref) over full sequences, by enumeration."""
    pi = sequence_probs(tree, policy)[0]
    ref = sequence_probs(tree, list(tree.ref_probs))[0]
    support = pi > 0
    kl = np.sum(pi[support] * (np.log(pi[support]) - np.log(ref[support])))
    return float(pi @ tree.rewards - eta * kl)


_guided_logits = jax.jit(guidance.guided_logits, static_argnames="others")

OffsetFn = Callable[[jnp.ndarray], jnp.ndarray]


def guided_policy(tree: TokenTree, child_value_logits: list[np.ndarray], offset_fn: OffsetFn) -> Policy:
    """The policy that adds ``offset_fn(value logits of s·a)`` to log π_ref(a|s) at every node.

    Args:
      child_value_logits: per level L = 1..depth, float ``[vocab**L, K]``, value-head logits of the
        node reached by each action (e.g. log of :func:`return_distributions`).
      offset_fn: ``[..., K]`` logits -> ``[...]`` offsets, e.g. ``lambda l:
        guidance.qsharp_logit_offset(l, atoms, eta)``.
    """
    policy = []
    for d in range(tree.depth):
        n = tree.vocab**d
        offsets = offset_fn(jnp.asarray(child_value_logits[d], jnp.float32)).reshape(n, tree.vocab)
        ids = jnp.broadcast_to(jnp.arange(tree.vocab), (n, tree.vocab))
        logits = _guided_logits(jnp.log(jnp.asarray(tree.ref_probs[d], jnp.float32)), ids, offsets)
        probs = np.asarray(jnp.exp(logits - jnp.max(logits, -1, keepdims=True)), np.float64)
        policy.append(probs / probs.sum(-1, keepdims=True))
    return policy


def distribution_logits(dists: list[np.ndarray]) -> list[np.ndarray]:
    """log p, with exact zeros as -inf (a value head that learned them exactly)."""
    with np.errstate(divide="ignore"):
        return [np.log(p) for p in dists]
