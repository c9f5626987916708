"""Exact tabular checks: Q♯ guidance is the KL-regularized optimum; CD is not; Bellman = Monte Carlo.

References are computed in float64 by enumerating every token sequence (itertools), by the closed
form of the optimal sequence distribution, or by backward induction — never by the JAX code under
test.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.tabular import exact as tabular
from qsharp_jax import guidance, losses

ATOMS = np.linspace(0.0, 1.0, 11)
Z = jnp.asarray(ATOMS, jnp.float32)
_qsharp = jax.jit(guidance.qsharp_logit_offset)
_cd = jax.jit(guidance.cd_logit_offset)


def brute_sequences(tree, policy):
    """{token tuple: (probability, reward)} by walking every sequence token by token."""
    out = {}
    for seq in itertools.product(range(tree.vocab), repeat=tree.depth):
        prob, node = 1.0, 0
        for d, a in enumerate(seq):
            prob *= policy[d][node, a]
            node = node * tree.vocab + a
        out[seq] = (prob, tree.rewards[node])
    return out


def make_tree(depth, vocab, seed):
    return tabular.random_tree(np.random.default_rng(seed), depth, vocab, ATOMS)


def qsharp_policy(tree, eta):
    logits = tabular.distribution_logits(tabular.return_distributions(tree, ATOMS))
    return tabular.guided_policy(tree, logits, lambda l: _qsharp(l, Z, jnp.float32(eta)))


def cd_policy(tree, eta):
    logits = tabular.distribution_logits(tabular.return_distributions(tree, ATOMS))
    return tabular.guided_policy(tree, logits, lambda l: _cd(l, Z, jnp.float32(eta)))


@pytest.mark.parametrize("depth,vocab,seed", [(2, 4, 0), (3, 2, 1), (3, 5, 2)])
def test_tree_helpers_match_brute_force(depth, vocab, seed):
    tree = make_tree(depth, vocab, seed)
    seqs = brute_sequences(tree, list(tree.ref_probs))
    np.testing.assert_allclose(tabular.sequence_probs(tree, list(tree.ref_probs))[0], [p for p, _ in seqs.values()])
    # return distribution of every prefix, by summing over its completions
    dists = tabular.return_distributions(tree, ATOMS)
    for level in range(1, depth + 1):
        for prefix in itertools.product(range(vocab), repeat=level):
            node = int(np.ravel_multi_index(prefix, (vocab,) * level))
            hist = np.zeros(len(ATOMS))
            for seq, (p, r) in seqs.items():
                if seq[:level] == prefix:
                    hist[int(round(r * 10))] += p
            np.testing.assert_allclose(dists[level - 1][node], hist / hist.sum(), atol=1e-12)


@pytest.mark.parametrize("eta", [1.0, 0.1, 0.01, 1e-3])
@pytest.mark.parametrize("depth,vocab", [(2, 2), (2, 5), (3, 3), (4, 2), (4, 4)])
def test_qsharp_policy_is_optimal(depth, vocab, eta):
    tree = make_tree(depth, vocab, seed=depth * 10 + vocab)
    pi_q = qsharp_policy(tree, eta)
    tol = 1e-5 if eta >= 0.01 else 1e-4  # float32 offsets ~1/η carry ~7 significant digits
    # 1. the closed form of the optimal sequence distribution: π*(y) ∝ π_ref(y)·exp(r(y)/η)
    ref_seq = tabular.sequence_probs(tree, list(tree.ref_probs))[0]
    log_w = np.log(ref_seq) + tree.rewards / eta
    closed_form = np.exp(log_w - log_w.max())
    closed_form /= closed_form.sum()
    np.testing.assert_allclose(tabular.sequence_probs(tree, pi_q)[0], closed_form, atol=tol)
    # 2. per-token conditionals from backward induction
    for q, o in zip(pi_q, tabular.optimal_policy(tree, eta)):
        np.testing.assert_allclose(q, o, atol=tol)
    # 3. its objective is V(root), the maximum
    j_q = tabular.objective(tree, pi_q, eta)
    np.testing.assert_allclose(j_q, tabular.optimal_values(tree, eta)[0][0], atol=10 * tol)


@pytest.mark.parametrize("depth,vocab,eta", [(3, 3, 0.1), (4, 2, 0.03), (2, 5, 0.5)])
def test_qsharp_beats_perturbations_and_cd(depth, vocab, eta):
    tree = make_tree(depth, vocab, seed=7)
    pi_q = qsharp_policy(tree, eta)
    j_q = tabular.objective(tree, pi_q, eta)
    rng = np.random.default_rng(0)
    for scale in (1e-2, 1e-1, 1.0):
        for _ in range(10):
            pert = [p * np.exp(scale * rng.normal(size=p.shape)) for p in pi_q]
            pert = [p / p.sum(-1, keepdims=True) for p in pert]
            assert tabular.objective(tree, pert, eta) < j_q + 1e-7
    assert tabular.objective(tree, cd_policy(tree, eta), eta) <= j_q + 1e-7


def test_cd_picks_the_worse_subtree():
    """Theorem 4.1: a sure 0.5 vs a 10% chance at 1. CD follows the mean; the optimum does not."""
    tree, eta = tabular.cd_counterexample(), 0.1
    pi_q, pi_cd, pi_star = qsharp_policy(tree, eta), cd_policy(tree, eta), tabular.optimal_policy(tree, eta)
    risky_star = 0.5 * np.exp(0.1 * np.log(0.9 + 0.1 * np.exp(10)) / eta)
    risky_star /= risky_star + 0.5 * np.exp(0.5 / eta)  # closed form of π*(risky | root)
    np.testing.assert_allclose([pi_q[0][0, 1], pi_star[0][0, 1]], risky_star, atol=1e-6)
    assert pi_q[0][0, 1] > 0.9 and pi_cd[0][0, 1] < 0.05
    j = {name: tabular.objective(tree, p, eta) for name, p in [("q", pi_q), ("cd", pi_cd), ("star", pi_star)]}
    assert j["cd"] < j["star"] - 0.2
    np.testing.assert_allclose(j["q"], j["star"], atol=1e-6)


def fit_bellman(tree, discount, steps=3000):
    """Minimize categorical_bellman_loss over a table of logits (one row per node, levels 1..depth)."""
    sizes = [tree.vocab**level for level in range(1, tree.depth + 1)]
    ref = [jnp.asarray(p, jnp.float32) for p in tree.ref_probs[1:]]
    rewards = jnp.concatenate([jnp.zeros(sum(sizes[:-1])), jnp.asarray(tree.rewards, jnp.float32)])
    discounts = jnp.concatenate([jnp.full(sum(sizes[:-1]), discount), jnp.zeros(sizes[-1])])

    def loss(table):
        levels = jnp.split(table, np.cumsum(sizes)[:-1])
        nxt = [
            jnp.einsum("na,nak->nk", ref[i], jax.nn.softmax(levels[i + 1]).reshape(sizes[i], tree.vocab, -1))
            for i in range(tree.depth - 1)
        ]
        nxt.append(jnp.full((sizes[-1], len(ATOMS)), 1.0 / len(ATOMS)))  # unused: discount 0
        return losses.categorical_bellman_loss(table, jnp.concatenate(nxt), rewards, discounts, Z)

    opt = optax.adam(optax.cosine_decay_schedule(0.2, steps))

    @jax.jit
    def run(table):
        def step(carry, _):
            table, state = carry
            updates, state = opt.update(jax.grad(loss)(table), state)
            return (optax.apply_updates(table, updates), state), None

        (table, _), _ = jax.lax.scan(step, (table, opt.init(table)), None, length=steps)
        return table

    table = run(jnp.zeros((sum(sizes), len(ATOMS))))
    return np.asarray(jax.nn.softmax(table), np.float64)


@pytest.mark.parametrize(
    "depth,vocab,rewards_on_atoms,discount",
    [(3, 3, True, 1.0), (4, 2, False, 1.0), (3, 3, False, 0.8)],
)
def test_bellman_fixed_point_matches_monte_carlo(depth, vocab, rewards_on_atoms, discount):
    values = ATOMS if rewards_on_atoms else np.array([0.07, 0.33, 0.5, 0.91, 1.0])
    tree = tabular.random_tree(np.random.default_rng(3), depth, vocab, values)
    fitted = fit_bellman(tree, discount)
    exact = np.concatenate(tabular.return_distributions(tree, ATOMS, discount))  # by enumeration
    projected = np.concatenate(tabular.projected_bellman_distributions(tree, ATOMS, discount))
    # Bellman's fixed point is the projected one; means are exact whenever nothing is clipped.
    np.testing.assert_allclose(fitted, projected, atol=5e-4)
    np.testing.assert_allclose(fitted @ ATOMS, exact @ ATOMS, atol=5e-4)
    if discount == 1.0:  # projecting atoms onto atoms is the identity: no projection error at all
        np.testing.assert_allclose(fitted, exact, atol=5e-4)
    else:
        assert np.abs(projected - exact).max() > 1e-2  # the check above is not vacuous
