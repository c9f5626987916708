"""bfloat16 models (parameters, activations and KV caches in bfloat16): logits, log-probabilities,
the guidance's softmaxes and KL stay float32, and the results stay within measured bounds of the
float32 model with the same weights (a bf16 model of one seed holds that model's rounded weights).

Bounds: measured on this tiny model over seeds 0-2 (log-prob 0.0038, value probabilities 3.2e-4,
KL 3.7e-7, value loss 4.5e-4 of 2.4; decoded log-probs up to the first differing token 0.0038),
asserted with 5-15x room; a softmax or logits in bfloat16 would fail the dtype checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsharp_jax import objectives
from qsharp_jax.models.build import ModelSpec, build_reference, check_dtype_runs
from qsharp_jax.models.transformer import Transformer, TransformerConfig
from qsharp_jax.models.value import HeadConfig, ValueModel
from qsharp_jax.rollout import generate

CFG = TransformerConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                        mlp_dim=128, max_positions=64)


def pair(seed):
    return [(Transformer(CFG, dtype=d, rngs=nnx.Rngs(seed)), ValueModel(CFG, HeadConfig("categorical", 11), dtype=d,
                                                                         rngs=nnx.Rngs(seed + 1)))
            for d in (jnp.float32, jnp.bfloat16)]


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_forward_value_and_fit_are_float32_where_it_matters(seed):
    (ref32, value32), (ref16, value16) = pair(seed)
    assert ref16.layers[0].q[...].dtype == jnp.bfloat16 and ref16.init_cache(2, 8).k[0].dtype == jnp.bfloat16
    ids = jax.random.randint(jax.random.key(seed), (8, 24), 0, CFG.vocab_size)
    forward = jax.jit(lambda m, x: jax.nn.log_softmax(m(x)))
    lp32, lp16 = forward(ref32, ids), forward(ref16, ids)
    assert ref16(ids).dtype == lp16.dtype == jnp.float32
    assert float(jnp.abs(lp32 - lp16).max()) < 0.02
    assert float(jnp.mean(jnp.sum(jnp.exp(lp32) * (lp32 - lp16), -1))) < 5e-6  # KL(π32 ‖ π16) per position
    out16 = value16(ids)
    assert out16.dtype == jnp.float32
    assert float(jnp.abs(jax.nn.softmax(value32(ids)) - jax.nn.softmax(out16)).max()) < 2e-3
    batch = {"tokens": ids, "attention_mask": jnp.ones(ids.shape, bool), "loss_mask": jnp.ones(ids.shape, bool),
             "rewards": (jnp.arange(8) % 2).astype(jnp.float32)}
    grad = jax.jit(nnx.value_and_grad(lambda m: objectives.value_loss(m, batch)[0]))
    (loss32, _), (loss16, g16) = grad(value32), grad(value16)
    assert loss16.dtype == jnp.float32 and abs(float(loss32) - float(loss16)) < 3e-3
    leaves = jax.tree.leaves(nnx.state(g16, nnx.Param))
    assert all(bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in leaves)
    assert any(float(jnp.abs(x.astype(jnp.float32)).max()) > 0 for x in leaves)


def test_bf16_guided_decoding_matches_float32_until_the_samples_part():
    (ref32, value32), (ref16, value16) = pair(0)
    prompts = jax.random.randint(jax.random.key(1), (8, 6), 0, CFG.vocab_size)
    mask = jnp.ones(prompts.shape, bool)
    outs = [generate(r, prompts, mask, key=jax.random.key(3), max_new_tokens=12, value_model=v, guidance="qsharp",
                     eta=0.5, top_k=16) for r, v in ((ref32, value32), (ref16, value16))]
    assert {outs[1].logprobs.dtype, outs[1].kl.dtype, outs[1].guidance_kl.dtype} == {jnp.dtype(jnp.float32)}
    assert bool(outs[1].finite.all())
    same = np.cumprod(np.asarray(outs[0].tokens) == np.asarray(outs[1].tokens), axis=1).astype(bool)
    assert same[:, 0].mean() > 0.5  # most rows start alike: bf16 moves probabilities by ~0.4%
    gap = np.abs(np.asarray(outs[0].logprobs) - np.asarray(outs[1].logprobs))[same]
    assert gap.max() < 0.02


@dataclasses.dataclass
class FakeGPU:
    compute_capability: str
    device_kind: str
    platform: str = "gpu"


def test_bf16_on_a_device_without_it_is_refused():
    with pytest.raises(ValueError, match=r"bfloat16 needs a GPU of compute capability 8.0 or newer .* Tesla V100 has "
                                         r"7.0: use dtype: float32"):
        check_dtype_runs(jnp.bfloat16, [FakeGPU("7.0", "Tesla V100")])
    check_dtype_runs(jnp.bfloat16, [FakeGPU("9.0", "H100")])
    check_dtype_runs(jnp.float32, [FakeGPU("7.0", "Tesla V100")])
    assert build_reference(ModelSpec(vocab_size=16, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32,
                                     max_positions=8, dtype="bfloat16")).embed[...].dtype == jnp.bfloat16  # CPU: runs
