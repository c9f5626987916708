"""Guidance: how a value model turns π_ref's logits into the guided policy's logits.

With η the paper's KL coefficient (π* ∝ π_ref · exp(Q*/η); the official code's ``eta`` flag is
1/η), the optimal KL-regularized policy adds Q*(s, a)/η to π_ref's logits, where

    Q*(s, a)/η = log E_{π_ref}[exp(R/η) | s, a]

is a functional of the *distribution* of π_ref's return R. Q♯ learns that distribution and adds
exactly this; CD/VAS add E[R]/η, the unregularized Q, which is provably suboptimal. All offsets are
computed in float32 log space and stay finite for η down to 1e-3 with atoms in [0, 1].

The public functions check their inputs (see ``_validate``); :data:`UNCHECKED_OFFSETS` are the same
math for callers that have validated once at their boundary.
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp

from qsharp_jax import _validate


def _check_value_logits(value_logits: jax.Array, atoms: jax.Array) -> None:
    _validate.check_atoms(atoms)
    if jnp.ndim(value_logits) < 1:
        raise ValueError(f"value_logits must be [..., K]; got shape {jnp.shape(value_logits)}")
    chex.assert_axis_dimension(
        value_logits,
        -1,
        atoms.shape[0],
        custom_message=f"value_logits must be [..., K] with K = len(atoms) = {atoms.shape[0]}; "
        f"got shape {value_logits.shape}",
    )


def qsharp_logit_offset(value_logits: jax.Array, atoms: jax.Array, eta: float | jax.Array) -> jax.Array:
    """Q♯ offset: ``log Σ_k softmax(value_logits)_k · exp(atoms_k / η)`` = Q*/η.

    Args:
      value_logits: float ``[..., K]``, categorical return distribution of each candidate.
      atoms: float ``[K]``, strictly increasing.
      eta: scalar η > 0, the KL coefficient (small η = strong guidance).

    Returns:
      float32 ``[...]``.
    """
    _check_value_logits(value_logits, atoms)
    _validate.check_eta(eta)
    return _qsharp(value_logits, atoms, eta)


def _qsharp(value_logits, atoms, eta):
    log_p = jax.nn.log_softmax(value_logits.astype(jnp.float32), axis=-1)
    return jax.nn.logsumexp(log_p + atoms.astype(jnp.float32) / eta, axis=-1)


def cd_logit_offset(value_logits: jax.Array, atoms: jax.Array, eta: float | jax.Array) -> jax.Array:
    """CD/VAS offset: the mean return ``(Σ_k p_k · atoms_k) / η`` with ``p = softmax(value_logits)``.

    Args:
      value_logits: float ``[..., K]``.
      atoms: float ``[K]``, strictly increasing.
      eta: scalar η > 0.

    Returns:
      float32 ``[...]``.
    """
    _check_value_logits(value_logits, atoms)
    _validate.check_eta(eta)
    return _cd(value_logits, atoms, eta)


def _cd(value_logits, atoms, eta):
    probs = jax.nn.softmax(value_logits.astype(jnp.float32), axis=-1)
    return probs @ atoms.astype(jnp.float32) / eta


def bernoulli_logit_offset(logits: jax.Array, eta: float | jax.Array) -> jax.Array:
    """Q♯ offset for 0/1 rewards with a Bernoulli head: ``log((1 − p) + p · exp(1/η))``.

    Computed as ``logaddexp(log σ(−x), log σ(x) + 1/η)`` so that it stays finite for small η.

    Args:
      logits: float ``[...]``, p = sigmoid(logits) = P(R = 1).
      eta: scalar η > 0.

    Returns:
      float32 ``[...]``.
    """
    _validate.check_eta(eta)
    return _bernoulli(logits, None, eta)


def _bernoulli(logits, atoms, eta):  # atoms unused: the signature of the other offsets
    logits = jnp.asarray(logits).astype(jnp.float32)
    return jnp.logaddexp(jax.nn.log_sigmoid(-logits), jax.nn.log_sigmoid(logits) + 1.0 / eta)


# The offsets without their value checks, ``offset(value_outputs, atoms, eta)``: for compiled hot
# loops (the decoding loop) that validate η and the atoms once at their public boundary, where a
# check on a traced value would become a host callback on every token.
UNCHECKED_OFFSETS = {"qsharp": _qsharp, "cd": _cd, "bernoulli": _bernoulli}


def guided_logits(
    ref_logits: jax.Array,
    candidate_ids: jax.Array,
    offsets: jax.Array,
    *,
    others: Literal["min", "exclude"] = "min",
) -> jax.Array:
    """Add value offsets to π_ref's logits for the scored candidate tokens.

    Args:
      ref_logits: float ``[..., V]``, π_ref's next-token logits (``[B, V]`` in decoding).
      candidate_ids: int ``[..., k]`` token ids in ``[0, V)`` (e.g. π_ref's top-k); passing all V
        ids gives full-vocabulary guidance. A repeated id gets its largest offset.
      offsets: float ``[..., k]``, e.g. from :func:`qsharp_logit_offset`.
      others: what unscored tokens get. ``"min"``: the smallest candidate offset of their row
        (the official code's choice: unscored tokens count as the worst scored one, so π_ref's
        support is kept). ``"exclude"``: ``-inf`` (sampling stays within the candidates).

    Returns:
      float32 ``[..., V]``: ``ref_logits + offset`` per token; softmax of it is the guided policy.
    """
    if others not in ("min", "exclude"):
        raise ValueError(f'others must be "min" or "exclude", got {others!r}')
    ref_logits, candidate_ids, offsets = map(jnp.asarray, (ref_logits, candidate_ids, offsets))
    if ref_logits.ndim < 1:
        raise ValueError(f"ref_logits must be [..., V]; got shape {ref_logits.shape}")
    lead, vocab = ref_logits.shape[:-1], ref_logits.shape[-1]
    chex.assert_type(candidate_ids, int, custom_message="candidate_ids must be integer token ids")
    chex.assert_equal_shape(
        [candidate_ids, offsets],
        custom_message=f"candidate_ids and offsets must both be [..., k]; got "
        f"{candidate_ids.shape} and {offsets.shape}",
    )
    chex.assert_shape(
        candidate_ids,
        (*lead, None),
        custom_message=f"candidate_ids must be [..., k] with [...] = ref_logits.shape[:-1] = {lead}",
    )
    k = candidate_ids.shape[-1]
    if k < 1:
        raise ValueError("candidate_ids must hold at least one candidate per row (k >= 1)")
    _validate.check_value(
        lambda ids: (jnp.any((ids < 0) | (ids >= vocab)), jnp.min(ids), jnp.max(ids)),
        f"candidate_ids must lie in [0, V={vocab}); got ids from {{}} to {{}}",
        candidate_ids,
    )
    # one NaN offset would turn its whole row NaN (through the row minimum): say so instead
    _validate.check_value(
        lambda o: (jnp.any(jnp.isnan(o)), jnp.sum(jnp.isnan(o))),
        "offsets hold {} NaN values (a value model with NaN outputs or parameters?); guidance is undefined there",
        offsets,
    )
    ids = candidate_ids.reshape(-1, k)
    offs = offsets.reshape(-1, k).astype(jnp.float32)
    if others == "min":
        fill = jnp.min(offs, axis=-1, keepdims=True)
    else:
        fill = jnp.full((ids.shape[0], 1), -jnp.inf, jnp.float32)
    rows = jnp.arange(ids.shape[0])[:, None]
    # max-scatter onto a floor of `fill`: every candidate offset is >= the row minimum, so a
    # unique id gets exactly its offset and a repeated id deterministically gets its largest.
    full = jnp.broadcast_to(fill, (ids.shape[0], vocab)).at[rows, ids].max(offs)
    return ref_logits.astype(jnp.float32) + full.reshape(*lead, vocab)


def guidance_kl(ref_candidate_logits: jax.Array, ref_lse: jax.Array, offsets: jax.Array) -> jax.Array:
    """KL(π_g ‖ π_ref) of one guided step, π_g = softmax of :func:`guided_logits` (``others="min"``)
    at temperature 1 before any truncation: the paper's per-token KL (π_ref's own is 0).

    With q = π_ref, o the candidates' offsets shifted by their row minimum (the other tokens' shift)
    and Z = Σ_c q_c e^{o_c} + (1 − Σ_c q_c): KL = Σ_c q_c e^{o_c} o_c / Z − log Z. O(k) per row.

    Args:
      ref_candidate_logits: float ``[..., k]``, π_ref's logits of the k candidates (distinct ids).
      ref_lse: float ``[...]``, logsumexp of π_ref's logits over the whole vocabulary.
      offsets: float ``[..., k]``, the candidates' offsets (0 everywhere: unguided, KL 0).
    Returns:
      float32 ``[...]``.
    """
    o = offsets - jnp.min(offsets, axis=-1, keepdims=True)
    log_q = ref_candidate_logits - ref_lse[..., None]
    rest = jnp.log(jnp.maximum(1.0 - jnp.sum(jnp.exp(log_q), axis=-1), 0.0))  # π_ref's mass off the candidates
    log_w = log_q + o
    log_z = jnp.logaddexp(jax.nn.logsumexp(log_w, axis=-1), rest)
    return jnp.sum(jnp.exp(log_w - log_z[..., None]) * o, axis=-1) - log_z
