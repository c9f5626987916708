"""Value models: a transformer backbone of any family plus a value head.

V-type (``q_type=False``): one output per position — the distribution of the return given the
prefix up to and including that token. During decoding it scores π_ref's top-k candidate next
tokens in one forward against its own KV cache (:meth:`ValueModel.score_candidates`).

Q-type (``q_type=True``): one output per vocabulary item at each position — the return
distribution of every possible next token at once; meant for small vocabularies.

Heads: ``categorical`` (logits over ``num_atoms`` atoms, for Q♯/CD), ``bernoulli`` (one logit,
P(R = 1) for 0/1 rewards) and ``scalar`` (a regression value, for the MSE baseline).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from qsharp_jax import sharding as sharding_lib
from qsharp_jax.models import hf as hf_lib
from qsharp_jax.models.cache import KVCache
from qsharp_jax.models.transformer import Transformer, TransformerConfig, linear


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """The value head: what it predicts and over which return range.

    Fields:
      kind: ``categorical`` (logits over ``num_atoms`` atoms: Q♯ and CD guidance), ``bernoulli``
        (one logit, P(R = 1), for 0/1 rewards) or ``scalar`` (a regression value, the MSE baseline).
      num_atoms: atoms of a categorical head (paper: 11). Ignored by the other kinds.
      v_min, v_max: the return range the atoms cover, ``linspace(v_min, v_max, num_atoms)``; the
        task's rewards must lie inside it (checked before a run starts). Default [0, 1].
      q_type: False (V-type): one output per position, the value of the prefix ending there;
        True (Q-type): one output per vocabulary item, every next token's value at once (small
        vocabularies only).
    """

    kind: Literal["categorical", "bernoulli", "scalar"] = "categorical"
    num_atoms: int = 11
    q_type: bool = False
    v_min: float = 0.0
    v_max: float = 1.0

    def __post_init__(self):
        if self.kind not in ("categorical", "bernoulli", "scalar"):
            raise ValueError(f"head kind must be categorical, bernoulli or scalar, got {self.kind!r}")
        if self.kind == "categorical" and self.num_atoms < 2:
            raise ValueError(f"a categorical head needs num_atoms >= 2, got {self.num_atoms}")
        if not (np.isfinite(self.v_min) and np.isfinite(self.v_max) and self.v_min < self.v_max):
            raise ValueError(f"head.v_min < head.v_max must both be finite, got v_min={self.v_min}, v_max={self.v_max}")
        if self.kind == "bernoulli" and (self.v_min, self.v_max) != (0.0, 1.0):
            raise ValueError(f"a bernoulli head predicts P(R = 1) for rewards in {{0, 1}}: keep v_min=0, v_max=1 "
                             f"(got {self.v_min}, {self.v_max})")

    @property
    def atoms(self) -> np.ndarray:
        """float32 ``[num_atoms]``: the categorical head's support. A numpy constant, so value checks
        on it run once while tracing, never inside compiled code."""
        with jax.ensure_compile_time_eval():  # jnp's rounding of linspace (the atoms runs were made with)
            return np.asarray(jnp.linspace(self.v_min, self.v_max, self.num_atoms, dtype=jnp.float32))

    @property
    def reward_range(self) -> tuple[float, float]:
        """The returns this head can represent."""
        return float(self.v_min), float(self.v_max)


class ValueHead(nnx.Module):
    """Linear map of final hidden states ``[..., E]`` to value outputs (see :class:`ValueModel`)."""

    def __init__(self, hidden_size: int, vocab_size: int, cfg: HeadConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vocab_size = vocab_size
        per_item = cfg.num_atoms if cfg.kind == "categorical" else 1
        out = per_item * (vocab_size if cfg.q_type else 1)
        axis = "vocab" if cfg.q_type else None
        kernel = 0.02 * jax.random.normal(rngs.params(), (out, hidden_size), jnp.float32)  # [out, in]
        self.kernel = nnx.Param(kernel.astype(dtype), out_sharding=(axis, "embed"), eager_sharding=False)
        self.bias = nnx.Param(jnp.zeros((out,), dtype), out_sharding=(axis,), eager_sharding=False)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        out = linear(hidden, self.kernel[...], jnp.float32)
        out = out + self.bias[...].astype(jnp.float32)
        lead = out.shape[:-1]
        if self.cfg.q_type:
            lead = (*lead, self.vocab_size)
        if self.cfg.kind == "categorical":
            return out.reshape(*lead, self.cfg.num_atoms)
        return out.reshape(lead)


class ValueModel(nnx.Module):
    """Backbone + head. Output shapes (float32), for ``input_ids [B, T]``:

    ============  ===============  ==============
    head kind     V-type           Q-type
    ============  ===============  ==============
    categorical   ``[B, T, K]``    ``[B, T, V, K]``
    bernoulli     ``[B, T]``       ``[B, T, V]``
    scalar        ``[B, T]``       ``[B, T, V]``
    ============  ===============  ==============
    """

    def __init__(self, backbone: TransformerConfig, head: HeadConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        # The backbone's LM head is never used: tie it away instead of storing a [E, V] matrix.
        self.backbone = Transformer(dataclasses.replace(backbone, tie_embeddings=True), dtype=dtype, rngs=rngs)
        self.head = ValueHead(backbone.hidden_size, backbone.vocab_size, head, dtype=dtype, rngs=rngs)

    @property
    def head_cfg(self) -> HeadConfig:
        return self.head.cfg

    @property
    def vocab_size(self) -> int:
        return self.backbone.cfg.vocab_size

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, branch_ids: jax.Array | None = None) -> jax.Array:
        return self.head(self.backbone.hidden(input_ids, attention_mask, segment_ids, branch_ids))

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        return self.backbone.init_cache(batch, max_len)

    def extend(
        self, input_ids: jax.Array, cache: KVCache, attention_mask: jax.Array | None = None, *, last_only: bool = False
    ) -> tuple[jax.Array, KVCache]:
        """Append tokens ``[B, T]`` to the cache; return their value outputs ``[B, T, ...]`` (with
        ``last_only``: the last position's only, ``[B, 1, ...]`` — a Q-type head over a whole
        prompt is ``[B, T, V, K]``) and the new cache."""
        hidden, cache = self.backbone.extend_hidden(input_ids, cache, attention_mask)
        return self.head(hidden[:, -1:] if last_only else hidden), cache

    def score_candidates(self, candidate_ids: jax.Array, cache: KVCache, *, return_kv: bool = False):
        """V-type: values of k candidate next tokens ``[B, k]`` -> ``[B, k, K]`` (or ``[B, k]``).

        One forward for all candidates of all sequences against the cache, which is unchanged.
        With ``return_kv``, also the candidates' keys/values: :meth:`commit_candidate` then appends
        the token actually chosen without another forward.
        """
        if self.head.cfg.q_type:
            raise ValueError(
                "score_candidates is for V-type value models; a Q-type model gives every next token's "
                "value at the last position of extend()/__call__"
            )
        if return_kv:
            hidden, kv = self.backbone.candidates_hidden(candidate_ids, cache, return_kv=True)
            return self.head(hidden), kv
        return self.head(self.backbone.candidates_hidden(candidate_ids, cache))

    def score_paths(self, path_ids: jax.Array, cache: KVCache, prefix=None, *, siblings: bool = False):
        """V-type: values ``[B, P, T, (K)]`` of tokens extending P paths per sequence, in one forward,
        and the extended path (see :meth:`Transformer.paths_hidden`; a :meth:`score_candidates`
        ``return_kv`` is not a prefix: its keys are ``[B, kv_heads, k, head_dim]``)."""
        if self.head.cfg.q_type:
            raise ValueError("score_paths is for V-type value models")
        hidden, path = self.backbone.paths_hidden(path_ids, cache, prefix, siblings=siblings)
        return self.head(hidden), path

    def score_branches(
        self, input_ids: jax.Array, attention_mask: jax.Array | None, branch_ids: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """V-type: values of every prefix and of k one-token extensions of each, in one forward.

        ``input_ids [B, T]``, ``branch_ids [B, T, k]`` -> ``(values [B, T, (K)], branches [B, T, k, (K)])``
        where ``branches[b, t, j]`` scores the prefix ending at t extended by ``branch_ids[b, t, j]``
        (see :meth:`Transformer.branches_hidden`).
        """
        if self.head.cfg.q_type:
            raise ValueError("score_branches is for V-type value models; a Q-type model scores every token already")
        hidden, branches = self.backbone.branches_hidden(input_ids, attention_mask, branch_ids)
        return self.head(hidden), self.head(branches)

    def commit_candidate(self, cache: KVCache, candidate_kv, choice: jax.Array, active: jax.Array | None = None):
        """Append the chosen candidate (index ``choice [B]``) of :meth:`score_candidates` to the cache."""
        return self.backbone.commit_candidate(cache, candidate_kv, choice, active)


def check_compatible(reference: Transformer, value: ValueModel) -> None:
    """The value model must score tokens of the reference model's vocabulary (one tokenizer).

    A V-type value model may have fewer embedding rows than π_ref (checkpoints of one tokenizer
    pad their vocabularies differently: Qwen2.5 7B has 152,064 rows, 1.5B 151,936); guidance then
    draws π_ref's candidates among the ids both models have. A Q-type head scores every id: the
    vocabularies must be equal.
    """
    ref_vocab, value_vocab = reference.cfg.vocab_size, value.vocab_size
    if value_vocab > ref_vocab or (value.head_cfg.q_type and value_vocab != ref_vocab):
        need = "equal π_ref's (a Q-type head scores every token)" if value.head_cfg.q_type else "be at most π_ref's"
        raise ValueError(
            f"value model vocabulary ({value_vocab}) differs from the reference model's ({ref_vocab}); both must "
            f"share one tokenizer, and the value model's vocabulary must {need}"
        )


def value_from_scratch(
    backbone: TransformerConfig, head: HeadConfig, *, seed: int = 0, dtype=jnp.float32, mesh: Mesh | None = None
) -> ValueModel:
    """A randomly initialized value model, placed with its shardings when ``mesh`` is given."""
    if mesh is None:
        return ValueModel(backbone, head, dtype=dtype, rngs=nnx.Rngs(seed))
    graphdef, abstract = hf_lib.abstract_model(ValueModel, backbone, head, dtype=dtype)
    shardings = hf_lib.shardings_for(abstract, mesh)

    def init():
        return nnx.split(ValueModel(backbone, head, dtype=dtype, rngs=nnx.Rngs(seed)))[1]

    # initialized directly into its shardings: never materialized on one device
    state = jax.jit(init, out_shardings=_values(shardings))()
    return nnx.merge(graphdef, state)


def value_from_hf(
    path: str | Path, head: HeadConfig, *, seed: int = 0, dtype=jnp.float32, mesh: Mesh | None = None
) -> ValueModel:
    """A value model whose backbone is a pretrained Hugging Face LM (its LM head is dropped) and
    whose value head is freshly initialized (as the paper initializes its value models)."""
    hf = hf_lib.read_config(path)
    family = hf_lib.family_of(hf)
    cfg = family.config_from_hf(hf)
    graphdef, abstract = hf_lib.abstract_model(ValueModel, cfg, head, dtype=dtype)
    shardings = hf_lib.shardings_for(abstract, mesh)
    state = hf_lib.load_state(
        abstract, family, dataclasses.replace(cfg, tie_embeddings=True), hf_lib.SafetensorsDir(path), shardings,
        dtype=dtype, ignore=(r"^lm_head\.weight$",), prefix="backbone.",
    )
    fresh = nnx.split(ValueHead(cfg.hidden_size, cfg.vocab_size, head, dtype=dtype, rngs=nnx.Rngs(seed)))[1]
    head_state = sharding_lib.put(fresh, _values(shardings["head"]))
    state["head"] = head_state
    return nnx.merge(graphdef, state)


def value_from_reference(reference: Transformer, head: HeadConfig, *, seed: int = 0) -> ValueModel:
    """A value model whose backbone starts as a copy of ``reference`` (its LM head dropped) and whose
    head is fresh: for a π_ref trained in the same run, what :func:`value_from_hf` is for a saved
    LM. The copy is independent: training the value model leaves ``reference`` untouched."""
    cfg = reference.cfg
    value = ValueModel(cfg, head, dtype=reference.dtype, rngs=nnx.Rngs(seed))
    params = nnx.to_pure_dict(nnx.state(reference))
    params.pop("lm_head", None)  # the value backbone ties its (unused) LM head away
    nnx.update(value.backbone, jax.tree.map(jnp.copy, params))
    return value


def _values(shardings: Any) -> Any:
    """Strip Variable boxes so a sharding tree matches a plain state's leaves."""
    return jax.tree.map(
        lambda v: v.get_value() if isinstance(v, nnx.Variable) else v,
        shardings,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
