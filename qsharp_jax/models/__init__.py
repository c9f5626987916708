"""Flax NNX transformers (GPT-2, Llama/Qwen2/Mistral), value models, Hugging Face loading."""

from qsharp_jax.models.cache import KVCache
from qsharp_jax.models.hf import SUPPORTED_MODEL_TYPES, from_hf, load_tokenizer
from qsharp_jax.models.transformer import Transformer, TransformerConfig

__all__ = ["KVCache", "SUPPORTED_MODEL_TYPES", "Transformer", "TransformerConfig", "from_hf", "load_tokenizer"]
