"""KV cache pytree for cached decoding: fixed shapes, jit-friendly, donate-able."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# ``KVCache.start`` of a ring row whose sequence has ended (it wrote padding): it reads no slot.
ENDED = np.iinfo(np.int32).max


@struct.dataclass
class KVCache:
    """Keys/values of every layer for ``S`` slots per sequence.

    Slots fill left to right, the same count for every sequence (``index``); a slot written for a
    padding token has ``kv_mask`` False and is never attended to. Position ids are per sequence, so
    left-padded prompts decode exactly like unpadded ones. Each layer has its own buffer, so a
    decode step writes one slot of each in place instead of copying a stacked array.

    Attributes:
      k, v: tuples of ``layers`` arrays ``[batch, kv_heads, slots, head_dim]`` in the model's dtype.
      kv_mask: bool ``[batch, slots]``, slot holds a real token.
      kv_positions: int32 ``[batch, slots]``, position id of the token in each slot.
      positions: int32 ``[batch]``, position id the next real token will get.
      index: int32 ``[]``, the next slot to write.
      recent: int32 ``[batch, n]``, the last n real tokens, oldest first (−1: none yet), for a
        model with ``token_shift = n`` (``[batch, 0]`` otherwise): what the next token's
        token-shift embedding reads.
      ring: static. False: slots fill left to right and a write past ``max_len`` is an overflow.
        True (continuous batching): one token per call, written at slot ``index % max_len``; every
        slot whose ``kv_mask`` is True is attended to (slot order does not matter: positions are
        per slot), so a sequence may wrap around as long as it never spans more than ``max_len``
        slots, and a row may be refilled with a new sequence (:func:`refill`) at any step. A row
        that writes padding has ended: its slots are no longer attended to, and a real token
        written to it later starts a sequence without context (a refill gives it a prompt).
      start: int32 ``[batch]``, a ring row's first slot as an unwrapped count like ``index``
        (``ENDED`` once the row has ended; zeros and unused without a ring). Attention to a ring
        reads only the last ``index - min(start)`` slots, in whole blocks: the longest live row's
        span, not the whole ring.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    kv_mask: jax.Array
    kv_positions: jax.Array
    positions: jax.Array
    index: jax.Array
    recent: jax.Array
    start: jax.Array
    ring: bool = struct.field(pytree_node=False, default=False)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @classmethod
    def create(
        cls, *, layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype, token_shift: int = 0
    ) -> "KVCache":
        shape = (batch, kv_heads, max_len, head_dim)
        return cls(
            k=tuple(jnp.zeros(shape, dtype) for _ in range(layers)),
            v=tuple(jnp.zeros(shape, dtype) for _ in range(layers)),
            kv_mask=jnp.zeros((batch, max_len), bool),
            kv_positions=jnp.zeros((batch, max_len), jnp.int32),
            positions=jnp.zeros((batch,), jnp.int32),
            index=jnp.zeros((), jnp.int32),
            recent=jnp.full((batch, token_shift), -1, jnp.int32),
            start=jnp.zeros((batch,), jnp.int32),
        )


def written(cache: KVCache, kv_mask: jax.Array, real: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(start, kv_mask)`` after one slot per row was written at ``cache.index`` (``kv_mask``
    updated), rows ``real [B]`` with a real token: in a ring the others end (no slot attended to)
    and a real token after an end starts a sequence; without a ring nothing changes."""
    if not cache.ring:
        return cache.start, kv_mask
    return jnp.where(real, jnp.minimum(cache.start, cache.index), ENDED), kv_mask & real[:, None]


def refill(cache: KVCache, fresh: KVCache, source: jax.Array) -> KVCache:
    """A ring ``cache`` whose rows b with ``source[b] >= 0`` hold ``fresh``'s sequence ``source[b]``.

    ``fresh`` is a prefill of R prompts into its own (non-ring) cache of P slots; its slots go to
    the P ring slots before ``cache.index`` (wrapping), the row's other slots are masked out, its
    positions and token-shift history become the prompt's and its ``start`` the first of those
    slots. The next token of those rows is written at ``cache.index`` like every other row's, so a
    sequence of P + N tokens spans P + N slots. Rows are selected, not scattered into, so a cache split over devices by rows stays
    split (a scatter along the sharded axis would gather every row on every device).

    Args:
      source: int ``[B]``, per row the fresh sequence it takes, or −1 to keep its own.
    """
    slots, p = cache.max_len, fresh.max_len
    taken, mine = source >= 0, jnp.maximum(source, 0)
    shift = (cache.index - p) % slots  # fresh slot i goes to ring slot (index - p + i) % slots

    def place(old, new):  # new [R, ..., P, ...] (slots on axis 2 for k/v, 1 for masks) -> old's rows
        axis = 2 if new.ndim == 4 else 1
        widths = [(0, 0)] * new.ndim
        widths[axis] = (0, slots - p)
        ring = jnp.roll(jnp.pad(new, widths), shift, axis=axis)  # [R, ..., slots, ...]
        arc = jnp.roll(jnp.arange(slots) < p, shift)
        keep = taken.reshape(-1, *[1] * (old.ndim - 1)) & arc.reshape(*[1] * axis, slots, *[1] * (old.ndim - 1 - axis))
        return jnp.where(keep, jnp.take(ring, mine, axis=0).astype(old.dtype), old)

    rows = lambda old, new: jnp.where(taken.reshape(-1, *[1] * (old.ndim - 1)), new[mine], old)  # noqa: E731
    return cache.replace(
        k=tuple(place(o, n) for o, n in zip(cache.k, fresh.k)),
        v=tuple(place(o, n) for o, n in zip(cache.v, fresh.v)),
        kv_mask=jnp.where(taken[:, None], place(jnp.zeros_like(cache.kv_mask), fresh.kv_mask), cache.kv_mask),
        kv_positions=place(cache.kv_positions, fresh.kv_positions),
        positions=rows(cache.positions, fresh.positions),
        recent=rows(cache.recent, fresh.recent),
        start=jnp.where(taken, cache.index - p, cache.start),
    )
