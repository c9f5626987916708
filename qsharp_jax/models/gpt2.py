"""GPT-2: Hugging Face config -> TransformerConfig, and the parameter-name table."""

from __future__ import annotations

from typing import Any

import numpy as np

from qsharp_jax.models.transformer import TransformerConfig

MODEL_TYPES = ("gpt2",)
PREFIX = "transformer."  # GPT2LMHeadModel's base-model prefix; bare GPT2Model checkpoints lack it
IGNORED = (r"^h\.\d+\.attn\.(masked_)?bias$",)  # causal-mask buffers in older checkpoints


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise ValueError("GPT-2 variants with scale_attn_by_inverse_layer_idx or unscaled attention are not supported")
    e, heads = hf["n_embd"], hf["n_head"]
    return TransformerConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=e,
        num_layers=hf["n_layer"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=e // heads,
        mlp_dim=hf.get("n_inner") or 4 * e,
        max_positions=hf["n_positions"],
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp="gelu",
        activation=hf.get("activation_function", "gelu_new"),
        positions="learned",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        model_type="gpt2",
    )


def _qkv(part: int, bias: bool):
    def take(w: np.ndarray, c: TransformerConfig) -> np.ndarray:
        e = c.hidden_size
        cols = w[..., part * e : (part + 1) * e]  # Conv1D stores [in, out]; c_attn out = [q | k | v]
        return cols.reshape(c.num_heads, c.head_dim) if bias else cols.T.reshape(c.num_heads, c.head_dim, e)

    return take


def _same(w: np.ndarray, c: TransformerConfig) -> np.ndarray:
    return w


def _t(w: np.ndarray, c: TransformerConfig) -> np.ndarray:
    """Conv1D [in, out] -> our [out, in]."""
    return w.T


# our parameter -> (Hugging Face name, {i} = layer, transform to our layout)
PARAMS = {
    "embed": ("wte.weight", _same),
    "pos_embed": ("wpe.weight", _same),
    "layers.attn_norm_scale": ("h.{i}.ln_1.weight", _same),
    "layers.attn_norm_bias": ("h.{i}.ln_1.bias", _same),
    "layers.q": ("h.{i}.attn.c_attn.weight", _qkv(0, False)),
    "layers.k": ("h.{i}.attn.c_attn.weight", _qkv(1, False)),
    "layers.v": ("h.{i}.attn.c_attn.weight", _qkv(2, False)),
    "layers.q_bias": ("h.{i}.attn.c_attn.bias", _qkv(0, True)),
    "layers.k_bias": ("h.{i}.attn.c_attn.bias", _qkv(1, True)),
    "layers.v_bias": ("h.{i}.attn.c_attn.bias", _qkv(2, True)),
    "layers.o": ("h.{i}.attn.c_proj.weight", lambda w, c: w.T.reshape(c.hidden_size, c.num_heads, c.head_dim)),
    "layers.o_bias": ("h.{i}.attn.c_proj.bias", _same),
    "layers.mlp_norm_scale": ("h.{i}.ln_2.weight", _same),
    "layers.mlp_norm_bias": ("h.{i}.ln_2.bias", _same),
    "layers.up": ("h.{i}.mlp.c_fc.weight", _t),
    "layers.up_bias": ("h.{i}.mlp.c_fc.bias", _same),
    "layers.down": ("h.{i}.mlp.c_proj.weight", _t),
    "layers.down_bias": ("h.{i}.mlp.c_proj.bias", _same),
    "final_norm_scale": ("ln_f.weight", _same),
    "final_norm_bias": ("ln_f.bias", _same),
    "lm_head": ("lm_head.weight", _same),
}
