"""Architectures of the checkpoints in the paper's math experiments, as their ``config.json`` has
them (the fields our loader reads), so a recipe can be planned and dry-run without the weights.

A :class:`~qsharp_jax.models.build.ModelSpec` names one with ``preset``; when its ``hf_path`` is
there too, the checkpoint's own config must agree (a recipe pointing at the wrong weights fails at
start-up).
"""

from __future__ import annotations

from typing import Any

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

PRESETS: dict[str, dict[str, Any]] = {
    "llama-3-8b": {  # Meta-Llama-3-8B(-Instruct)
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False,
    },
    "llama-3.1-8b": {  # Llama-3.1-8B(-Instruct)
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0},
    },
    "llama-3.2-1b": {  # Llama-3.2-1B(-Instruct)
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "tie_word_embeddings": True, "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0},
    },
    "qwen2.5-7b": {  # Qwen2.5-7B(-Instruct)
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": False,
    },
    "qwen2.5-1.5b": {  # Qwen2.5-1.5B(-Instruct)
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": True,
    },
}


def preset_config(name: str) -> dict[str, Any]:
    """The ``config.json`` fields of preset ``name``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def check_matches(name: str, hf: dict[str, Any], path: str) -> None:
    """Refuse a checkpoint whose config is not preset ``name``'s (the fields the preset names)."""
    differ = [f"{k} (preset {v!r}, checkpoint {hf.get(k)!r})" for k, v in preset_config(name).items()
              if k != "rope_scaling" and hf.get(k) != v]
    if differ:
        raise ValueError(f"{path}/config.json is not a {name} checkpoint: {'; '.join(differ)}; fix hf_path or preset")
