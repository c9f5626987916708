"""Value losses for Q♯: distributional (categorical) and scalar, all pure, masked and jittable.

Shapes use ``[...]`` for any leading shape (e.g. ``[batch, time]``) and ``K`` for the number of
atoms. ``atoms`` is a float vector ``[K]``, strictly increasing, covering the reward range (default
in this project: 11 atoms on [0, 1]). Every loss is a mean over the unmasked elements; a fully
masked batch gives exactly 0, and NaN/inf in masked-out padding never leaks into loss or gradient.

Returns outside the atom range are an error (``ValueError``; inside ``jit`` it surfaces as a
``JaxRuntimeError`` carrying the same text) unless ``clip=True`` is passed.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from qsharp_jax import _validate

_UNIT_RANGE = np.array([0.0, 1.0], np.float32)
_CLIP_HINT = "Widen `atoms` to cover the reward range, or pass clip=True to clip to its ends."


def categorical_projection(support: jax.Array, probs: jax.Array, atoms: jax.Array) -> jax.Array:
    """C51 projection of a distribution on an arbitrary support onto the fixed atoms.

    Each point mass at ``s`` is split between the two atoms around it in proportion to its
    distance (linear interpolation), so the mean is preserved exactly whenever the support lies in
    ``[atoms[0], atoms[-1]]``; points outside are moved to the nearest end first (the C51 rule).
    Works for non-uniform atoms.

    Args:
      support: float ``[..., M]``, the values the distribution puts mass on.
      probs: float ``[..., M]``, the mass on each support point.
      atoms: float ``[K]``, strictly increasing.

    Returns:
      float32 ``[..., K]``: the projected masses (they sum to ``probs.sum(-1)``).
    """
    _validate.check_atoms(atoms)
    if jnp.ndim(support) < 1:
        raise ValueError(f"support must be [..., M] (rank >= 1); got shape {jnp.shape(support)}")
    chex.assert_equal_shape(
        [support, probs], custom_message="support and probs must both be [..., M]"
    )
    return _project(support, probs, atoms)


def _project(support: jax.Array, probs: jax.Array, atoms: jax.Array) -> jax.Array:
    dtype = jnp.promote_types(jnp.result_type(support, probs, atoms), jnp.float32)
    support, probs, atoms = (x.astype(dtype) for x in (support, probs, atoms))
    support = jnp.clip(support, atoms[0], atoms[-1])
    gaps = atoms[1:] - atoms[:-1]
    one = jnp.ones((1,), dtype)
    # Reciprocal distance to the next atom up / down; the placeholder 1 at the ends is never used
    # with a non-zero distance because the support is clipped.
    inv_up = 1.0 / jnp.concatenate([gaps, one])
    inv_down = 1.0 / jnp.concatenate([one, gaps])
    delta = support[..., None, :] - atoms[:, None]  # [..., K, M]
    scaled = jnp.where(delta >= 0, delta * inv_up[:, None], -delta * inv_down[:, None])
    weights = jnp.clip(1.0 - scaled, 0.0, 1.0)
    return jnp.einsum("...km,...m->...k", weights, probs)


def two_hot(values: jax.Array, atoms: jax.Array, *, clip: bool = False) -> jax.Array:
    """Two-hot encoding of scalar returns on the atoms (mean-preserving).

    A value between atoms ``z_i <= v <= z_{i+1}`` gets mass ``(z_{i+1} - v) / (z_{i+1} - z_i)`` on
    ``z_i`` and the rest on ``z_{i+1}``; a value on an atom is one-hot.

    Args:
      values: float ``[...]``.
      atoms: float ``[K]``, strictly increasing.
      clip: clip values outside ``[atoms[0], atoms[-1]]`` instead of raising.

    Returns:
      float32 ``[..., K]``, each row a probability distribution with mean ``values``.
    """
    _validate.check_atoms(atoms)
    values = jnp.asarray(values)
    if not clip:
        _validate.check_in_range(values, atoms, True, "values", _CLIP_HINT)
    return _project(values[..., None], jnp.ones_like(values, jnp.float32)[..., None], atoms)


def _check_batch(
    logits: jax.Array, values: jax.Array, atoms: jax.Array, logits_name: str, values_name: str
) -> None:
    """``logits`` is ``[..., K]`` over the leading shape of ``values`` ``[...]``."""
    _validate.check_atoms(atoms)
    k = atoms.shape[0]
    chex.assert_rank(
        logits,
        values.ndim + 1,
        custom_message=f"{logits_name} must be [..., K={k}] with [...] = {values_name}.shape "
        f"{values.shape}; got {logits_name}.shape {logits.shape}",
    )
    chex.assert_equal_shape_prefix(
        [logits, values],
        values.ndim,
        custom_message=f"{logits_name}.shape[:-1] must equal {values_name}.shape",
    )
    chex.assert_axis_dimension(
        logits, -1, k, custom_message=f"{logits_name}.shape[-1] must be the number of atoms K={k}"
    )


def _projected_cross_entropy(
    logits: jax.Array, support: jax.Array, probs: jax.Array, atoms: jax.Array, mask: jax.Array
) -> jax.Array:
    """Masked mean of -Σ_k t_k log softmax(logits)_k, t = stop_gradient(projection of support/probs).

    logits ``[..., K]``, support/probs ``[..., M]``, mask float ``[...]``. Padding is replaced by
    harmless values before any arithmetic so NaN/inf there reaches neither loss nor gradient.
    """
    valid = (mask > 0)[..., None]
    support = jnp.where(valid, support, atoms[0])
    probs = jnp.where(valid, probs, 0.0)
    targets = jax.lax.stop_gradient(_project(support, probs, atoms))
    log_probs = jax.nn.log_softmax(jnp.where(valid, logits, 0.0).astype(jnp.float32), axis=-1)
    cross_entropy = -jnp.sum(jnp.where(targets > 0, targets * log_probs, 0.0), axis=-1)  # 0·log 0 = 0
    return _validate.masked_mean(cross_entropy, mask)


def categorical_return_loss(
    logits: jax.Array,
    returns: jax.Array,
    atoms: jax.Array,
    mask: jax.Array | None = None,
    *,
    clip: bool = False,
) -> jax.Array:
    """Q♯'s Monte-Carlo distributional maximum likelihood loss.

    Cross-entropy of ``softmax(logits)`` against ``two_hot(returns, atoms)``: for observed returns
    ``R`` of π_ref rollouts, its minimizer is the (two-hot projected) return distribution of π_ref
    from each prefix. Two-hot targets, not the official code's rounding to the nearest atom, keep
    the learned mean unbiased.

    Args:
      logits: float ``[..., K]`` categorical value head.
      returns: float ``[...]`` observed returns.
      atoms: float ``[K]``, strictly increasing.
      mask: bool or float ``[...]``; 0 marks padding. ``None`` means all valid.
      clip: clip returns outside the atom range instead of raising.

    Returns:
      float32 scalar: mean cross-entropy over unmasked elements (0 if none).
    """
    returns = jnp.asarray(returns)
    _check_batch(logits, returns, atoms, "logits", "returns")
    mask = _validate.check_mask(mask, returns.shape, "returns")
    if not clip:
        _validate.check_in_range(returns, atoms, mask > 0, "returns", _CLIP_HINT)
    point_mass = jnp.ones_like(returns, jnp.float32)[..., None]
    return _projected_cross_entropy(logits, returns[..., None], point_mass, atoms, mask)


def categorical_bellman_loss(
    logits: jax.Array,
    next_probs: jax.Array,
    rewards: jax.Array,
    discounts: jax.Array,
    atoms: jax.Array,
    mask: jax.Array | None = None,
    *,
    clip: bool = False,
) -> jax.Array:
    """Distributional Bellman loss for evaluating π_ref (no max: it evaluates, not improves).

    Target = C51 projection of ``rewards + discounts * atoms`` with masses ``next_probs``, gradient
    stopped; loss = cross-entropy of ``softmax(logits)`` against it. ``next_probs`` is the π_ref
    mixture of next-state return distributions, Σ_a π_ref(a|s') p(·|s'a), formed by the caller.
    A terminal step has ``discounts = 0`` and its target is ``two_hot(rewards)``.

    Args:
      logits: float ``[..., K]`` value head at the current state.
      next_probs: float ``[..., K]``, a distribution over atoms for the next state.
      rewards: float ``[...]`` immediate rewards.
      discounts: float ``[...]``, >= 0 (0 at terminal steps).
      atoms: float ``[K]``, strictly increasing.
      mask: bool or float ``[...]``; 0 marks padding.
      clip: clip target points outside the atom range (standard C51) instead of raising.

    Returns:
      float32 scalar: mean cross-entropy over unmasked elements (0 if none).
    """
    rewards, discounts = jnp.asarray(rewards), jnp.asarray(discounts)
    _check_batch(logits, rewards, atoms, "logits", "rewards")
    _check_batch(next_probs, rewards, atoms, "next_probs", "rewards")
    chex.assert_equal_shape(
        [rewards, discounts], custom_message="rewards and discounts must have the same shape [...]"
    )
    mask = _validate.check_mask(mask, rewards.shape, "rewards")
    support = rewards[..., None] + discounts[..., None] * atoms
    if not clip:
        _validate.check_in_range(
            support,
            atoms,
            (mask > 0)[..., None] & (next_probs > 0),
            "rewards + discounts * atoms (the Bellman target support)",
            _CLIP_HINT,
        )
    return _projected_cross_entropy(logits, support, next_probs, atoms, mask)


def _check_scalar_batch(values: jax.Array, returns: jax.Array, name: str) -> None:
    chex.assert_equal_shape(
        [values, returns], custom_message=f"{name} and returns must have the same shape [...]"
    )


def bernoulli_return_loss(
    logits: jax.Array,
    returns: jax.Array,
    mask: jax.Array | None = None,
    *,
    clip: bool = False,
) -> jax.Array:
    """Binary cross-entropy of ``sigmoid(logits)`` against returns in [0, 1] (soft labels allowed).

    For 0/1 rewards this is the exact return distribution, a Bernoulli with p = P(R = 1).

    Args:
      logits: float ``[...]``.
      returns: float ``[...]`` in [0, 1].
      mask: bool or float ``[...]``; 0 marks padding.
      clip: clip returns to [0, 1] instead of raising.

    Returns:
      float32 scalar, mean over unmasked elements (0 if none).
    """
    returns = jnp.asarray(returns)
    _check_scalar_batch(logits, returns, "logits")
    mask = _validate.check_mask(mask, returns.shape, "returns")
    valid = mask > 0
    if not clip:
        _validate.check_in_range(returns, _UNIT_RANGE, valid, "returns", "Pass clip=True to clip.")
    returns = jax.lax.stop_gradient(jnp.clip(jnp.where(valid, returns, 0.0), 0.0, 1.0))
    logits = jnp.where(valid, logits, 0.0).astype(jnp.float32)
    bce = -(returns * jax.nn.log_sigmoid(logits) + (1.0 - returns) * jax.nn.log_sigmoid(-logits))
    return _validate.masked_mean(bce, mask)


def mse_return_loss(
    values: jax.Array, returns: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Mean squared error ``(values - returns)²`` of a scalar value head (the CD/VAS baseline).

    Args:
      values: float ``[...]``.
      returns: float ``[...]``.
      mask: bool or float ``[...]``; 0 marks padding.

    Returns:
      float32 scalar, mean over unmasked elements (0 if none).
    """
    returns = jnp.asarray(returns)
    _check_scalar_batch(values, returns, "values")
    mask = _validate.check_mask(mask, returns.shape, "returns")
    valid = mask > 0
    err = jnp.where(valid, values, 0.0).astype(jnp.float32) - jax.lax.stop_gradient(
        jnp.where(valid, returns, 0.0)
    )
    return _validate.masked_mean(jnp.square(err), mask)
