"""KV cache pytree for cached decoding: fixed shapes, jit-friendly, donate-able."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


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
        slots, and a row may be refilled with a new sequence (:func:`refill`) at any step.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    kv_mask: jax.Array
    kv_positions: jax.Array
    positions: jax.Array
    index: jax.Array
    recent: jax.Array
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
        )


def refill(cache: KVCache, fresh: KVCache, rows: jax.Array) -> KVCache:
    """A ring ``cache`` whose rows ``rows [R]`` hold ``fresh``'s R sequences instead of theirs.

    ``fresh`` is a prefill of R prompts into its own (non-ring) cache of P slots; its slots go to
    the P ring slots before ``cache.index`` (wrapping), the rows' other slots are masked out, and
    their positions and token-shift history become the prompts'. A row index ``>= batch`` is
    skipped (a refill of fewer than R rows). The next token of those rows is written at
    ``cache.index`` like every other row's, so a sequence of P + N tokens spans P + N slots.
    """
    slots, p = cache.max_len, fresh.max_len
    arc = (cache.index - p + jnp.arange(p)) % slots  # [P]
    rows_col = rows[:, None]
    put = lambda old, new: old.at[rows_col, :, arc[None, :], :].set(  # noqa: E731
        jnp.swapaxes(new, 1, 2).astype(old.dtype), mode="drop")  # new [R, K, P, D] -> indexed [R, P, K, D]
    kv_mask = jnp.zeros((rows.shape[0], slots), bool).at[:, arc].set(fresh.kv_mask)
    return cache.replace(
        k=tuple(put(o, n) for o, n in zip(cache.k, fresh.k)),
        v=tuple(put(o, n) for o, n in zip(cache.v, fresh.v)),
        kv_mask=cache.kv_mask.at[rows].set(kv_mask, mode="drop"),
        kv_positions=cache.kv_positions.at[rows_col, arc[None, :]].set(fresh.kv_positions, mode="drop"),
        positions=cache.positions.at[rows].set(fresh.positions, mode="drop"),
        recent=cache.recent.at[rows].set(fresh.recent, mode="drop"),
    )
