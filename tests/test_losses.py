"""Losses against independent numpy computations (float64), under jit and without."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from qsharp_jax import losses
from experiments.tabular.exact import project_np

ATOMS = np.linspace(0.0, 1.0, 11)
NONUNIFORM = np.array([-1.0, -0.2, 0.0, 0.5, 2.0])


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_project(support, probs, atoms):
    """Brute force: two-hot every point mass separately and add them up."""
    flat_s, flat_p = support.reshape(-1, support.shape[-1]), probs.reshape(-1, probs.shape[-1])
    out = np.stack([p @ project_np(s, atoms) for s, p in zip(flat_s, flat_p)])
    return out.reshape(*support.shape[:-1], len(atoms))


class ProjectionTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_two_hot_known_values(self):
        probs = self.variant(losses.two_hot)(jnp.array([0.0, 0.25, 1.0, 0.5]), jnp.asarray(ATOMS))
        expected = np.zeros((4, 11))
        expected[0, 0] = 1
        expected[1, 2] = expected[1, 3] = 0.5
        expected[2, 10] = 1
        expected[3, 5] = 1
        np.testing.assert_allclose(probs, expected, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((ATOMS,), (NONUNIFORM,))
    def test_projection_matches_brute_force(self, atoms):
        rng = np.random.default_rng(0)
        support = rng.uniform(atoms[0] - 0.5, atoms[-1] + 0.5, size=(3, 2, 7))
        probs = rng.dirichlet(np.ones(7), size=(3, 2))
        got = self.variant(losses.categorical_projection)(
            jnp.asarray(support, jnp.float32), jnp.asarray(probs, jnp.float32), jnp.asarray(atoms, jnp.float32)
        )
        np.testing.assert_allclose(got, np_project(support, probs, atoms), atol=1e-5)

    def test_projection_of_atoms_is_identity(self):
        probs = np.random.default_rng(1).dirichlet(np.ones(5), size=4)
        got = losses.categorical_projection(
            jnp.broadcast_to(jnp.asarray(NONUNIFORM, jnp.float32), (4, 5)), jnp.asarray(probs, jnp.float32),
            jnp.asarray(NONUNIFORM, jnp.float32),
        )
        np.testing.assert_allclose(got, probs, atol=1e-6)


def _np_ce(logits, targets):
    return -(targets * np_log_softmax(logits)).sum(-1)


class ReturnLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy_with_mask(self):
        rng = np.random.default_rng(2)
        logits = rng.normal(size=(4, 6, 11))
        returns = rng.uniform(0, 1, size=(4, 6))
        mask = rng.uniform(size=(4, 6)) > 0.4
        ce = _np_ce(logits, project_np(returns.reshape(-1), ATOMS).reshape(4, 6, 11))
        expected = (ce * mask).sum() / mask.sum()
        got = self.variant(losses.categorical_return_loss)(
            jnp.asarray(logits, jnp.float32), jnp.asarray(returns, jnp.float32), jnp.asarray(ATOMS, jnp.float32),
            jnp.asarray(mask),
        )
        np.testing.assert_allclose(got, expected, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_float_mask_weights(self):
        rng = np.random.default_rng(3)
        logits, returns = rng.normal(size=(5, 11)), rng.uniform(size=5)
        w = np.array([0.5, 0.0, 2.0, 1.0, 0.25])
        ce = _np_ce(logits, project_np(returns, ATOMS))
        got = self.variant(losses.categorical_return_loss)(
            jnp.asarray(logits, jnp.float32), jnp.asarray(returns, jnp.float32), jnp.asarray(ATOMS, jnp.float32),
            jnp.asarray(w, jnp.float32),
        )
        np.testing.assert_allclose(got, (ce * w).sum() / w.sum(), rtol=1e-5)

    def test_minimized_at_target_distribution(self):
        """Gradient vanishes at logits = log(two-hot target) and the loss there is its entropy."""
        returns = jnp.array([0.37, 0.8, 0.05])
        atoms = jnp.asarray(ATOMS, jnp.float32)
        target = losses.two_hot(returns, atoms)
        logits = jnp.log(jnp.maximum(target, 1e-30))
        loss, grad = jax.value_and_grad(losses.categorical_return_loss)(logits, returns, atoms)
        entropy = -jnp.sum(jnp.where(target > 0, target * jnp.log(jnp.maximum(target, 1e-30)), 0)) / 3
        np.testing.assert_allclose(loss, entropy, atol=1e-5)
        np.testing.assert_allclose(grad, 0.0, atol=1e-6)


class BellmanLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy(self):
        rng = np.random.default_rng(4)
        logits = rng.normal(size=(3, 5, 11))
        next_probs = rng.dirichlet(np.ones(11), size=(3, 5))
        rewards = rng.uniform(0, 0.1, size=(3, 5))
        discounts = rng.choice([0.0, 0.9], size=(3, 5))
        mask = rng.uniform(size=(3, 5)) > 0.3
        support = rewards[..., None] + discounts[..., None] * ATOMS
        targets = np_project(support, next_probs, ATOMS)
        expected = (_np_ce(logits, targets) * mask).sum() / mask.sum()
        args = [jnp.asarray(x, jnp.float32) for x in (logits, next_probs, rewards, discounts, ATOMS)]
        got = self.variant(losses.categorical_bellman_loss)(*args, jnp.asarray(mask))
        np.testing.assert_allclose(got, expected, rtol=1e-5)

    def test_target_is_stop_gradient(self):
        """Only the current logits receive gradient: dL/dlogits = (softmax − target)/N."""
        rng = np.random.default_rng(5)
        logits = jnp.asarray(rng.normal(size=(4, 11)), jnp.float32)
        next_probs = jnp.asarray(rng.dirichlet(np.ones(11), size=4), jnp.float32)
        atoms = jnp.asarray(ATOMS, jnp.float32)
        zeros, ones = jnp.zeros(4), jnp.ones(4)
        g_logits, g_next = jax.grad(losses.categorical_bellman_loss, argnums=(0, 1))(
            logits, next_probs, zeros, ones, atoms
        )
        np.testing.assert_allclose(g_logits, (jax.nn.softmax(logits) - next_probs) / 4, atol=1e-6)
        np.testing.assert_array_equal(g_next, 0.0)


class ScalarLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_bernoulli_matches_numpy(self):
        rng = np.random.default_rng(6)
        logits, returns = rng.normal(size=(7,)) * 3, rng.uniform(size=7)
        mask = np.array([1, 1, 0, 1, 0, 1, 1], bool)
        p = 1 / (1 + np.exp(-logits))
        bce = -(returns * np.log(p) + (1 - returns) * np.log(1 - p))
        got = self.variant(losses.bernoulli_return_loss)(
            jnp.asarray(logits, jnp.float32), jnp.asarray(returns, jnp.float32), jnp.asarray(mask)
        )
        np.testing.assert_allclose(got, bce[mask].mean(), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_mse_matches_numpy(self):
        rng = np.random.default_rng(7)
        v, r = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
        mask = np.array([[1, 0, 1], [1, 1, 0]], bool)
        got = self.variant(losses.mse_return_loss)(jnp.asarray(v, jnp.float32), jnp.asarray(r, jnp.float32), mask)
        np.testing.assert_allclose(got, ((v - r) ** 2)[mask].mean(), rtol=1e-5)


ALL_LOSSES = {
    "categorical_return": lambda x, r, m: losses.categorical_return_loss(x, r, jnp.asarray(ATOMS, jnp.float32), m),
    "bellman": lambda x, r, m: losses.categorical_bellman_loss(
        x, jax.nn.softmax(x), r * 0.1, jnp.full(r.shape, 0.5), jnp.asarray(ATOMS, jnp.float32), m
    ),
    "bernoulli": lambda x, r, m: losses.bernoulli_return_loss(x[..., 0], r, m),
    "mse": lambda x, r, m: losses.mse_return_loss(x[..., 0], r, m),
}


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_fully_masked_is_zero_with_zero_gradient(name):
    fn = ALL_LOSSES[name]
    logits = jnp.full((3, 4, 11), jnp.nan).at[0].set(jnp.inf)
    returns = jnp.full((3, 4), 7.0)  # out of range, but masked out
    mask = jnp.zeros((3, 4), bool)
    loss, grad = jax.value_and_grad(fn)(logits, returns, mask)
    assert loss == 0.0
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_padding_garbage_does_not_leak(name):
    fn = ALL_LOSSES[name]
    rng = np.random.default_rng(8)
    logits = jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.float32)
    returns = jnp.asarray(rng.uniform(size=(2, 5)), jnp.float32)
    mask = jnp.asarray(rng.uniform(size=(2, 5)) > 0.5).at[0, 0].set(True).at[0, 1].set(False)
    clean_loss, clean_grad = jax.value_and_grad(fn)(logits, returns, mask)
    dirty_logits = logits.at[0, 1].set(jnp.nan)
    dirty_returns = returns.at[0, 1].set(-5.0)
    dirty_loss, dirty_grad = jax.jit(jax.value_and_grad(fn))(dirty_logits, dirty_returns, mask)
    np.testing.assert_allclose(dirty_loss, clean_loss, rtol=1e-6)
    np.testing.assert_allclose(dirty_grad, clean_grad, atol=1e-7)


class BadInputTest(parameterized.TestCase):
    def test_returns_out_of_range_eager(self):
        with pytest.raises(ValueError, match=r"returns must lie inside the atom range \[0.0, 1.0\].*clip=True"):
            losses.categorical_return_loss(jnp.zeros((2, 11)), jnp.array([0.5, 1.5]), jnp.asarray(ATOMS, jnp.float32))

    def test_returns_out_of_range_jitted(self):
        fn = jax.jit(losses.categorical_return_loss)
        with pytest.raises(Exception, match=r"returns must lie inside the atom range"):
            jax.block_until_ready(fn(jnp.zeros((2, 11)), jnp.array([0.5, -0.5]), jnp.asarray(ATOMS, jnp.float32)))

    def test_clip_true_clips(self):
        atoms = jnp.asarray(ATOMS, jnp.float32)
        logits = jnp.asarray(np.random.default_rng(9).normal(size=(2, 11)), jnp.float32)
        clipped = losses.categorical_return_loss(logits, jnp.array([1.5, -3.0]), atoms, clip=True)
        np.testing.assert_allclose(clipped, losses.categorical_return_loss(logits, jnp.array([1.0, 0.0]), atoms))
        np.testing.assert_allclose(losses.two_hot(jnp.array([2.0]), atoms, clip=True)[0, -1], 1.0)

    def test_bellman_support_out_of_range(self):
        atoms = jnp.asarray(ATOMS, jnp.float32)
        with pytest.raises(ValueError, match="Bellman target support"):
            losses.categorical_bellman_loss(
                jnp.zeros((1, 11)), jax.nn.one_hot(jnp.array([10]), 11), jnp.array([0.5]), jnp.array([1.0]), atoms
            )
        # mass only on atoms that stay in range: accepted
        losses.categorical_bellman_loss(
            jnp.zeros((1, 11)), jax.nn.one_hot(jnp.array([2]), 11), jnp.array([0.5]), jnp.array([1.0]), atoms
        )

    def test_bernoulli_returns_out_of_range(self):
        with pytest.raises(ValueError, match=r"returns must lie inside"):
            losses.bernoulli_return_loss(jnp.zeros(2), jnp.array([0.0, 2.0]))

    @parameterized.parameters(
        (np.array([0.0, 0.5, 0.5]), "strictly increasing"),
        (np.array([1.0, 0.0]), "strictly increasing"),
        (np.array([0.5]), "at least 2"),
        (np.zeros((2, 2)), "vector"),
        (np.arange(3), "floating point"),
    )
    def test_bad_atoms(self, atoms, message):
        with pytest.raises((ValueError, AssertionError), match=message):
            losses.two_hot(jnp.array([0.5]), jnp.asarray(atoms))

    def test_bad_atoms_jitted(self):
        with pytest.raises(Exception, match="strictly increasing"):
            jax.block_until_ready(jax.jit(losses.two_hot)(jnp.array([0.5]), jnp.array([0.0, 0.5, 0.4])))

    @parameterized.parameters(
        ((2, 11), (3,), None, "logits.shape\\[:-1\\] must equal returns.shape"),
        ((2, 10), (2,), None, "number of atoms K=11"),
        ((2, 3, 11), (2,), None, "logits must be \\[..., K=11\\]"),
        ((2, 11), (2,), (3,), "mask must have the shape of returns"),
    )
    def test_bad_shapes(self, logits_shape, returns_shape, mask_shape, message):
        mask = None if mask_shape is None else jnp.ones(mask_shape)
        with pytest.raises(AssertionError, match=message):
            losses.categorical_return_loss(
                jnp.zeros(logits_shape), jnp.zeros(returns_shape), jnp.asarray(ATOMS, jnp.float32), mask
            )

    def test_mismatched_scalar_shapes(self):
        with pytest.raises(AssertionError, match="values and returns must have the same shape"):
            losses.mse_return_loss(jnp.zeros((2, 3)), jnp.zeros((3, 2)))
        with pytest.raises(AssertionError, match="rewards and discounts"):
            losses.categorical_bellman_loss(
                jnp.zeros((2, 11)), jnp.zeros((2, 11)), jnp.zeros(2), jnp.zeros(3), jnp.asarray(ATOMS, jnp.float32)
            )


def test_constant_inputs_are_checked_at_trace_time():
    """Atoms and η closed over inside jit are validated while tracing: a plain ValueError, and no
    host callback left in the compiled step."""
    bad_atoms = jnp.array([0.0, 0.5, 0.4])
    with pytest.raises(ValueError, match="strictly increasing"):
        jax.jit(lambda v: losses.two_hot(v, bad_atoms))(jnp.array([0.1]))
    atoms = jnp.asarray(ATOMS, jnp.float32)
    jaxpr = jax.make_jaxpr(lambda v: losses.two_hot(v, atoms, clip=True))(jnp.ones(3))
    assert "callback" not in str(jaxpr)
    jaxpr = jax.make_jaxpr(lambda v: losses.two_hot(v, atoms))(jnp.ones(3))
    assert "callback" in str(jaxpr)  # traced returns still get their range check
