"""Llama 3/3.1, Qwen2/2.5 and Mistral: Hugging Face config -> TransformerConfig, and the name table.

Our weights use PyTorch's ``[out, in]`` layout, so these tensors load without transposes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qsharp_jax.models.transformer import TransformerConfig

MODEL_TYPES = ("llama", "qwen2", "mistral")
PREFIX = "model."
IGNORED = (r"^layers\.\d+\.self_attn\.rotary_emb\.inv_freq$",)  # a buffer in older checkpoints


def _rope(hf: dict[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """(theta, scaling) from transformers-5 ``rope_parameters`` or the older ``rope_theta``/``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    params.update(hf.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    return float(theta), (None if kind == "default" else tuple(sorted(params.items())))


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    model_type = hf["model_type"]
    heads = hf["num_attention_heads"]
    theta, scaling = _rope(hf)
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError("Qwen2 with use_sliding_window=true (per-layer windows) is not supported")
    bias = hf.get("attention_bias", False)
    return TransformerConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"],
        max_positions=hf.get("max_position_embeddings", 2048),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="gated",
        activation=hf.get("hidden_act", "silu"),
        positions="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=True if model_type == "qwen2" else bias,
        out_bias=False if model_type == "qwen2" else bias,
        mlp_bias=hf.get("mlp_bias", False),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
        model_type=model_type,
    )


def _same(w: np.ndarray, c: TransformerConfig) -> np.ndarray:
    return w


def _in_heads(kv: bool):
    """torch Linear [heads*D, E] -> [heads, D, E]."""
    def f(w: np.ndarray, c: TransformerConfig) -> np.ndarray:
        return w.reshape(c.num_kv_heads if kv else c.num_heads, c.head_dim, c.hidden_size)

    return f


def _bias_heads(kv: bool):
    def f(b: np.ndarray, c: TransformerConfig) -> np.ndarray:
        return b.reshape(c.num_kv_heads if kv else c.num_heads, c.head_dim)

    return f


PARAMS = {
    "embed": ("embed_tokens.weight", _same),
    "layers.attn_norm_scale": ("layers.{i}.input_layernorm.weight", _same),
    "layers.q": ("layers.{i}.self_attn.q_proj.weight", _in_heads(False)),
    "layers.k": ("layers.{i}.self_attn.k_proj.weight", _in_heads(True)),
    "layers.v": ("layers.{i}.self_attn.v_proj.weight", _in_heads(True)),
    "layers.q_bias": ("layers.{i}.self_attn.q_proj.bias", _bias_heads(False)),
    "layers.k_bias": ("layers.{i}.self_attn.k_proj.bias", _bias_heads(True)),
    "layers.v_bias": ("layers.{i}.self_attn.v_proj.bias", _bias_heads(True)),
    "layers.o": ("layers.{i}.self_attn.o_proj.weight", lambda w, c: w.reshape(c.hidden_size, c.num_heads, c.head_dim)),
    "layers.o_bias": ("layers.{i}.self_attn.o_proj.bias", _same),
    "layers.mlp_norm_scale": ("layers.{i}.post_attention_layernorm.weight", _same),
    "layers.gate": ("layers.{i}.mlp.gate_proj.weight", _same),
    "layers.up": ("layers.{i}.mlp.up_proj.weight", _same),
    "layers.down": ("layers.{i}.mlp.down_proj.weight", _same),
    "layers.gate_bias": ("layers.{i}.mlp.gate_proj.bias", _same),
    "layers.up_bias": ("layers.{i}.mlp.up_proj.bias", _same),
    "layers.down_bias": ("layers.{i}.mlp.down_proj.bias", _same),
    "final_norm_scale": ("norm.weight", _same),
    "lm_head": ("lm_head.weight", _same),
}
