"""Guidance offsets and guided logits against float64 numpy and brute-force loops."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from qsharp_jax import guidance

ATOMS = np.linspace(0.0, 1.0, 11)


def np_qsharp_offset(logits, atoms, eta):
    """log Σ p_k exp(z_k/η) in float64 with the max factored out by hand."""
    logits = logits.astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    e = atoms / eta
    m = e.max()
    return m + np.log((p * np.exp(e - m)).sum(-1))


class OffsetTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(1.0, 0.1, 0.01, 1e-3)
    def test_qsharp_offset_matches_float64(self, eta):
        logits = np.random.default_rng(0).normal(size=(4, 3, 11)) * 3
        got = self.variant(guidance.qsharp_logit_offset)(
            jnp.asarray(logits, jnp.float32), jnp.asarray(ATOMS, jnp.float32), eta
        )
        expected = np_qsharp_offset(logits, ATOMS, eta)
        assert np.all(np.isfinite(got))
        # float32 carries ~7 digits of offsets that grow like 1/η
        np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_cd_offset_is_mean_over_eta(self):
        logits = np.random.default_rng(1).normal(size=(6, 11))
        p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        got = self.variant(guidance.cd_logit_offset)(jnp.asarray(logits, jnp.float32), jnp.asarray(ATOMS, jnp.float32), 0.2)
        np.testing.assert_allclose(got, p @ ATOMS / 0.2, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(1.0, 0.05, 1e-3)
    def test_bernoulli_offset_equals_two_atom_qsharp(self, eta):
        """A Bernoulli head is the categorical head on atoms {0, 1} with logits (log(1−p), log p)."""
        x = np.random.default_rng(2).normal(size=(9,)) * 4
        got = self.variant(guidance.bernoulli_logit_offset)(jnp.asarray(x, jnp.float32), eta)
        two_atom_logits = np.stack([-np.logaddexp(0, x), -np.logaddexp(0, -x)], -1)
        np.testing.assert_allclose(got, np_qsharp_offset(two_atom_logits, np.array([0.0, 1.0]), eta), rtol=2e-6, atol=1e-5)

    def test_qsharp_between_mean_and_max(self):
        """Jensen: E[R]/η <= Q♯/η <= max support/η, and Q♯ -> E[R] as η -> ∞."""
        logits = jnp.asarray(np.random.default_rng(3).normal(size=(5, 11)), jnp.float32)
        atoms = jnp.asarray(ATOMS, jnp.float32)
        for eta in (0.01, 0.3, 5.0):
            q = guidance.qsharp_logit_offset(logits, atoms, eta)
            cd = guidance.cd_logit_offset(logits, atoms, eta)
            assert np.all(q >= cd - 1e-4) and np.all(q <= 1.0 / eta + 1e-4)
        np.testing.assert_allclose(
            guidance.qsharp_logit_offset(logits, atoms, 1e4) * 1e4, guidance.cd_logit_offset(logits, atoms, 1e4) * 1e4, atol=1e-3
        )

    def test_small_eta_with_point_masses_stays_finite(self):
        """Zero-probability atoms (logits −inf) and η = 1e-3: no NaN, no overflow, finite gradients."""
        atoms = jnp.asarray(ATOMS, jnp.float32)
        logits = jnp.full((2, 11), -jnp.inf).at[0, 10].set(0.0).at[1, 0].set(0.0).at[1, 3].set(-20.0)
        offs = guidance.qsharp_logit_offset(logits, atoms, 1e-3)
        np.testing.assert_allclose(offs[0], 1000.0, rtol=1e-6)
        np.testing.assert_allclose(offs[1], np_qsharp_offset(np.array([0.0, -20.0]), np.array([0.0, 0.3]), 1e-3), rtol=1e-5)
        grads = jax.grad(lambda l: guidance.qsharp_logit_offset(jnp.maximum(l, -50.0), atoms, 1e-3).sum())(logits)
        assert np.all(np.isfinite(grads))


def np_guided(ref, ids, offs, others):
    out = np.empty_like(ref, dtype=np.float64)
    for b in range(ref.shape[0]):
        fill = offs[b].min() if others == "min" else -np.inf
        for v in range(ref.shape[1]):
            hits = [offs[b, j] for j in range(ids.shape[1]) if ids[b, j] == v]
            out[b, v] = ref[b, v] + (max(hits) if hits else fill)
    return out


class GuidedLogitsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("min", "exclude")
    def test_matches_loop(self, others):
        rng = np.random.default_rng(4)
        ref = rng.normal(size=(3, 12))
        ids = np.stack([rng.choice(12, size=4, replace=False) for _ in range(3)])
        ids[2, 3] = ids[2, 0]  # a repeated id gets its largest offset
        offs = rng.normal(size=(3, 4))
        fn = self.variant(lambda r, i, o: guidance.guided_logits(r, i, o, others=others))
        got = fn(jnp.asarray(ref, jnp.float32), jnp.asarray(ids), jnp.asarray(offs, jnp.float32))
        np.testing.assert_allclose(got, np_guided(ref, ids, offs, others), rtol=1e-6)

    def test_full_vocabulary_and_leading_dims(self):
        rng = np.random.default_rng(5)
        ref, offs = rng.normal(size=(2, 3, 7)), rng.normal(size=(2, 3, 7))
        ids = np.broadcast_to(np.arange(7), (2, 3, 7))
        got = guidance.guided_logits(jnp.asarray(ref, jnp.float32), jnp.asarray(ids), jnp.asarray(offs, jnp.float32))
        np.testing.assert_allclose(got, ref + offs, rtol=1e-6)

    def test_bf16_reference_logits_compute_in_float32(self):
        ref = jnp.array([[1.0, 2.0, 3.0]], jnp.bfloat16)
        got = guidance.guided_logits(ref, jnp.array([[2]]), jnp.array([[1e-3]]))
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, [[1.001, 2.001, 3.001]], rtol=1e-6)


class BadInputTest(parameterized.TestCase):
    @parameterized.parameters(0.0, -0.1, float("nan"))
    def test_bad_eta(self, eta):
        with pytest.raises(ValueError, match=r"eta \(the KL coefficient η\) must be > 0.*1/η"):
            guidance.qsharp_logit_offset(jnp.zeros((2, 11)), jnp.asarray(ATOMS, jnp.float32), eta)
        with pytest.raises(ValueError, match="must be > 0"):
            guidance.bernoulli_logit_offset(jnp.zeros(2), eta)

    def test_bad_eta_traced(self):
        fn = jax.jit(guidance.cd_logit_offset)
        with pytest.raises(Exception, match="must be > 0"):
            jax.block_until_ready(fn(jnp.zeros((2, 11)), jnp.asarray(ATOMS, jnp.float32), jnp.float32(-1.0)))

    def test_eta_not_scalar(self):
        with pytest.raises(AssertionError, match="must be a scalar"):
            guidance.qsharp_logit_offset(jnp.zeros((2, 11)), jnp.asarray(ATOMS, jnp.float32), jnp.ones(2))

    def test_value_logits_wrong_atoms(self):
        with pytest.raises(AssertionError, match=r"K = len\(atoms\) = 11"):
            guidance.qsharp_logit_offset(jnp.zeros((2, 5)), jnp.asarray(ATOMS, jnp.float32), 0.1)

    @parameterized.parameters(
        ((2, 10), (2, 3), (2, 4), "candidate_ids and offsets must both be"),
        ((2, 10), (3, 3), (3, 3), r"ref_logits.shape\[:-1\]"),
        ((2, 10), (2,), (2,), r"ref_logits.shape\[:-1\]"),
    )
    def test_bad_shapes(self, ref_shape, ids_shape, off_shape, message):
        with pytest.raises(AssertionError, match=message):
            guidance.guided_logits(jnp.zeros(ref_shape), jnp.zeros(ids_shape, jnp.int32), jnp.zeros(off_shape))

    def test_float_ids_and_bad_others(self):
        with pytest.raises(AssertionError, match="integer token ids"):
            guidance.guided_logits(jnp.zeros((1, 4)), jnp.zeros((1, 2)), jnp.zeros((1, 2)))
        with pytest.raises(ValueError, match='"min" or "exclude"'):
            guidance.guided_logits(jnp.zeros((1, 4)), jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2)), others="max")

    def test_ids_out_of_range(self):
        with pytest.raises(ValueError, match=r"candidate_ids must lie in \[0, V=4\)"):
            guidance.guided_logits(jnp.zeros((1, 4)), jnp.array([[0, 4]]), jnp.zeros((1, 2)))
        with pytest.raises(Exception, match=r"candidate_ids must lie in"):
            jax.block_until_ready(jax.jit(guidance.guided_logits)(jnp.zeros((1, 4)), jnp.array([[-1, 2]]), jnp.zeros((1, 2))))
