"""The benchmark's PyTorch Q♯ LogitsProcessor (the official code's way of guiding HF `generate`)
computes the same guided logits as ours, so `make bench` compares like with like.

Guards against: a processor whose offsets, candidate set or cache handling differ from
``guidance.guided_logits`` (e.g. scoring candidates against a stale value-model cache: the second
step would disagree)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from experiments.bench.rollout_bench import ETA, Size, TorchQSharpProcessor, build
from qsharp_jax import guidance

TOP_K = 5


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_torch_processor_equals_guided_logits(tmp_path, family):
    vocab = 40
    if family == "gpt2":  # rollout_bench's pair
        ref_t, backbone_t, head_t, ref_j, value_j = build(Size("test", vocab, (1, 16, 2), (2, 16, 2)), tmp_path)
    else:  # math_bench's pair (grouped-query attention, RoPE)
        from experiments.bench import math_bench
        ref_j, value_j, ref_t, backbone_t, head_t = math_bench.build(tmp_path, vocab, (1, 128), (2, 128))
    atoms = jnp.asarray(value_j.head_cfg.atoms)
    processor = TorchQSharpProcessor(backbone_t, head_t, torch.from_numpy(np.array(atoms)), ETA, TOP_K)
    with torch.no_grad():  # larger head weights: offsets that differ across candidates
        head_t.weight.mul_(50.0)
    value_j.head.kernel[...] = value_j.head.kernel[...] * 50.0
    ids = np.random.default_rng(0).integers(1, vocab, size=(3, 7))
    # compiled, as decoding runs them (eagerly, every operation compiles by itself)
    forward, extend, score = jax.jit(ref_j), jax.jit(value_j.extend), jax.jit(value_j.score_candidates)
    for step in range(2):  # the prompt, then the prompt and one more token (the processor's cache path)
        if step:
            ids = np.concatenate([ids, np.array([[3], [9], [27]])], axis=1)
        ref_logits = np.asarray(forward(jnp.asarray(ids, jnp.int32))[:, -1])
        with torch.no_grad():
            got = processor(torch.from_numpy(ids), torch.from_numpy(ref_logits.copy())).numpy()
        cand = jax.lax.top_k(jnp.asarray(ref_logits), TOP_K)[1]
        _, cache = extend(jnp.asarray(ids, jnp.int32), value_j.init_cache(3, 16))
        offsets = guidance.qsharp_logit_offset(score(cand, cache), atoms, ETA)
        want = guidance.guided_logits(jnp.asarray(ref_logits), cand, offsets, others="min")
        assert float(jnp.max(offsets) - jnp.min(offsets)) > 0.5  # guidance reorders, the check is not vacuous
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-4)


def test_pack_bench_compares_the_same_loss(tmp_path):
    """The packing bench's PyTorch loop fits the loss ours fits (same weights, same padded rows)."""
    from experiments.bench import pack_bench
    from qsharp_jax import objectives

    data = pack_bench.rows(3, vocab=64)
    ours, backbone, head = pack_bench.build(1, 64, tmp_path, vocab=64)
    with torch.no_grad():
        expected = float(pack_bench.torch_loss(backbone, head, data))
    loss, _ = jax.jit(objectives.value_loss)(ours, {k: jnp.asarray(v) for k, v in data.items()})
    assert float(loss) == pytest.approx(expected, rel=1e-4)
