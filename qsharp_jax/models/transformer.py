"""One decoder-only transformer in Flax NNX, configured to be GPT-2 or a Llama-family model.

GPT-2 (learned positions, LayerNorm, GELU MLP, fused biases) and Llama / Qwen2 / Mistral (RoPE,
RMSNorm, SwiGLU, grouped-query attention) differ only in a handful of switches, so they share this
code; ``gpt2.py`` and ``llama.py`` turn a Hugging Face ``config.json`` into a
:class:`TransformerConfig` and hold the Hugging Face parameter-name tables.

Each block owns its parameter arrays and each layer its own KV-cache buffer (see ``_run`` for why
not a scan over stacked layers). Every parameter carries logical axis names for
:mod:`qsharp_jax.sharding`.

Three ways to run the layers:
  * ``model(input_ids, attention_mask)`` — the whole sequence, no cache.
  * ``model.extend(input_ids, cache, attention_mask)`` — append tokens to a :class:`KVCache`
    (prefill a prompt, or decode one or several tokens).
  * ``model.candidates_hidden(candidate_ids, cache)`` — score k alternative next tokens per
    sequence in one forward (each attends to the cache and to itself only); the cache is unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Literal

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qsharp_jax import _validate
from qsharp_jax.models import flash
from qsharp_jax.models.cache import KVCache, written

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture of a decoder-only transformer (hashable: it is static under jit). Usually made
    from a Hugging Face ``config.json`` (``gpt2.config_from_hf``, ``llama.config_from_hf``).

    Fields:
      vocab_size, hidden_size, num_layers: sizes; num_heads / num_kv_heads: query and key-value
        heads (grouped-query attention when fewer KV heads); head_dim: per head; mlp_dim: the MLP's
        inner width; max_positions: the longest sequence (learned positions' table size).
      norm, norm_eps: LayerNorm (GPT-2) or RMSNorm (Llama) and its epsilon.
      mlp, activation: ``gelu`` (GPT-2's two-matrix MLP) or ``gated`` (SwiGLU-style) and its
        activation name.
      positions, rope_theta, rope_scaling: learned absolute positions or RoPE (base, and Llama-3 /
        linear scaling as HF's ``rope_scaling`` items).
      qkv_bias, out_bias, mlp_bias: biases (GPT-2: all; Qwen2: q/k/v only; Llama: none).
      tie_embeddings: the LM head is the embedding's transpose.
      sliding_window: Mistral's attention window (None: full attention).
      model_type: the Hugging Face family name, for messages and loading.
      remat: recompute each block's activations in the backward pass instead of keeping them
        (``jax.checkpoint``: a whole-sequence forward's gradient then holds one block's
        activations, e.g. its attention scores, at a time, for about one more forward of compute);
        for fitting long sequences. Decoding is unaffected. A training choice, not part of the
        architecture: every Hugging Face family takes it.
      attention_kernel: the attention of whole-sequence forwards (fitting, scoring): ``auto``
        (Pallas flash on TPU and GPU, cuDNN on GPU for masks Pallas cannot express, XLA on CPU),
        ``xla``, ``pallas`` or ``cudnn`` (see :mod:`qsharp_jax.models.flash`). Same results up
        to rounding; decoding is unaffected. Like ``remat``, not part of the architecture.
      token_shift: > 0 adds to each position's input a second embedding of the real token that
        many positions back (a "token shift": a pair of tokens in one position, e.g. an edge's two
        ends in "a,b" with 2), so a look-up on the pair needs no previous-token head first; 0:
        none (every pretrained family). The KV cache keeps the last n real tokens
        (``KVCache.recent``), so cached decoding, candidate scoring and branches serve it too.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    max_positions: int
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_eps: float = 1e-6
    mlp: Literal["gelu", "gated"] = "gated"  # gated = SwiGLU-style act(gate) * up
    activation: str = "silu"
    positions: Literal["learned", "rope"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # e.g. (("rope_type", "llama3"), ...)
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"
    token_shift: int = 0
    remat: bool = False
    attention_kernel: str = "auto"

    def __post_init__(self):
        if self.attention_kernel not in flash.KERNELS:
            raise ValueError(f"attention_kernel must be one of {flash.KERNELS}, got {self.attention_kernel!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.activation!r}; supported: {sorted(ACTIVATIONS)}")
        if self.token_shift < 0:
            raise ValueError(f"token_shift must be >= 0 (0: none), got {self.token_shift}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        rope_inv_freq(self)  # validates the rope scaling


def rope_inv_freq(cfg: TransformerConfig) -> np.ndarray:
    """Inverse frequencies ``[head_dim / 2]`` of RoPE, with Llama-3 or linear scaling applied."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    scaling = dict(cfg.rope_scaling or ())
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        # long wavelengths are slowed by `factor`, short ones kept, the band between interpolated
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return np.where(medium, blended, scaled)
    raise ValueError(f"unsupported rope scaling {kind!r}; supported: default, linear, llama3")


def _init_param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], kind: str, dtype) -> nnx.Param:
    if kind == "normal":
        value = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif kind == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        value = jnp.zeros(shape, jnp.float32)
    return nnx.Param(value.astype(dtype), out_sharding=axes, eager_sharding=False)


class Block(nnx.Module):
    """One decoder block's parameters (names and shapes from :func:`block_param_specs`)."""

    def __init__(self, cfg: TransformerConfig, *, dtype, rngs: nnx.Rngs):
        for name, (shape, axes, kind) in block_param_specs(cfg).items():
            setattr(self, name, _init_param(rngs, shape, axes, kind, dtype))

    def arrays(self) -> dict[str, jax.Array]:
        return {name: var[...] for name, var in vars(self).items() if isinstance(var, nnx.Param)}


def block_param_specs(cfg: TransformerConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], str]]:
    """name -> (shape, logical axes, init) of one block's parameters."""
    E, H, K, D, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    specs = {
        "attn_norm_scale": ((E,), ("embed",), "ones"),
        "q": ((H, D, E), ("heads", "head_dim", "embed"), "normal"),
        "k": ((K, D, E), ("kv_heads", "head_dim", "embed"), "normal"),
        "v": ((K, D, E), ("kv_heads", "head_dim", "embed"), "normal"),
        "o": ((E, H, D), ("embed", "heads", "head_dim"), "normal"),
        "mlp_norm_scale": ((E,), ("embed",), "ones"),
        "up": ((F, E), ("mlp", "embed"), "normal"),
        "down": ((E, F), ("embed", "mlp"), "normal"),
    }
    if cfg.norm == "layernorm":
        specs["attn_norm_bias"] = ((E,), ("embed",), "zeros")
        specs["mlp_norm_bias"] = ((E,), ("embed",), "zeros")
    if cfg.qkv_bias:
        specs["q_bias"] = ((H, D), ("heads", "head_dim"), "zeros")
        specs["k_bias"] = ((K, D), ("kv_heads", "head_dim"), "zeros")
        specs["v_bias"] = ((K, D), ("kv_heads", "head_dim"), "zeros")
    if cfg.out_bias:
        specs["o_bias"] = ((E,), ("embed",), "zeros")
    if cfg.mlp == "gated":
        specs["gate"] = ((F, E), ("mlp", "embed"), "normal")
    if cfg.mlp_bias:
        specs["up_bias"] = ((F,), ("mlp",), "zeros")
        specs["down_bias"] = ((E,), ("embed",), "zeros")
        if cfg.mlp == "gated":
            specs["gate_bias"] = ((F,), ("mlp",), "zeros")
    return specs


def _norm(cfg: TransformerConfig, x: jax.Array, scale: jax.Array, bias: jax.Array | None) -> jax.Array:
    """LayerNorm or RMSNorm computed in float32, returned in ``x``'s dtype."""
    h = x.astype(jnp.float32)
    if cfg.norm == "layernorm":
        h = h - jnp.mean(h, axis=-1, keepdims=True)
    h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + cfg.norm_eps)
    h = h.astype(x.dtype) * scale
    return h + bias if bias is not None else h


def _rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate ``x [B, T, heads, D]`` by ``positions [B, T]`` (Hugging Face's half-split layout)."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)  # [B,T,D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention.

    Args:
      q: ``[B, T, H, D]``; k, v: ``[B, K, S, D]`` (the KV-cache layout) with H a multiple of K.
      mask: bool ``[B, T, S]``, True where query t may attend to key s.

    Returns:
      ``[B, T, H, D]`` in ``v``'s dtype; softmax in float32. A query with no allowed key gets a
      finite (uniform) average, never NaN — it only happens at padding.
    """
    b, t, h, d = q.shape
    kv = k.shape[1]
    # batch axes (b, k) lead in both operands, so no key/value copy is needed for the matmuls
    q = q.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", weights, v)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def linear(x: jax.Array, weight: jax.Array, out_dtype=None) -> jax.Array:
    """``x [..., in] @ weight.T`` for a weight stored ``[out, in]`` (PyTorch's layout); ``out`` and
    ``in`` may each span several axes (e.g. ``[heads, head_dim, embed]``), ``in`` matching ``x``.

    Contracting the minor axis of both operands is what XLA's CPU matmul kernels are fastest at
    for decode-sized batches (1.4-1.8x over ``[in, out]`` measured at M = 32); GPUs/TPUs do not mind.
    """
    w = weight.reshape(-1, x.shape[-1])
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=out_dtype)


def _attention_with_paths(
    q: jax.Array, k_past: jax.Array, v_past: jax.Array, past_mask: jax.Array, k_own: jax.Array, v_own: jax.Array,
    own_mask: jax.Array,
) -> jax.Array:
    """Attention of the tokens of P paths to the cached keys and to their own path's keys.

    Args:
      q: ``[B, P·T, H, D]``, path-major (T queries of path 0, then path 1, ...); k_past, v_past:
        ``[B, K, S, D]``; past_mask: bool ``[B, P·T or 1, S]``; k_own, v_own: ``[B, K, P, O, D]``,
        each path's own keys and values; own_mask: bool ``[T, O]``, which own keys query t sees
        (at least one each).

    Returns:
      ``[B, P·T, H, D]``, equal to :func:`attention` over the cache concatenated with each path's
      keys, without copying the cache per path.
    """
    b, pt, h, d = q.shape
    kv, p, o = k_own.shape[1], k_own.shape[2], k_own.shape[3]
    t, g = pt // p, h // kv
    q = q.reshape(b, pt, kv, g, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, P·T, D]
    scale = 1.0 / math.sqrt(d)
    past = jnp.einsum("bkgqd,bksd->bkgqs", q, k_past, preferred_element_type=jnp.float32) * scale
    past = jnp.where(past_mask[:, None, None], past, -jnp.inf)
    own = jnp.einsum("bkgptd,bkpod->bkgpto", q.reshape(b, kv, g, p, t, d), k_own,
                     preferred_element_type=jnp.float32) * scale
    own = jnp.where(own_mask, own, -jnp.inf).reshape(b, kv, g, pt, o)
    top = jnp.maximum(jnp.max(past, axis=-1), jnp.max(own, axis=-1))  # finite: every query sees an own key
    w_past = jnp.exp(past - top[..., None])
    w_own = jnp.exp(own - top[..., None])
    norm = jnp.sum(w_past, axis=-1) + jnp.sum(w_own, axis=-1)
    out = jnp.einsum("bkgqs,bksd->bkgqd", w_past.astype(v_past.dtype), v_past, preferred_element_type=jnp.float32)
    out = out + jnp.einsum("bkgpto,bkpod->bkgptd", w_own.reshape(b, kv, g, p, t, o),
                           v_own.astype(jnp.float32)).reshape(b, kv, g, pt, d)
    out = out / norm[..., None]
    return out.astype(v_past.dtype).transpose(0, 3, 1, 2, 4).reshape(b, pt, h, d)


_ALONE = np.ones((1, 1), bool)  # a path of one token sees itself

# Attention to a cache reads it in blocks of this many slots, up to the last one written (a ring: back
# to the longest live row's first slot): a decode step's attention costs what the sequences hold so
# far, not the preallocated length.
CACHE_BLOCK = 128


def _over_filled(fn: Callable, k: jax.Array, v: jax.Array, mask: jax.Array, end: jax.Array,
                 need: jax.Array | None = None) -> jax.Array:
    """``fn(k, v, mask)`` over the cache slots that hold something, in whole blocks.

    k, v: ``[B, K, S, D]``; mask: ``[..., S]``. ``need`` None: slots fill in order and the first
    ``end`` are read. Else (a ring) the last ``need`` slots before ``end``, wrapping (gathered). The
    count is rounded up to whole blocks (all slots at most), one branch per count (static shapes
    each) picked by ``lax.switch``; the slots left out are masked anyway: the result is the same.
    """
    slots = k.shape[2]
    sizes = [*range(CACHE_BLOCK, slots, CACHE_BLOCK), slots]
    if len(sizes) == 1:
        return fn(k, v, mask)
    count = end if need is None else need

    def over(n, k, v, m):
        if n == slots:
            return fn(k, v, m)
        if need is None:
            return fn(k[:, :, :n], v[:, :, :n], m[..., :n])
        at = (end - n + jnp.arange(n)) % slots
        return fn(jnp.take(k, at, axis=2), jnp.take(v, at, axis=2), jnp.take(m, at, axis=-1))

    branches = [functools.partial(over, n) for n in sizes]
    return jax.lax.switch(jnp.clip((count - 1) // CACHE_BLOCK, 0, len(sizes) - 1), branches, k, v, mask)


def _heads_major(x: jax.Array) -> jax.Array:
    """``[B, T, K, D]`` -> ``[B, K, T, D]``."""
    return x.transpose(0, 2, 1, 3)


AttendFn = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def identity_qk(model: "Transformer", scale: float) -> "Transformer":
    """Set every layer's query and key projections to ``scale`` × identity (in place; returns
    ``model``): head h's query and key are then ``scale`` times dimensions ``h·D … (h+1)·D`` of the
    normed input, so attention starts out as token matching (a position attends to positions that
    hold the same token), the step that look-up circuits otherwise take long to find from a random
    start. Needs ``num_heads · head_dim == hidden_size`` and as many key-value heads as query heads.
    """
    cfg = model.cfg
    E, H, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if H * D != E or K != H:
        raise ValueError(f"identity query/key initialization needs num_heads·head_dim == hidden_size and "
                         f"num_kv_heads == num_heads; got {H}·{D} vs {E}, {K} key-value heads")
    for block in model.layers:
        for name in ("q", "k"):
            var = getattr(block, name)
            var[...] = (scale * jnp.eye(E, dtype=jnp.float32).reshape(H, D, E)).astype(var[...].dtype)
            bias = getattr(block, f"{name}_bias", None)
            if bias is not None:
                bias[...] = jnp.zeros_like(bias[...])
    return model


class Transformer(nnx.Module):
    """Decoder-only LM. ``model(input_ids [B, T] int32, attention_mask=None) -> logits [B, T, V] f32``."""

    def __init__(self, cfg: TransformerConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        E = cfg.hidden_size
        self.embed = _init_param(rngs, (cfg.vocab_size, E), ("vocab", "embed"), "normal", dtype)
        if cfg.positions == "learned":
            self.pos_embed = _init_param(rngs, (cfg.max_positions, E), ("positions", "embed"), "normal", dtype)
        self.layers = nnx.List([Block(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm_scale = _init_param(rngs, (E,), ("embed",), "ones", dtype)
        if cfg.norm == "layernorm":
            self.final_norm_bias = _init_param(rngs, (E,), ("embed",), "zeros", dtype)
        if not cfg.tie_embeddings:
            self.lm_head = _init_param(rngs, (cfg.vocab_size, E), ("vocab", "embed"), "normal", dtype)
        if cfg.token_shift:  # drawn last: the other parameters equal those of the same seed without it
            self.shift_embed = _init_param(rngs, (cfg.vocab_size, E), ("vocab", "embed"), "normal", dtype)

    # ---------------------------------------------------------------- public API

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, branch_ids: jax.Array | None = None) -> jax.Array:
        return self.logits(self.hidden(input_ids, attention_mask, segment_ids, branch_ids))

    def hidden(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               segment_ids: jax.Array | None = None, branch_ids: jax.Array | None = None) -> jax.Array:
        """Final-normed hidden states ``[B, T, E]`` of a whole (left- or right-padded) sequence.

        ``segment_ids`` int ``[B, T]``: each row holds several sequences packed end to end
        (:func:`qsharp_jax.packing.pack_rows`), each a contiguous run of one id, all real tokens;
        a token attends to, is positioned in and token-shifts within its own sequence only, so
        every sequence's states equal its forward alone. Padding (mask False) follows them.

        ``branch_ids`` int ``[B, T]`` (with ``segment_ids``): a segment is a shared prefix (branch
        0, first) followed by several continuations of it (branches 1, 2, ..., each contiguous):
        a continuation's tokens see the prefix and their own branch only, so each continuation's
        states equal the forward of prefix + continuation alone (several sampled answers of one
        prompt, the prompt encoded once).
        """
        input_ids, mask = self._check_ids(input_ids, attention_mask)
        t = input_ids.shape[1]
        if self.cfg.positions == "learned" and t > self.cfg.max_positions:
            raise ValueError(f"sequence length {t} exceeds the model's max_positions={self.cfg.max_positions}")
        allowed = mask[:, None, :] & jnp.tril(jnp.ones((t, t), bool))[None]
        if branch_ids is not None:
            if segment_ids is None:
                raise ValueError("branch_ids split packed segments (pass segment_ids too)")
            chex.assert_shape([segment_ids, branch_ids], input_ids.shape,
                              custom_message="segment_ids and branch_ids must have the shape of input_ids")
            segment_ids, branch_ids = jnp.asarray(segment_ids), jnp.asarray(branch_ids)
            key_branch = branch_ids[:, None, :]
            allowed &= (segment_ids[:, :, None] == segment_ids[:, None, :]) & (
                (key_branch == 0) | (key_branch == branch_ids[:, :, None]))
            # a token's sequence is what it attends to: its position is how many tokens precede it there
            positions = jnp.maximum(jnp.sum(allowed, axis=-1, dtype=jnp.int32) - 1, 0)
            back = None
            if self.cfg.token_shift:  # the token n places back in that sequence (-1: none)
                rank = jnp.cumsum(allowed, axis=-1, dtype=jnp.int32)  # [B, T(query), T(key)]
                hit = allowed & (rank == (positions + 1 - self.cfg.token_shift)[:, :, None])
                found = jnp.sum(jnp.where(hit, input_ids[:, None, :], 0), axis=-1)
                back = jnp.where(mask & jnp.any(hit, axis=-1), found, -1).astype(jnp.int32)
        elif segment_ids is None:
            runs = jnp.ones_like(mask, jnp.int32)
            positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
            back = self._shift_back(input_ids, mask, self._no_recent(input_ids.shape[0]))[0]
        else:
            chex.assert_shape(segment_ids, input_ids.shape,
                              custom_message="segment_ids must have the shape of input_ids")
            segment_ids = jnp.asarray(segment_ids)
            at = jnp.arange(t)
            starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                                      segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
            runs = jnp.cumsum(starts, axis=1, dtype=jnp.int32)  # each sequence's ordinal, from 1
            allowed &= runs[:, :, None] == runs[:, None, :]  # a sequence is a run: an id seen again is another
            start = jax.lax.cummax(jnp.where(starts, at, 0), axis=1)  # where each token's sequence starts
            positions = at - start
            back = None
            if self.cfg.token_shift:  # n back inside the token's own sequence (-1: none)
                src = at - self.cfg.token_shift
                back = jnp.where(mask & (src >= start), jnp.take_along_axis(
                    input_ids, jnp.broadcast_to(jnp.maximum(src, 0), input_ids.shape), axis=1), -1).astype(jnp.int32)
        allowed &= self._window(positions, positions)
        # a fused kernel's mask: the sequence's ordinal at real tokens, 0 at padding (which then
        # sees earlier padding only: its states are meaningless either way)
        segments = None
        if branch_ids is None and (self.cfg.sliding_window is None or t <= self.cfg.sliding_window):
            segments = jnp.where(mask, runs, 0)
        kernel = flash.choose(self.cfg.attention_kernel, self.dtype, self.cfg.head_dim,
                              segments_suffice=segments is not None)

        def attend(q, k, v, _):
            if kernel == "xla":
                return attention(q, _heads_major(k), _heads_major(v), allowed), None
            return flash.fused_attention(q, k, v, allowed | jnp.eye(t, dtype=bool), segments, kernel), None

        x, _ = self._run(input_ids, positions, attend, None, back)
        return x

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache for ``batch`` sequences of up to ``max_len`` tokens (prompt + generated)."""
        if self.cfg.positions == "learned" and max_len > self.cfg.max_positions:
            raise ValueError(f"cache max_len={max_len} exceeds the model's max_positions={self.cfg.max_positions}")
        c = self.cfg
        return KVCache.create(
            layers=c.num_layers, batch=batch, max_len=max_len, kv_heads=c.num_kv_heads, head_dim=c.head_dim,
            dtype=self.dtype, token_shift=c.token_shift,
        )

    def extend(
        self, input_ids: jax.Array, cache: KVCache, attention_mask: jax.Array | None = None, *, last_only: bool = False
    ) -> tuple[jax.Array, KVCache]:
        """Append ``input_ids [B, T]`` to the cache; return their logits ``[B, T, V]`` (``last_only``:
        the last position's, ``[B, 1, V]`` — a prefill needs no more, and a 512-token prompt's logits
        at a 128k vocabulary are gigabytes per device) and the cache."""
        hidden, cache = self.extend_hidden(input_ids, cache, attention_mask)
        return self.logits(hidden[:, -1:] if last_only else hidden), cache

    def extend_hidden(
        self, input_ids: jax.Array, cache: KVCache, attention_mask: jax.Array | None = None
    ) -> tuple[jax.Array, KVCache]:
        """Like :meth:`extend`, returning final-normed hidden states ``[B, T, E]``.

        Prefill is ``extend(prompt, empty_cache, prompt_mask)``; decoding is ``extend(next_token,
        cache)``. Tokens with ``attention_mask`` False occupy a slot but are never attended to.
        Writing past ``cache.max_len`` raises when the slot index is concrete; under jit it makes
        the returned hidden states NaN (a host check per decoded token would cost too much).
        """
        input_ids, mask = self._check_ids(input_ids, attention_mask)
        self._check_cache(cache, input_ids.shape[0])
        t, slots = input_ids.shape[1], cache.max_len
        if t > slots:
            raise ValueError(f"{t} new tokens do not fit a cache of max_len={slots}")
        _validate.check_value(
            lambda i: (~cache.ring & (i + t > slots), i),
            f"cache overflow: writing {t} tokens at slot {{}} of a cache with max_len={slots}",
            cache.index,
            at_runtime=False,  # a host callback per decoded token is too dear; NaN marks it below
        )
        if cache.ring and t != 1:
            raise ValueError(f"a ring cache takes one token per call (decoding), got {t}; prefill into a fresh "
                             "cache and move it in with cache.refill")
        idx = cache.index % slots if cache.ring else cache.index
        positions = cache.positions[:, None] + jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        kv_mask = jax.lax.dynamic_update_slice(cache.kv_mask, mask, (0, idx))
        start, kv_mask = written(cache, kv_mask, mask[:, 0])  # t == 1 in a ring
        kv_positions = jax.lax.dynamic_update_slice(cache.kv_positions, positions.astype(jnp.int32), (0, idx))
        allowed = kv_mask[:, None, :]
        if not cache.ring:  # slots fill in order: causal by slot (a ring holds only the past and this token)
            allowed = allowed & (jnp.arange(slots)[None, None, :] <= (idx + jnp.arange(t))[None, :, None])
        allowed &= self._window(positions, kv_positions)
        window = (idx + 1, cache.index + 1 - jnp.min(start)) if cache.ring else (idx + t,)

        def attend(q, k, v, layer_cache):
            k_all, v_all = layer_cache
            k_all = jax.lax.dynamic_update_slice(k_all, _heads_major(k).astype(k_all.dtype), (0, 0, idx, 0))
            v_all = jax.lax.dynamic_update_slice(v_all, _heads_major(v).astype(v_all.dtype), (0, 0, idx, 0))
            out = _over_filled(lambda k, v, m: attention(q, k, v, m), k_all, v_all, allowed, *window)
            return out, (k_all, v_all)

        back, recent = self._shift_back(input_ids, mask, cache.recent)
        x, (new_k, new_v) = self._run(input_ids, positions, attend, (cache.k, cache.v), back)
        if not cache.ring:
            x = jnp.where(idx + t > slots, jnp.nan, x)
        cache = cache.replace(
            k=new_k, v=new_v, kv_mask=kv_mask, kv_positions=kv_positions,
            positions=cache.positions + jnp.sum(mask, axis=1, dtype=jnp.int32), index=cache.index + t, recent=recent,
            start=start,
        )
        return x, cache

    def candidates_hidden(
        self, candidate_ids: jax.Array, cache: KVCache, *, return_kv: bool = False
    ) -> jax.Array | tuple[jax.Array, tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]]:
        """Hidden states ``[B, k, E]`` of k alternative next tokens per sequence, in one forward.

        Candidate j of sequence b sits at the next position of b and attends to b's cached tokens
        and to itself only (a diagonal mask), so each row equals appending that single token. The
        cache is not changed; with ``return_kv`` the candidates' keys/values (per layer
        ``[B, kv_heads, k, head_dim]``) and their ids come back too, ``(k, v, candidate_ids)``,
        for :meth:`commit_candidate`.
        """
        candidate_ids, _ = self._check_ids(candidate_ids, None)
        self._check_cache(cache, candidate_ids.shape[0])
        positions = jnp.broadcast_to(cache.positions[:, None], candidate_ids.shape)
        past = self._cached_keys(cache, positions)

        def attend(q, k_new, v_new, layer_cache):
            k_past, v_past = layer_cache
            k_new = _heads_major(k_new).astype(k_past.dtype)
            v_new = _heads_major(v_new).astype(v_past.dtype)
            out = _over_filled(lambda k, v, m: _attention_with_paths(q, k, v, m, k_new[:, :, :, None],
                                                                     v_new[:, :, :, None], _ALONE),
                               k_past, v_past, past, *self._filled(cache))
            return out, (k_new, v_new)

        back = None
        if self.cfg.token_shift:  # every candidate is the next real token: n back is the oldest recent one
            back = jnp.broadcast_to(cache.recent[:, :1], candidate_ids.shape)
        x, (k, v) = self._run(candidate_ids, positions, attend, (cache.k, cache.v), back)
        return (x, (k, v, candidate_ids)) if return_kv else x

    def paths_hidden(
        self, path_ids: jax.Array, cache: KVCache, prefix: Any = None, *, siblings: bool = False
    ) -> tuple[jax.Array, Any]:
        """Hidden states ``[B, P, T, E]`` of tokens that extend P paths per sequence, in one forward.

        Path j of sequence b continues b's cached tokens with its ``prefix`` (the ``(k, v, ids)``
        of its earlier tokens that a previous call returned, per layer ``[B, kv_heads, P, L, head_dim]``
        and ids ``[B, P, L]``; None: an empty one) and then ``path_ids[b, j]`` ``[B, P, T]``:
        a chain (token t attends to the cache, the prefix and its path's tokens up to t: each row
        equals appending the prefix and ``path_ids[b, j, :t + 1]``), or with ``siblings`` T
        alternatives of the path's next token (each attends to the cache, the prefix and itself).
        The cache is unchanged. Returns ``(hidden, path)``: ``path`` is the prefix followed by the
        chain, to extend by another call (the prefix itself for siblings) — what a look-ahead along
        π_ref's continuations of k candidates needs without a forward per candidate.
        """
        path_ids = jnp.asarray(path_ids)
        chex.assert_rank(path_ids, 3, custom_message="path_ids must be [batch, paths, tokens]")
        b, p, t = path_ids.shape
        self._check_cache(cache, b)
        c = self.cfg
        if prefix is None:
            empty = jnp.zeros((b, c.num_kv_heads, p, 0, c.head_dim), cache.k[0].dtype)
            prefix = ((empty,) * c.num_layers, (empty,) * c.num_layers, jnp.zeros((b, p, 0), jnp.int32))
        pre_k, pre_v, pre_ids = prefix
        chex.assert_shape(pre_ids, (b, p, None), custom_message="the prefix's ids must be [batch, paths, length]")
        length = pre_ids.shape[2]
        offsets = np.full((t,), length) if siblings else length + np.arange(t)
        positions = jnp.broadcast_to(cache.positions[:, None, None] + offsets, (b, p, t)).reshape(b, p * t)
        past = self._cached_keys(cache, positions)
        # each token's own keys: its prefix, then its chain up to itself (siblings: itself only)
        new = np.eye(t, dtype=bool) if siblings else np.tri(t, dtype=bool)
        own_mask = np.concatenate([np.ones((t, length), bool), new], axis=1)

        def attend(q, k_new, v_new, layer_cache):
            k_past, v_past, k_pre, v_pre = layer_cache
            shape = (b, c.num_kv_heads, p, t, c.head_dim)
            k_own = jnp.concatenate([k_pre, _heads_major(k_new).astype(k_past.dtype).reshape(shape)], axis=3)
            v_own = jnp.concatenate([v_pre, _heads_major(v_new).astype(v_past.dtype).reshape(shape)], axis=3)
            out = _over_filled(lambda k, v, m: _attention_with_paths(q, k, v, m, k_own, v_own, own_mask),
                               k_past, v_past, past, *self._filled(cache))
            return out, (k_pre, v_pre) if siblings else (k_own, v_own)

        back = None
        if c.token_shift:  # the stream: the cache's last n real tokens, the prefix, the chain
            stream = jnp.concatenate([jnp.broadcast_to(cache.recent[:, None], (b, p, c.token_shift)),
                                      pre_ids.astype(jnp.int32), path_ids.astype(jnp.int32)], axis=2)
            back = jnp.take(stream, offsets, axis=2).reshape(b, p * t)  # n back of offset o: stream entry o
        x, (k, v) = self._run(path_ids.reshape(b, p * t), positions, attend, (cache.k, cache.v, pre_k, pre_v), back)
        ids = pre_ids if siblings else jnp.concatenate([pre_ids, path_ids.astype(jnp.int32)], axis=2)
        return x.reshape(b, p, t, -1), (k, v, ids)

    def branches_hidden(
        self, input_ids: jax.Array, attention_mask: jax.Array | None, branch_ids: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Hidden states of a sequence and of k one-token branches at every position, in one forward.

        Args:
          input_ids: int ``[B, T]`` (left or right padded); attention_mask: bool ``[B, T]`` or None.
          branch_ids: int ``[B, T, k]``: branch j at t is ``branch_ids[b, t, j]`` appended to the
            prefix ending at t.

        Returns:
          ``(hidden [B, T, E], branches [B, T, k, E])``: ``hidden`` equals :meth:`hidden`;
          ``branches[b, t, j]`` equals the last hidden state of the prefix's real tokens followed
          by that token. Each branch attends to its prefix and to itself only, so all ``T·k``
          branches cost one extra token each instead of one forward each (what a V-type Bellman
          target over π_ref's top-k needs at every position).
        """
        input_ids, mask = self._check_ids(input_ids, attention_mask)
        branch_ids = jnp.asarray(branch_ids)
        b, t = input_ids.shape
        chex.assert_rank(branch_ids, 3, custom_message=f"branch_ids must be [batch, time, k], got {branch_ids.shape}")
        chex.assert_equal_shape_prefix([input_ids, branch_ids], 2, custom_message="branch_ids must be [B, T, k]")
        k = branch_ids.shape[2]
        if self.cfg.positions == "learned" and t + 1 > self.cfg.max_positions:
            raise ValueError(f"sequence length {t} + 1 exceeds the model's max_positions={self.cfg.max_positions}")
        count = jnp.cumsum(mask, axis=1)
        positions = jnp.maximum(count - 1, 0)
        allowed = mask[:, None, :] & jnp.tril(jnp.ones((t, t), bool))[None]
        allowed &= self._window(positions, positions)
        branch_pos = jnp.repeat(count, k, axis=1)  # [B, T*k]: the position after the prefix
        prefix_end = jnp.repeat(jnp.arange(t), k)
        past = mask[:, None, :] & (jnp.arange(t)[None, None, :] <= prefix_end[None, :, None])
        past &= self._window(branch_pos, positions)  # [B, T*k, T]

        def attend(q, k_all, v_all, _):
            k_seq, v_seq = _heads_major(k_all[:, :t]), _heads_major(v_all[:, :t])
            main = attention(q[:, :t], k_seq, v_seq, allowed)
            branches = _attention_with_paths(  # each branch a path of one token
                q[:, t:], k_seq, v_seq, past, _heads_major(k_all[:, t:])[:, :, :, None],
                _heads_major(v_all[:, t:])[:, :, :, None], _ALONE,
            )
            return jnp.concatenate([main, branches], axis=1), None

        ids = jnp.concatenate([input_ids, branch_ids.reshape(b, t * k)], axis=1)
        back = None
        if self.cfg.token_shift:
            back, stream = self._shift_back(input_ids, mask, self._no_recent(b), with_stream=True)
            # the branch after t is real token count[t]; n back it is stream entry count[t] (n −1s lead)
            back = jnp.concatenate([back, jnp.repeat(jnp.take_along_axis(stream, count, axis=1), k, axis=1)], axis=1)
        x, _ = self._run(ids, jnp.concatenate([positions, branch_pos], axis=1), attend, None, back)
        return x[:, :t], x[:, t:].reshape(b, t, k, -1)

    def commit_candidate(
        self, cache: KVCache, candidate_kv: Any, choice: jax.Array, active: jax.Array | None = None
    ) -> KVCache:
        """Append candidate ``choice [B]`` of a :meth:`candidates_hidden` pass to the cache.

        Exactly what :meth:`extend` with that token would store, without running the model again.
        ``candidate_kv`` is the ``(k, v, candidate_ids)`` that :meth:`candidates_hidden` returned.
        ``active [B]`` False writes the slot as padding (a finished sequence).
        """
        batch = choice.shape[0]
        active = jnp.ones((batch,), bool) if active is None else active
        idx = cache.index % cache.max_len if cache.ring else cache.index
        pick = lambda x: jnp.take_along_axis(x, choice[:, None, None, None], axis=2)  # noqa: E731
        k = tuple(jax.lax.dynamic_update_slice(c, pick(n), (0, 0, idx, 0)) for c, n in zip(cache.k, candidate_kv[0]))
        v = tuple(jax.lax.dynamic_update_slice(c, pick(n), (0, 0, idx, 0)) for c, n in zip(cache.v, candidate_kv[1]))
        recent = cache.recent
        if self.cfg.token_shift:
            token = jnp.take_along_axis(candidate_kv[2], choice[:, None], axis=1)
            recent = jnp.where(active[:, None], jnp.concatenate([recent[:, 1:], token.astype(jnp.int32)], axis=1), recent)
        start, kv_mask = written(cache, jax.lax.dynamic_update_slice(cache.kv_mask, active[:, None], (0, idx)), active)
        return cache.replace(
            k=k, v=v, kv_mask=kv_mask, start=start,
            kv_positions=jax.lax.dynamic_update_slice(cache.kv_positions, cache.positions[:, None], (0, idx)),
            positions=cache.positions + active.astype(jnp.int32),
            index=cache.index + 1, recent=recent,
        )

    def logits(self, hidden: jax.Array) -> jax.Array:
        """``[..., E]`` final-normed hidden states -> float32 logits ``[..., V]``."""
        weight = self.embed[...] if self.cfg.tie_embeddings else self.lm_head[...]
        return linear(hidden, weight, jnp.float32)

    # ---------------------------------------------------------------- internals

    def _check_ids(self, input_ids: jax.Array, attention_mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        input_ids = jnp.asarray(input_ids)
        chex.assert_rank(input_ids, 2, custom_message=f"input_ids must be [batch, time], got shape {input_ids.shape}")
        chex.assert_type(input_ids, int, custom_message="input_ids must be integer token ids")
        if attention_mask is None:
            return input_ids, jnp.ones(input_ids.shape, bool)
        attention_mask = jnp.asarray(attention_mask)
        chex.assert_shape(
            attention_mask, input_ids.shape, custom_message="attention_mask must have the shape of input_ids"
        )
        return input_ids, attention_mask.astype(bool)

    def _check_cache(self, cache: KVCache, batch: int) -> None:
        c = self.cfg
        expected = (batch, c.num_kv_heads, cache.max_len, c.head_dim)
        got = (len(cache.k), cache.k[0].shape)
        if got != (c.num_layers, expected):
            raise ValueError(f"cache has {got[0]} layers of {got[1]}; this model and batch need {c.num_layers} of {expected}")

    def _window(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
        """bool ``[B, T, S]``: key within the sliding window of the query (all True without one)."""
        if self.cfg.sliding_window is None:
            return jnp.ones((), bool)
        return (q_positions[:, :, None] - k_positions[:, None, :]) < self.cfg.sliding_window

    @staticmethod
    def _filled(cache: KVCache) -> tuple[jax.Array, ...]:
        """:func:`_over_filled`'s ``(end, need)`` for the slots a cache holds."""
        if not cache.ring:
            return (cache.index,)
        return cache.index % cache.max_len, cache.index - jnp.min(cache.start)

    def _cached_keys(self, cache: KVCache, positions: jax.Array) -> jax.Array:
        """bool ``[B, T or 1, S]``: the cache slots that queries at ``positions [B, T]`` attend to."""
        past = cache.kv_mask  # a ring's unwritten and stale slots are masked out
        if not cache.ring:
            past = past & (jnp.arange(cache.max_len)[None, :] < cache.index)
        return past[:, None, :] & self._window(positions, cache.kv_positions)

    def _no_recent(self, batch: int) -> jax.Array:
        return jnp.full((batch, self.cfg.token_shift), -1, jnp.int32)

    def _shift_back(self, input_ids: jax.Array, mask: jax.Array, recent: jax.Array, *, with_stream: bool = False):
        """The token-shift inputs of new tokens after ``recent``.

        Args:
          input_ids, mask: ``[B, T]``; recent: int32 ``[B, n]``, the last n real tokens before them
            (−1: none), n = ``token_shift``.

        Returns:
          ``(back, recent)``: back int32 ``[B, T]``, the real token n back from each real new token
          (−1: none, or padding), or None without a token shift; recent ``[B, n]`` after them. With
          ``with_stream``, the second is instead the stream ``[B, n + T]``: ``recent`` then the real
          new tokens in order (padding sorted to the end), so real token j's n-back is entry j.
        """
        n = self.cfg.token_shift
        if not n:
            return None, recent
        b = input_ids.shape[0]
        combined = jnp.concatenate([recent, jnp.where(mask, input_ids, -1).astype(jnp.int32)], axis=1)
        real = jnp.concatenate([jnp.ones((b, n), bool), mask], axis=1)
        stream = jnp.take_along_axis(combined, jnp.argsort(~real, axis=1, stable=True), axis=1)
        count = jnp.cumsum(mask, axis=1)
        back = jnp.where(mask, jnp.take_along_axis(stream, jnp.maximum(count - 1, 0), axis=1), -1)
        if with_stream:
            return back, stream
        last = count[:, -1:] + jnp.arange(n)[None]  # the stream's last n entries
        return back, jnp.take_along_axis(stream, last, axis=1)

    def _run(self, input_ids: jax.Array, positions: jax.Array, attend: AttendFn, cache_kv: Any,
             back_ids: jax.Array | None = None) -> tuple[jax.Array, Any]:
        """Embed (plus the token-shift embedding of ``back_ids``), run the blocks, final norm.
        ``attend(q, k, v, layer_cache)`` does the attention.

        Each block has its own parameter arrays and each layer its own cache buffer: on CPU, XLA
        copies a slice of a stacked ``[layers, ...]`` array before every matmul (3x slower decode
        measured), and a scanned stacked cache is copied at every step.
        """
        cfg = self.cfg
        x = jnp.take(self.embed[...], input_ids, axis=0)
        if back_ids is not None:  # the token-shift embedding; -1: no token that far back
            shifted = jnp.take(self.shift_embed[...], jnp.maximum(back_ids, 0), axis=0)
            x = x + jnp.where((back_ids >= 0)[..., None], shifted, 0).astype(x.dtype)
        if cfg.positions == "learned":
            x = x + jnp.take(self.pos_embed[...], positions, axis=0)
        inv_freq = rope_inv_freq(cfg) if cfg.positions == "rope" else None

        def layer(x: jax.Array, p: dict, layer_cache: Any) -> tuple[jax.Array, Any]:
            h = _norm(cfg, x, p["attn_norm_scale"], p.get("attn_norm_bias"))
            q = linear(h, p["q"]).reshape(*h.shape[:2], *p["q"].shape[:2])
            k = linear(h, p["k"]).reshape(*h.shape[:2], *p["k"].shape[:2])
            v = linear(h, p["v"]).reshape(*h.shape[:2], *p["v"].shape[:2])
            if cfg.qkv_bias:
                q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
            if inv_freq is not None:
                q, k = _rope(q, positions, inv_freq), _rope(k, positions, inv_freq)
            out, written = attend(q, k, v, layer_cache)
            x = x + linear(out.reshape(*out.shape[:2], -1), p["o"])
            if cfg.out_bias:
                x = x + p["o_bias"]
            h = _norm(cfg, x, p["mlp_norm_scale"], p.get("mlp_norm_bias"))
            up = linear(h, p["up"]) + p["up_bias"] if cfg.mlp_bias else linear(h, p["up"])
            if cfg.mlp == "gated":
                gate = linear(h, p["gate"]) + p["gate_bias"] if cfg.mlp_bias else linear(h, p["gate"])
                act = ACTIVATIONS[cfg.activation](gate) * up
            else:
                act = ACTIVATIONS[cfg.activation](up)
            return x + (linear(act, p["down"]) + p["down_bias"] if cfg.mlp_bias else linear(act, p["down"])), written

        if cfg.remat and cache_kv is None:
            # a gradient keeps only each block's input and recomputes the rest (attention scores
            # [B, H, T, T] above all) when it gets there: activations of one block, not of all
            layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable)
        new_k, new_v = [], []
        for index, block in enumerate(self.layers):
            x, written = layer(x, block.arrays(), None if cache_kv is None else tuple(c[index] for c in cache_kv))
            if written is not None:
                new_k.append(written[0])
                new_v.append(written[1])
        x = _norm(cfg, x, self.final_norm_scale[...], self.final_norm_bias[...] if cfg.norm == "layernorm" else None)
        return x, ((tuple(new_k), tuple(new_v)) if new_k else None)
