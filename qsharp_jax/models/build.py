"""Models from configs: a local Hugging Face directory, or a fresh Llama-style model."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from qsharp_jax.models import flash, gpt2
from qsharp_jax.models.hf import config_from_hf, from_hf, read_config
from qsharp_jax.models.presets import check_matches, preset_config
from qsharp_jax.models.transformer import Transformer, TransformerConfig, identity_qk
from qsharp_jax.models.value import HeadConfig, ValueModel, value_from_hf, value_from_scratch


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model to build: a local Hugging Face checkpoint, or a fresh decoder of given sizes.

    Fields:
      hf_path: a local Hugging Face directory to load (then the sizes below are ignored).
      preset: a known architecture (:data:`~qsharp_jax.models.presets.PRESETS`: ``llama-3-8b``,
        ``llama-3.1-8b``, ``llama-3.2-1b``, ``qwen2.5-7b``, ``qwen2.5-1.5b``): what ``qsharp plan``
        and dry runs build without weights; checked against ``hf_path``'s config when loading.
      architecture: of a fresh model: ``llama`` (RMSNorm, SwiGLU, RoPE) or ``gpt2`` (LayerNorm,
        GELU MLP, learned positions, biases, tied embeddings).
      vocab_size, hidden_size, num_layers, num_heads, mlp_dim, max_positions: its sizes (head
        dimension = hidden_size / num_heads).
      seed: of the random initialization (and of a value model's fresh head).
      dtype: of the parameters (``bfloat16`` halves their memory; logits are float32 either way).
      qk_identity: a fresh model's query and key projections start as this multiple of the
        identity, so attention starts as token matching
        (:func:`~qsharp_jax.models.transformer.identity_qk`); 0: the usual random init. For models
        that must learn look-ups from a random start (e.g. a star-graph value model).
      token_shift: a fresh model's inputs also embed the token this many positions back
        (:class:`~qsharp_jax.models.transformer.TransformerConfig`; fitting, scoring and the
        KV-cache engine alike); 0: none.
      remat: recompute each block in the backward pass of a fit instead of keeping its activations
        (:class:`~qsharp_jax.models.transformer.TransformerConfig`): a train step then holds one
        block's activations at a time, for about a third more compute; what lets a 1B value model
        fit 1,536-token rows on an 80 GiB device (``qsharp plan`` shows the figures). Any model,
        ``hf_path`` included; decoding is unaffected.
      attention_kernel: the attention kernel of fitting and scoring forwards: ``auto`` (chosen per
        platform: Pallas flash on TPU and GPU, cuDNN for masks Pallas cannot express, XLA on
        CPU), ``xla``, ``pallas`` or ``cudnn`` (:mod:`qsharp_jax.models.flash`). Any model,
        ``hf_path`` included; a kernel the machine lacks is refused when the model is built.
    """

    hf_path: str | None = None
    preset: str = ""
    architecture: Literal["llama", "gpt2"] = "llama"
    vocab_size: int = 8
    hidden_size: int = 16
    num_layers: int = 1
    num_heads: int = 2
    mlp_dim: int = 32
    max_positions: int = 64
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"
    qk_identity: float = 0.0
    token_shift: int = 0
    remat: bool = False
    attention_kernel: Literal["auto", "xla", "pallas", "cudnn"] = "auto"

    def __post_init__(self):
        if self.attention_kernel not in flash.KERNELS:
            raise ValueError(f"attention_kernel must be one of {flash.KERNELS}, got {self.attention_kernel!r}")
        if self.preset:
            preset_config(self.preset)  # an unknown name fails with the known ones
        for name in ("qk_identity", "token_shift"):
            if getattr(self, name) and self.hf_path:
                raise ValueError(f"{name}={getattr(self, name)} shapes a fresh model; {self.hf_path} brings its own "
                                 f"architecture and weights: set {name}=0 or drop hf_path")
        if self.qk_identity < 0:
            raise ValueError(f"qk_identity must be >= 0 (0: random init), got {self.qk_identity}")

    def transformer_config(self) -> TransformerConfig:
        """The architecture: ``hf_path``'s config.json when the directory is there, else the
        preset's, else a fresh decoder of the sizes given (with ``remat`` and ``attention_kernel``)."""
        return dataclasses.replace(self._architecture(), remat=self.remat, attention_kernel=self.attention_kernel)

    def _architecture(self) -> TransformerConfig:
        if self.hf_path and Path(self.hf_path).is_dir():
            hf = read_config(self.hf_path)
            if self.preset:
                check_matches(self.preset, hf, self.hf_path)
            return config_from_hf(hf)
        if self.preset:
            return config_from_hf(preset_config(self.preset))
        if self.architecture == "gpt2":
            return dataclasses.replace(gpt2.config_from_hf({
                "vocab_size": self.vocab_size, "n_embd": self.hidden_size, "n_layer": self.num_layers,
                "n_head": self.num_heads, "n_inner": self.mlp_dim, "n_positions": self.max_positions,
            }), token_shift=self.token_shift)
        if self.architecture != "llama":
            raise ValueError(f"architecture must be 'llama' or 'gpt2', got {self.architecture!r}")
        return TransformerConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
            num_heads=self.num_heads, num_kv_heads=self.num_heads, head_dim=self.hidden_size // self.num_heads,
            mlp_dim=self.mlp_dim, max_positions=self.max_positions, token_shift=self.token_shift,
        )


def check_dtype_runs(dtype, devices=None) -> None:
    """Refuse ``bfloat16`` on devices without it (GPUs before compute capability 8.0, e.g. V100
    or T4: XLA would emulate or fail), naming the device and the fix. ``devices``: default JAX's."""
    if jnp.dtype(dtype) != jnp.bfloat16:
        return
    for device in jax.devices() if devices is None else devices:
        capability = getattr(device, "compute_capability", None)
        if device.platform == "gpu" and capability is not None and float(capability) < 8.0:
            raise ValueError(f"dtype bfloat16 needs a GPU of compute capability 8.0 or newer (Ampere, Hopper); "
                             f"{getattr(device, 'device_kind', device)} has {capability}: use dtype: float32 for "
                             "reference and value")


def build_reference(spec: ModelSpec, dtype=None) -> Transformer:
    dtype = jnp.dtype(spec.dtype) if dtype is None else dtype
    check_dtype_runs(dtype)
    _check_kernel(spec, dtype)
    if spec.hf_path:
        if spec.preset:
            check_matches(spec.preset, read_config(spec.hf_path), spec.hf_path)
        return with_options(from_hf(spec.hf_path, dtype=dtype), spec)
    model = Transformer(spec.transformer_config(), dtype=dtype, rngs=nnx.Rngs(spec.seed))
    return identity_qk(model, spec.qk_identity) if spec.qk_identity else model


def build_value(spec: ModelSpec, head: HeadConfig, dtype=None) -> ValueModel:
    dtype = jnp.dtype(spec.dtype) if dtype is None else dtype
    check_dtype_runs(dtype)
    _check_kernel(spec, dtype)
    if spec.hf_path:
        if spec.preset:
            check_matches(spec.preset, read_config(spec.hf_path), spec.hf_path)
        value = value_from_hf(spec.hf_path, head, seed=spec.seed, dtype=dtype)
        with_options(value.backbone, spec)
        return value
    value = value_from_scratch(spec.transformer_config(), head, seed=spec.seed, dtype=dtype)
    if spec.qk_identity:
        identity_qk(value.backbone, spec.qk_identity)
    return value


def _check_kernel(spec: ModelSpec, dtype) -> None:
    """Refuse an attention kernel this machine lacks now, not at the first fit."""
    flash.choose(spec.attention_kernel, dtype, spec.transformer_config().head_dim, segments_suffice=True)


def with_options(model: Transformer, spec: ModelSpec) -> Transformer:
    """``model`` (changed in place) with ``spec``'s ``remat`` and ``attention_kernel``: how it runs,
    which its Hugging Face config does not say."""
    model.cfg = dataclasses.replace(model.cfg, remat=spec.remat, attention_kernel=spec.attention_kernel)
    return model


def clone(module: nnx.Module) -> nnx.Module:
    """An independent copy of an NNX module (its own parameter buffers: training the copy, whose
    state is donated to the train step, leaves the original untouched)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
