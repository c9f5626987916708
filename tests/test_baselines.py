"""Policy objectives and baselines against numpy recomputations of their formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsharp_jax import objectives as policy
from qsharp_jax.baselines import dpo, reinforce
from qsharp_jax.models.transformer import Transformer, TransformerConfig

V = 9
CFG = TransformerConfig(vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8,
                        mlp_dim=32, max_positions=16)


def batch(seed=0, n=5, t=7, prompt=3):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, size=(n, t))
    attention = np.ones((n, t), bool)
    attention[1, 5:] = False  # a response that ended early
    loss_mask = np.zeros((n, t), bool)
    loss_mask[:, prompt:] = True
    return {"tokens": jnp.asarray(tokens, jnp.int32), "attention_mask": jnp.asarray(attention),
            "loss_mask": jnp.asarray(loss_mask)}


def manual_logprobs(model, b):
    logits = np.asarray(model(b["tokens"], b["attention_mask"]), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tokens = np.asarray(b["tokens"])
    mask = np.asarray(b["loss_mask"] & b["attention_mask"])
    out = np.zeros(len(tokens))
    for n in range(len(tokens)):
        for t in range(1, tokens.shape[1]):
            if mask[n, t]:
                out[n] += logp[n, t - 1, tokens[n, t]]
    return out, logp


def test_sequence_logprobs_and_next_token_loss():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    b = batch()
    want, logp = manual_logprobs(model, b)
    np.testing.assert_allclose(policy.sequence_logprobs(model, b), want, rtol=1e-5)
    mask = np.asarray(b["loss_mask"] & b["attention_mask"])[:, 1:]
    loss, metrics = policy.next_token_loss(model, b)
    np.testing.assert_allclose(loss, -want.sum() / mask.sum(), rtol=1e-5)
    hits = np.argmax(logp[:, :-1], -1) == np.asarray(b["tokens"])[:, 1:]
    np.testing.assert_allclose(metrics["token_accuracy"], hits[mask].mean(), rtol=1e-6)


def test_reinforce_loss_and_gradient():
    model = Transformer(CFG, rngs=nnx.Rngs(1))
    b = batch(seed=1)
    correct = jnp.asarray([1.0, 0.0, 0.0, 1.0, 0.0])
    b["rewards"] = reinforce.shaped_rewards(correct)
    np.testing.assert_allclose(b["rewards"], [1, -0.1, -0.1, 1, -0.1])
    logp, _ = manual_logprobs(model, b)
    r = np.asarray(b["rewards"], np.float64)
    loss, _ = reinforce.reinforce_loss(model, b)
    np.testing.assert_allclose(loss, -np.mean((r - r.mean()) * logp), rtol=1e-5, atol=1e-7)
    loss, _ = reinforce.reinforce_loss(model, b, baseline=False)
    np.testing.assert_allclose(loss, -np.mean(r * logp), rtol=1e-5)
    # the gradient is Σ advantage · ∇log π: a weighted sum of per-sequence score functions
    graphdef, params = nnx.split(model)
    grad = jax.jit(jax.grad(lambda p: reinforce.reinforce_loss(nnx.merge(graphdef, p), b, baseline=False)[0]))(params)
    per_seq = jax.jit(jax.jacobian(lambda p: policy.sequence_logprobs(nnx.merge(graphdef, p), b)))(params)
    for g, j in zip(jax.tree.leaves(grad), jax.tree.leaves(per_seq)):
        np.testing.assert_allclose(g, -np.tensordot(r, j, axes=1) / len(r), atol=1e-6)


def test_dpo_and_rpo_losses():
    model = Transformer(CFG, rngs=nnx.Rngs(2))
    ref = Transformer(CFG, rngs=nnx.Rngs(3))
    chosen, rejected = batch(seed=2), batch(seed=3)
    ref_c, _ = manual_logprobs(ref, chosen)
    ref_r, _ = manual_logprobs(ref, rejected)
    pol_c, _ = manual_logprobs(model, chosen)
    pol_r, _ = manual_logprobs(model, rejected)
    pairs = {"chosen": chosen, "rejected": rejected, "ref_chosen": jnp.asarray(ref_c, jnp.float32),
             "ref_rejected": jnp.asarray(ref_r, jnp.float32)}
    margin = (pol_c - ref_c) - (pol_r - ref_r)
    want = np.mean(np.log1p(np.exp(-0.1 * margin)))  # −log σ(β·margin)
    np.testing.assert_allclose(dpo.preference_loss(model, pairs, beta=0.1)[0], want, rtol=1e-5)
    np.testing.assert_allclose(dpo.preference_loss(model, pairs, beta=0.1, nll_weight=1.0)[0],
                               want - pol_c.mean(), rtol=1e-5)
    # at π = π_ref the DPO loss is log 2 whatever the data
    same = dict(pairs, ref_chosen=policy.sequence_logprobs(model, chosen),
                ref_rejected=policy.sequence_logprobs(model, rejected))
    np.testing.assert_allclose(dpo.preference_loss(model, same)[0], np.log(2), rtol=1e-6)
    with pytest.raises(ValueError, match="beta > 0"):
        dpo.dpo_loss_from_logprobs(*(jnp.zeros(3),) * 4, beta=0.0)


@pytest.mark.parametrize("top_k", [None, 3])
def test_sampled_kl_matches_the_definition(top_k):
    model = Transformer(CFG, rngs=nnx.Rngs(4))
    ref = Transformer(CFG, rngs=nnx.Rngs(5))
    b = batch(seed=4)
    prompts, completions = b["tokens"][:, :3], b["tokens"][:, 3:]
    pmask, cmask = b["attention_mask"][:, :3], b["attention_mask"][:, 3:]
    got = policy.sampled_kl(model, ref, prompts, pmask, completions, cmask, top_k=top_k, temperature=0.7)
    logits = np.asarray(model(b["tokens"], b["attention_mask"]), np.float64) / 0.7
    ref_logits = np.asarray(ref(b["tokens"], b["attention_mask"]), np.float64)
    want = np.zeros(5)
    for n in range(5):
        for t in range(2, 6):  # logits at t predict token t + 1, the completion tokens 3..6
            if not cmask[n, t - 2]:
                continue
            z = logits[n, t].copy()
            if top_k:
                z[np.argsort(-z)[top_k:]] = -np.inf
            p = np.exp(z - z.max())
            p /= p.sum()
            q = np.exp(ref_logits[n, t] - ref_logits[n, t].max())
            q /= q.sum()
            keep = p > 0
            want[n] += np.sum(p[keep] * np.log(p[keep] / q[keep]))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # a model against itself, untruncated: zero
    np.testing.assert_allclose(policy.sampled_kl(model, model, prompts, pmask, completions, cmask), 0, atol=1e-5)
