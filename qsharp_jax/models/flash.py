"""Fused (flash) attention for whole-sequence forwards, the kernel chosen per platform.

``TransformerConfig.attention_kernel`` picks it:

* ``auto``: on TPU the Pallas flash kernel (``jax.experimental.pallas.ops.tpu.flash_attention``);
  on GPU the Pallas (Triton) flash kernel (``jax.experimental.pallas.ops.gpu.attention``), and for
  masks it cannot express cuDNN's flash attention (``jax.nn.dot_product_attention(
  implementation="cudnn")``) where cuDNN can run it (bfloat16/float16, a head dimension that is a
  multiple of 8 up to 128, 256 from Hopper on); on CPU (and anything else) XLA, i.e.
  :func:`~qsharp_jax.models.transformer.attention`.
* ``xla``: that everywhere; ``pallas`` / ``cudnn``: that kernel, refused where it cannot run.

Only whole-sequence forwards use a kernel (value-model fitting and scoring, where attention is
``[B, H, T, T]``). Decoding steps read their KV cache with XLA over the filled blocks: a step's
query is one token, and what bounds it is reading the cache. The Pallas kernels express a mask as
segment ids with causality (left or right padding, packed rows); masks beyond that (shared-prompt
branches, a sliding window shorter than the sequence) go to cuDNN or XLA. cuDNN takes any mask.
A Pallas call is split over the mesh in context (``jax.set_mesh``) by hand; on several devices
without one in context (inputs that may be sharded) ``auto`` does not pick it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from qsharp_jax import sharding

KERNELS = ("auto", "xla", "pallas", "cudnn")
_HALF = (jnp.bfloat16, jnp.float16)
_BLOCK = 128  # the kernels' tile along the sequence: sequences are padded to a multiple


def choose(setting: str, dtype, head_dim: int, *, segments_suffice: bool, platform: str | None = None) -> str:
    """The kernel a forward runs: ``xla``, ``cudnn``, ``pallas_tpu`` or ``pallas_gpu``.

    Args:
      setting: one of :data:`KERNELS`; dtype, head_dim: the model's; segments_suffice: the mask
        is segment ids plus causality (else a Pallas kernel cannot express it);
      platform: ``jax.default_backend()`` unless given.
    """
    platform = _platform() if platform is None else platform
    half = jnp.dtype(dtype) in map(jnp.dtype, _HALF)
    if setting == "xla":
        return "xla"
    if setting == "cudnn":
        if platform != "gpu" or not half:
            raise ValueError(f"attention_kernel='cudnn' needs a GPU and a bfloat16/float16 model; this is {platform} "
                             f"with {jnp.dtype(dtype).name}: use attention_kernel='auto'")
        return "cudnn"
    if setting == "pallas":
        if platform not in ("tpu", "gpu"):
            raise ValueError(f"attention_kernel='pallas' runs on TPU or GPU; this is {platform}: use "
                             "attention_kernel='auto' (XLA here)")
        return f"pallas_{platform}" if segments_suffice else "xla"
    if setting != "auto":
        raise ValueError(f"attention_kernel must be one of {KERNELS}, got {setting!r}")
    # a Pallas call is split over a mesh by hand (shard_map), which needs the mesh: without one in
    # context on several devices the inputs may be sharded, and XLA would gather them to every device
    unknown_mesh = jax.device_count() > 1 and jax.sharding.get_abstract_mesh().empty
    if platform in ("tpu", "gpu") and segments_suffice and not unknown_mesh:
        return f"pallas_{platform}"
    if platform == "gpu" and half and _cudnn_runs(head_dim):  # cuDNN splits itself over a mesh
        return "cudnn"
    return "xla"


def _cudnn_runs(head_dim: int) -> bool:
    """cuDNN's flash attention takes this head dimension on this GPU (Ampere or newer)."""
    capability = getattr(jax.devices()[0], "compute_capability", None)
    capability = 9.0 if capability is None else float(capability)  # unknown: assume a recent GPU
    return capability >= 8.0 and head_dim % 8 == 0 and head_dim <= (256 if capability >= 9.0 else 128)


def _platform() -> str:
    return jax.default_backend()


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, segments: jax.Array | None,
                    kernel: str) -> jax.Array:
    """Self-attention of a whole sequence with a fused kernel.

    Args:
      q: ``[B, T, H, D]``; k, v: ``[B, T, K, D]`` (H a multiple of K).
      allowed: bool ``[B, T, T]``, the mask, every token allowed itself (cuDNN reads it).
      segments: int32 ``[B, T]``, a token attends to the earlier tokens (itself included) of its
        own id, which is ``allowed`` (the Pallas kernels read it; None only for cuDNN).
      kernel: from :func:`choose`, not ``xla``.

    Returns:
      ``[B, T, H, D]`` in ``v``'s dtype. Rows of padding (their own segment) are finite and meaningless.
    """
    b, t, h, d = q.shape
    pad = -t % _BLOCK
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    if kernel == "cudnn":  # (training with a mask needs an even length: the padding sees itself only)
        allowed = jnp.pad(allowed, ((0, 0), (0, pad), (0, pad))) | jnp.eye(t + pad, dtype=bool)
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
        return dot_product(q, k, v, allowed, "cudnn")[:, :t]
    if kernel not in ("pallas_tpu", "pallas_gpu"):
        raise ValueError(f"no fused kernel {kernel!r}")
    # the kernels take as many key-value heads as query heads
    q, k, v = (jnp.pad(jnp.repeat(x, h // x.shape[2], axis=2), widths) for x in (q, k, v))
    segments = jnp.pad(segments.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=-1)  # padding: its own
    return _per_device(functools.partial(_pallas, kernel=kernel), q, k, v, segments)[:, :t].astype(v.dtype)


def _pallas(q, k, v, segments, *, kernel: str):
    """The Pallas kernel on ``[B, T, H, D]`` inputs (T a multiple of the block)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if kernel == "pallas_tpu":  # (tests run it on a CPU inside pltpu.force_tpu_interpret_mode())
        from jax.experimental.pallas.ops.tpu import flash_attention as tpu

        heads_major = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731 -- [B, H, T, D]
        return heads_major(tpu.flash_attention(heads_major(q), heads_major(k), heads_major(v),
                                               segment_ids=tpu.SegmentIds(segments, segments), causal=True,
                                               sm_scale=scale))
    from jax.experimental.pallas.ops.gpu import attention as gpu

    # off a GPU (tests) the kernel runs in Pallas' interpreter
    return gpu.mha(q, k, v, segments, sm_scale=scale, causal=True, interpret=jax.default_backend() == "cpu")


def _per_device(fn, q, k, v, segments):
    """``fn`` on each device's rows and heads of the mesh in context (``jax.set_mesh``; rows over
    ``data`` × ``fsdp``, heads over ``tensor`` where they divide): XLA cannot split a Pallas call."""
    mesh = sharding.context_mesh()
    if mesh is None:
        return fn(q, k, v, segments)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    rows = tuple(a for a in ("data", "fsdp") if a in sizes)
    rows = rows if q.shape[0] % math.prod(sizes[a] for a in rows) == 0 else None
    heads = "tensor" if "tensor" in sizes and q.shape[2] % sizes["tensor"] == 0 else None
    spec = jax.sharding.PartitionSpec(rows, None, heads, None)
    return jax.shard_map(fn, in_specs=(spec, spec, spec, jax.sharding.PartitionSpec(rows, None)), out_specs=spec,
                         check_vma=False)(q, k, v, segments)


def dot_product(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, implementation: str) -> jax.Array:
    """``jax.nn.dot_product_attention`` with our mask: the cuDNN path, and with ``xla`` its check on
    a CPU (the same call, the implementation aside)."""
    return jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], implementation=implementation)
