"""Input checks shared by the public math modules.

Static facts (rank, shape, dtype) are checked with chex at trace time. Value facts (atoms increasing,
η > 0, returns inside the atom range) are checked at once when the values are concrete, and inside
compiled code through a host callback, so a jitted step fails loudly instead of training on garbage.
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

# Returns this close to the atom range (relative to its width) are accepted and clipped: float32
# rewards like 0.1 * 10 must not trip the check.
RANGE_TOLERANCE = 1e-6


def check_value(bad_fn: Callable[..., tuple], message: str, *args: Any, at_runtime: bool = True) -> None:
    """Raise ``ValueError(message.format(*details))`` when ``bad_fn(*args)`` reports bad input.

    ``bad_fn`` returns ``(bad, *details)``: a scalar bool and values for the message. Concrete
    arguments (also constants closed over inside ``jit``) are checked now, at trace time. Traced
    arguments are checked on the host when the compiled code runs (unless ``at_runtime=False``,
    for hot loops that guard themselves another way); the ``ValueError`` then surfaces wrapped in
    a ``JaxRuntimeError`` whose text contains ``message``.
    """
    with jax.ensure_compile_time_eval():
        bad, *details = bad_fn(*args)
    try:
        is_bad = bool(bad)
    except jax.errors.ConcretizationTypeError:
        if at_runtime:
            jax.debug.callback(_raise_if_bad, bad, *details, message=message)
        return
    if is_bad:
        _raise_if_bad(True, *details, message=message)


def _raise_if_bad(bad: Any, *details: Any, message: str) -> None:
    if np.any(np.asarray(bad)):
        raise ValueError(message.format(*(np.asarray(d).tolist() for d in details)))


def check_atoms(atoms: jax.Array) -> None:
    """``atoms`` must be a float vector ``[K]``, K >= 2, strictly increasing."""
    chex.assert_rank(atoms, 1, custom_message="atoms must be a vector [K] of return values")
    chex.assert_type(atoms, float, custom_message="atoms must be floating point")
    if atoms.shape[0] < 2:
        raise ValueError(f"atoms needs at least 2 values to span a return range, got shape {atoms.shape}")
    check_value(
        lambda z: (jnp.any(~(z[1:] > z[:-1])), z),  # `~(>)` also catches NaN
        "atoms must be strictly increasing (e.g. jnp.linspace(0, 1, 11)); got {}",
        atoms,
    )


def check_eta(eta: Any) -> None:
    """η is the paper's KL coefficient: a positive scalar (the official code's `eta` is 1/η)."""
    chex.assert_rank(eta, 0, custom_message="eta (the KL coefficient η) must be a scalar")
    check_value(
        lambda e: (~(jnp.asarray(e) > 0), e),
        "eta (the KL coefficient η) must be > 0, got {}. Note: η here is the paper's KL coefficient; "
        "the official code's `eta` flag is 1/η.",
        eta,
    )


def check_mask(mask: jax.Array | None, shape: tuple[int, ...], name: str) -> jax.Array:
    """Return ``mask`` as float32 with ``shape`` (all ones when None)."""
    if mask is None:
        return jnp.ones(shape, jnp.float32)
    mask = jnp.asarray(mask)
    chex.assert_shape(mask, shape, custom_message=f"mask must have the shape of {name}")
    return mask.astype(jnp.float32)


def check_in_range(
    values: jax.Array, atoms: jax.Array, where: Any, name: str, fix: str
) -> None:
    """``values`` must lie in ``[atoms[0], atoms[-1]]`` wherever ``where`` holds (padding is ignored)."""
    def bad_fn(values, atoms, where):
        lo, hi = atoms[0], atoms[-1]
        tol = RANGE_TOLERANCE * (hi - lo)
        outside = ((values < lo - tol) | (values > hi + tol) | jnp.isnan(values)) & where
        return (
            jnp.any(outside),
            lo,
            hi,
            jnp.min(jnp.where(outside, values, jnp.inf)),
            jnp.max(jnp.where(outside, values, -jnp.inf)),
        )

    check_value(
        bad_fn,
        f"{name} must lie inside the atom range [{{}}, {{}}]; found values outside it from {{}} to "
        f"{{}}. {fix}",
        values,
        atoms,
        where,
    )


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Σ mask·values / Σ mask, and exactly 0 when the mask is empty (never NaN).

    Masked-out entries are zeroed with ``where``, so NaN/inf in padding cannot leak in.
    """
    total = jnp.sum(mask)
    numer = jnp.sum(jnp.where(mask > 0, values * mask, 0.0))
    return jnp.where(total > 0, numer / jnp.where(total > 0, total, 1.0), 0.0)
