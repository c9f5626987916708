"""Whole-sequence reference forwards at one width, for the tests that check the KV-cache engine
against the forward of every prefix it extends.

Run eagerly, each of those forwards compiles every operation anew for its sequence length (most of
those tests' time on a 2-core machine). A causal model's output at a position does not depend on
the tokens after it, so each prefix is right-padded (mask False) to one width and one compiled
forward serves them all; the positions returned are the prefix's own.
"""

import jax
import jax.numpy as jnp
import numpy as np


def at_width(forward, width: int):
    """``forward(tokens [B, T] int32, mask [B, T] bool) -> [B, T, ...]`` compiled once for
    ``width`` columns; the returned function takes any ``T <= width`` (mask default: all real)."""
    compiled = jax.jit(forward)

    def call(tokens, mask=None):
        tokens = np.asarray(tokens, np.int32)
        mask = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask, bool)
        t = tokens.shape[1]
        if t > width:
            raise ValueError(f"a {t}-token sequence is wider than at_width's {width}")
        pad = [(0, 0), (0, width - t)]
        return compiled(jnp.asarray(np.pad(tokens, pad)), jnp.asarray(np.pad(mask, pad)))[:, :t]

    return call
