"""Property tests (hypothesis) for the losses and offsets, each checked under jit and without."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qsharp_jax import guidance, losses

finite = dict(allow_nan=False, allow_infinity=False)


@st.composite
def atoms_strategy(draw):
    k = draw(st.sampled_from([2, 5, 11]))  # few shapes: each new one recompiles
    gaps = draw(hnp.arrays(np.float64, k - 1, elements=st.floats(0.05, 2.0, **finite)))
    start = draw(st.floats(-2.0, 2.0, **finite))
    return np.concatenate([[start], start + np.cumsum(gaps)]).astype(np.float32)


@st.composite
def atoms_and_values(draw, n=8):
    atoms = draw(atoms_strategy())
    u = draw(hnp.arrays(np.float64, n, elements=st.floats(0.0, 1.0, **finite)))
    values = atoms[0] + u * (atoms[-1] - atoms[0])
    return atoms, np.clip(values.astype(np.float32), atoms[0], atoms[-1])


@functools.cache
def _jitted(fn, static_items):
    return jax.jit(functools.partial(fn, **dict(static_items)))


def both(fn, *args, **kwargs):
    """fn evaluated without and with jit; they must agree."""
    eager = fn(*args, **kwargs)
    jitted = _jitted(fn, tuple(sorted(kwargs.items())))(*args)
    np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-6)
    return np.asarray(eager, np.float64)


@given(atoms_and_values())
def test_two_hot_is_a_mean_preserving_distribution(case):
    atoms, values = case
    probs = both(losses.two_hot, jnp.asarray(values), jnp.asarray(atoms))
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    scale = atoms[-1] - atoms[0]
    np.testing.assert_allclose(probs @ atoms.astype(np.float64), values, atol=1e-5 * max(1.0, scale))
    assert np.all((probs > 1e-6).sum(-1) <= 2)  # at most two neighbouring atoms


@given(atoms_strategy(), st.sampled_from([1, 4]), st.integers(0, 2**31 - 1))
def test_projection_preserves_mass_and_mean(atoms, m, seed):
    rng = np.random.default_rng(seed)
    support = rng.uniform(atoms[0], atoms[-1], size=(3, m)).astype(np.float32)
    probs = rng.dirichlet(np.ones(m), size=3).astype(np.float32)
    out = both(losses.categorical_projection, jnp.asarray(support), jnp.asarray(probs), jnp.asarray(atoms))
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)
    scale = max(1.0, float(np.abs(atoms).max()))
    np.testing.assert_allclose(out @ atoms, (support * probs).sum(-1), atol=2e-5 * scale)


_loss_grad = jax.jit(jax.grad(losses.categorical_return_loss))


@given(atoms_and_values(n=4), st.integers(0, 2**31 - 1))
def test_mle_loss_minimized_at_target(case, seed):
    """Any other logits give a larger loss than log(target); the loss there is finite with finite grads."""
    atoms, values = case
    atoms_j, values_j = jnp.asarray(atoms), jnp.asarray(values)
    target = losses.two_hot(values_j, atoms_j)
    at_target = jnp.log(jnp.maximum(target, 1e-12))
    best = both(losses.categorical_return_loss, at_target, values_j, atoms_j)
    other = at_target + jnp.asarray(np.random.default_rng(seed).normal(size=at_target.shape), jnp.float32)
    assert both(losses.categorical_return_loss, other, values_j, atoms_j) >= best - 1e-5
    grads = _loss_grad(other, values_j, atoms_j)
    assert np.all(np.isfinite(grads))


@given(
    hnp.arrays(np.float32, (4, 5), elements=st.floats(-30, 30, width=32)),
    hnp.arrays(np.float32, 4, elements=st.floats(0, 1, width=32)),
    hnp.arrays(np.bool_, 4),
    hnp.arrays(np.float32, (4, 5), elements=st.floats(-30, 30, width=32)),
)
def test_masked_entries_do_not_matter(logits, returns, mask, other_logits):
    atoms = jnp.linspace(0.0, 1.0, 5)
    swapped = np.where(mask[:, None], logits, other_logits)
    swapped_returns = np.where(mask, returns, 1.0 - returns)
    a = both(losses.categorical_return_loss, jnp.asarray(logits), jnp.asarray(returns), atoms, jnp.asarray(mask))
    b = both(losses.categorical_return_loss, jnp.asarray(swapped), jnp.asarray(swapped_returns), atoms, jnp.asarray(mask))
    np.testing.assert_allclose(a, b, rtol=1e-6)
    grads = jax.grad(losses.categorical_return_loss)(jnp.asarray(logits), jnp.asarray(returns), atoms, jnp.asarray(mask))
    assert np.all(np.isfinite(grads))
    np.testing.assert_array_equal(np.asarray(grads)[~mask], 0.0)


@given(
    hnp.arrays(np.float32, (3, 7), elements=st.floats(-20, 20, width=32)),
    st.floats(1e-3, 10.0),
)
def test_offsets_finite_and_ordered(value_logits, eta):
    atoms = jnp.linspace(0.0, 1.0, 7)
    q = both(guidance.qsharp_logit_offset, jnp.asarray(value_logits), atoms, eta)
    cd = both(guidance.cd_logit_offset, jnp.asarray(value_logits), atoms, eta)
    assert np.all(np.isfinite(q)) and np.all(np.isfinite(cd))
    assert np.all(q >= cd - 1e-4 * max(1.0, 1 / eta))  # Jensen: log E e^{R/η} >= E[R]/η
    grads = jax.grad(lambda v: guidance.qsharp_logit_offset(v, atoms, eta).sum())(jnp.asarray(value_logits))
    assert np.all(np.isfinite(grads))


@given(st.sampled_from([2, 9]), st.sampled_from([1, 2, None]), st.integers(0, 2**31 - 1), st.sampled_from(["min", "exclude"]))
def test_guided_softmax_is_reweighted_reference(vocab, k, seed, others):
    """softmax(guided) ∝ π_ref·exp(offset) on candidates; 'exclude' puts zero mass elsewhere."""
    rng = np.random.default_rng(seed)
    batch, k = 3, k or vocab
    ref = rng.normal(size=(batch, vocab)).astype(np.float32)
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(batch)]).astype(np.int32)
    offs = rng.normal(size=(batch, k)).astype(np.float32)
    logits = both(guidance.guided_logits, jnp.asarray(ref), jnp.asarray(ids), jnp.asarray(offs), others=others)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ref_p = np.exp(ref - ref.max(-1, keepdims=True))
    for b in range(batch):
        w = np.full(vocab, offs[b].min() if others == "min" else -np.inf)
        w[ids[b]] = offs[b]
        expected = ref_p[b] * np.exp(w - offs[b].max())
        np.testing.assert_allclose(probs[b], expected / expected.sum(), atol=1e-6)
