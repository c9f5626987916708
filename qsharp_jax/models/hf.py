"""Load Hugging Face checkpoints from a local directory into our Flax NNX models (no torch).

``from_hf(path)`` reads ``config.json`` and ``*.safetensors`` (one file or sharded with
``model.safetensors.index.json``), maps names with the family's table, and places every parameter
straight onto its devices: the model is first built abstractly (``nnx.eval_shape``), shardings come
from the logical axis names, and each array is assembled shard by shard with
``jax.make_array_from_callback``, so no device ever holds an unsharded copy. Tensors are read by
memory-mapping the safetensors files (bf16 included, via ml_dtypes), one parameter at a time.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from qsharp_jax import sharding as sharding_lib
from qsharp_jax.models import gpt2, llama
from qsharp_jax.models.transformer import Transformer, TransformerConfig

FAMILIES: tuple[ModuleType, ...] = (gpt2, llama)
SUPPORTED_MODEL_TYPES = tuple(t for f in FAMILIES for t in f.MODEL_TYPES)

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; from_hf needs a local Hugging Face model directory")
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face model directory?")
    return json.loads(config_file.read_text())


def family_of(hf: dict[str, Any]) -> ModuleType:
    model_type = hf.get("model_type")
    for family in FAMILIES:
        if model_type in family.MODEL_TYPES:
            return family
    raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    return family_of(hf).config_from_hf(hf)


class SafetensorsDir:
    """Tensors of a checkpoint directory by name, memory-mapped (nothing is read until sliced)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        index = path / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path} has no *.safetensors weights (PyTorch .bin checkpoints are not read)")
        self._entries: dict[str, tuple[Path, dict[str, Any], int]] = {}
        for name in files:
            file = path / name
            if not file.exists():
                raise FileNotFoundError(f"{file} is listed in model.safetensors.index.json but missing")
            with open(file, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
            header.pop("__metadata__", None)
            for tensor, info in header.items():
                self._entries[tensor] = (file, info, 8 + header_len)

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> np.ndarray:
        file, info, base = self._entries[name]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        flat = np.memmap(file, dtype=dtype, mode="r", offset=base + start, shape=((end - start) // dtype.itemsize,))
        return flat.reshape(info["shape"])


def _place(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """Put ``host`` on devices shard by shard."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: np.ascontiguousarray(host[index]))


def load_state(
    abstract_state: nnx.State,
    family: ModuleType,
    cfg: TransformerConfig,
    tensors: SafetensorsDir,
    shardings: Any,
    *,
    dtype,
    ignore: Sequence[str] = (),
    prefix: str = "",
) -> nnx.State:
    """Fill an abstract model state from checkpoint tensors; list every problem in one error.

    Args:
      prefix: only parameters under this path (e.g. ``"backbone."``) are loaded; others keep
        their abstract value for the caller to fill.
      ignore: regexes of checkpoint names that may stay unused (e.g. an LM head when loading a
        value-model backbone).
    """
    strip = family.PREFIX
    available = {n[len(strip):] if n.startswith(strip) else n: n for n in tensors.names()}
    used: set[str] = set()
    missing, misshaped, unknown = [], [], []
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731

    def load(path, var, shard):
        name = ".".join(str(getattr(k, "key", k)) for k in path)
        if not name.startswith(prefix):
            return var
        ours = name[len(prefix):]
        layer = re.fullmatch(r"layers\.(\d+)\.(\w+)", ours)
        key = f"layers.{layer.group(2)}" if layer else ours
        if key not in family.PARAMS:
            unknown.append(ours)
            return var
        template, transform = family.PARAMS[key]
        hf_name = template.format(i=layer.group(1)) if layer else template
        if hf_name not in available:
            missing.append(hf_name)
            return var
        used.add(hf_name)
        host = transform(np.asarray(tensors.get(available[hf_name])), cfg)
        expected = var.get_value().shape
        if host.shape != tuple(expected):
            misshaped.append(f"{hf_name}: gives {host.shape} for {ours}, expected {tuple(expected)}")
            return var
        return var.replace(_place(host.astype(dtype), shard))

    state = jax.tree_util.tree_map_with_path(load, abstract_state, shardings, is_leaf=is_var)
    if cfg.tie_embeddings:
        ignore = (*ignore, r"^lm_head\.weight$")
    patterns = [re.compile(p) for p in (*family.IGNORED, *ignore)]
    unexpected = [
        available[n] for n in available if n not in used and not any(p.search(n) for p in patterns)
    ]
    problems = []
    for title, items in ((f"missing tensors (names after any '{strip}' prefix)", missing),
                         ("mis-shaped tensors", misshaped), ("unexpected tensors", unexpected),
                         ("parameters without a mapping", unknown)):
        if items:
            shown = ", ".join(sorted(items)[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
            problems.append(f"{title}: {shown}")
    if problems:
        raise ValueError(f"checkpoint does not match the {cfg.model_type} config: " + "; ".join(problems))
    return state


def abstract_model(cls: type, *args, **kwargs) -> tuple[nnx.GraphDef, nnx.State]:
    """Build ``cls(*args, **kwargs)`` without allocating, split into graph and abstract state."""
    return nnx.split(nnx.eval_shape(lambda: cls(*args, rngs=nnx.Rngs(0), **kwargs)))


def shardings_for(abstract_state: nnx.State, mesh: Mesh | None) -> Any:
    if mesh is None:
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: single, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return sharding_lib.state_shardings(abstract_state, mesh)


def from_hf(path: str | Path, *, dtype=jnp.float32, mesh: Mesh | None = None) -> Transformer:
    """Our :class:`Transformer` with the weights of a local Hugging Face directory.

    Args:
      path: directory with ``config.json`` and ``*.safetensors`` (sharded index supported).
      dtype: parameter dtype (float32 or bfloat16); logits are always float32.
      mesh: place parameters sharded by the logical-axis rules of :mod:`qsharp_jax.sharding`;
        ``None`` puts them on the default device.

    Returns:
      The model: ``model(input_ids [B, T] int32, attention_mask=None) -> logits [B, T, V] f32``.
    """
    hf = read_config(path)
    family = family_of(hf)
    cfg = family.config_from_hf(hf)
    tensors = SafetensorsDir(path)
    graphdef, abstract = abstract_model(Transformer, cfg, dtype=dtype)
    state = load_state(abstract, family, cfg, tensors, shardings_for(abstract, mesh), dtype=dtype)
    return nnx.merge(graphdef, state)


def load_tokenizer(path: str | Path, model: Transformer | None = None):
    """The tokenizer saved with a model (chat template included), checked against its vocabulary."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if model is not None and len(tokenizer) > model.cfg.vocab_size:
        raise ValueError(
            f"tokenizer at {path} has {len(tokenizer)} tokens but the model's vocabulary has only "
            f"{model.cfg.vocab_size}: token ids would fall outside the embedding"
        )
    return tokenizer
