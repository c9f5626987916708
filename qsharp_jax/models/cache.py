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
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    kv_mask: jax.Array
    kv_positions: jax.Array
    positions: jax.Array
    index: jax.Array
    recent: jax.Array

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
