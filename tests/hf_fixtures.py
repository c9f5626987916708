"""Tiny random Hugging Face checkpoints written with transformers + torch (CPU) into a temp dir."""

from __future__ import annotations

import numpy as np
import torch
import transformers

TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)

CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    ),
    # GQA (4 query heads, 2 kv heads) and Llama-3.1 rope scaling that bites at these lengths
    "llama": lambda: transformers.LlamaConfig(
        **TINY, num_key_value_heads=2, max_position_embeddings=256, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8},
    ),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**TINY, num_key_value_heads=1, sliding_window=5),
}


def make_checkpoint(kind, path, *, seed: int = 0, max_shard_size: str | None = None, dtype=torch.float32):
    """Save a random model of ``kind`` (a name of CONFIGS, or a transformers config) to ``path``;
    returns the torch model (float32, eval mode).

    Weights are redrawn with std 0.2 (norm scales around 1) so that a wrong mapping changes the
    logits by far more than the test tolerance.
    """
    torch.manual_seed(seed)
    config = CONFIGS[kind]() if isinstance(kind, str) else kind
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if ("norm" in name or ".ln_" in name) and name.endswith("weight") else 0.0
            p.copy_(base + 0.2 * torch.randn_like(p))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.to(dtype).save_pretrained(path, **kwargs)
    return model.to(torch.float32)


def torch_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Logits of the torch model; positions count real tokens only (left padding)."""
    ids_t = torch.tensor(ids)
    mask_t = torch.ones_like(ids_t) if mask is None else torch.tensor(mask.astype(np.int64))
    positions = (mask_t.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids_t, attention_mask=mask_t, position_ids=positions).logits.numpy()
