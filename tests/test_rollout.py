"""The jitted sampling loop: distributions, guidance, switch times, EOS, caching, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from forward import at_width
from scipy import stats

from qsharp_jax import guidance, sharding
from qsharp_jax.models.transformer import Transformer, TransformerConfig
from qsharp_jax.models.value import HeadConfig, ValueModel
from qsharp_jax.rollout import generate

V = 12
CFG = TransformerConfig(vocab_size=V, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4,
                        mlp_dim=32, max_positions=64)


@pytest.fixture(scope="module")
def ref():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    # larger weights than the default init, so π_ref is far from uniform
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x * 10.0, state)
    return nnx.merge(graphdef, state)


def chi2_pvalue(counts, probs):
    """Chi-square goodness of fit of sample counts to a distribution (renormalized in float64)."""
    probs = np.asarray(probs, np.float64)
    return stats.chisquare(counts, probs / probs.sum() * counts.sum()).pvalue


def prompts(batch, seed=0, length=5):
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, V, size=(batch, length)), jnp.int32)
    mask = jnp.ones((batch, length), bool).at[0, :2].set(False)
    return ids, mask


def token_value_model(value_logits: np.ndarray, q_type: bool = False) -> ValueModel:
    """A value model whose output for a token is set by hand: ``value_logits [V, K]`` (V-type: the
    value of a prefix ending in token a is ``value_logits[a]``; Q-type: the value of next token a)."""
    k = value_logits.shape[-1]
    e = 16
    cfg = TransformerConfig(vocab_size=V, hidden_size=e, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8,
                            mlp_dim=8, max_positions=64, norm_eps=1e-12)
    model = ValueModel(cfg, HeadConfig("categorical", k, q_type=q_type), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    state = jax.tree.map(jnp.zeros_like, state)  # blocks add nothing: hidden = RMSNorm(embedding)
    state["backbone"]["final_norm_scale"] = nnx.Param(jnp.ones(e))
    state["backbone"]["embed"] = nnx.Param(jnp.eye(V, e))  # RMSNorm(e_a) = sqrt(e) * e_a
    if q_type:
        state["head"]["bias"] = nnx.Param(jnp.asarray(value_logits, jnp.float32).reshape(-1))
    else:
        kernel = np.zeros((k, e), np.float32)  # [out, in]
        kernel[:, :V] = value_logits.T / np.sqrt(e)
        state["head"]["kernel"] = nnx.Param(jnp.asarray(kernel))
    return nnx.merge(graphdef, state)


def test_plain_sampling_matches_reference_and_kl_is_zero(ref):
    n = 4000
    ids, mask = prompts(1)
    ids, mask = jnp.repeat(ids, n, 0), jnp.ones((n, 5), bool)
    out = generate(ref, ids, mask, key=jax.random.key(1), max_new_tokens=2, top_k=None)
    probs = np.asarray(jax.nn.softmax(jax.jit(ref)(ids[:1])[0, -1]), np.float64)
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=V)
    assert chi2_pvalue(counts, probs) > 1e-3
    np.testing.assert_array_equal(out.kl, 0.0)
    np.testing.assert_allclose(out.logprobs, out.ref_logprobs, atol=1e-6)


@pytest.mark.parametrize("others", ["min", "exclude"])
def test_qsharp_sampling_matches_guided_logits(ref, others):
    rng = np.random.default_rng(2)
    value_logits = rng.normal(size=(V, 11)) * 3
    value = token_value_model(value_logits)
    n, eta, k = 4000, 0.2, 5
    ids, _ = prompts(1, seed=3)
    ids, mask = jnp.repeat(ids, n, 0), jnp.ones((n, 5), bool)
    out = generate(ref, ids, mask, key=jax.random.key(2), max_new_tokens=1, value_model=value, guidance="qsharp",
                   eta=eta, top_k=k)
    ref_logits = jax.jit(ref)(ids[:1])[0, -1][None]
    cand = jax.lax.top_k(ref_logits, k)[1]
    offsets = guidance.qsharp_logit_offset(jnp.asarray(value_logits, jnp.float32)[cand], jnp.linspace(0, 1, 11), eta)
    logits = guidance.guided_logits(ref_logits, cand, offsets, others=others)[0]
    kth = jnp.sort(logits)[-k]
    expected = np.asarray(jax.nn.softmax(jnp.where(logits < kth, -jnp.inf, logits)), np.float64)
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=V)
    support = expected > 0
    assert counts[~support].sum() == 0
    assert chi2_pvalue(counts[support], expected[support]) > 1e-3
    # and it is not simply π_ref's top-k distribution
    plain = np.asarray(jax.nn.softmax(jnp.where(ref_logits[0] < jnp.sort(ref_logits[0])[-k], -jnp.inf, ref_logits[0])))
    assert np.abs(expected - plain).max() > 0.05
    np.testing.assert_allclose(out.logprobs[:, 0], np.log(expected[np.asarray(out.tokens[:, 0])]), atol=1e-4)
    ref_probs = np.asarray(jax.nn.softmax(ref_logits[0]), np.float64)
    kl = np.sum(expected[support] * np.log(expected[support] / ref_probs[support]))
    np.testing.assert_allclose(out.kl, kl, rtol=1e-4)  # exact KL of the step's full distributions


@pytest.mark.parametrize("q_type", [False, True])
def test_switch_time_token_by_token(ref, q_type):
    value_logits = np.full((V, 11), -30.0)
    value_logits[:, 0] = 0.0  # every token: return 0 ...
    value_logits[7] = -30.0
    value_logits[7, -1] = 0.0  # ... except token 7: return 1
    value = token_value_model(value_logits, q_type=q_type)
    ids, mask = prompts(4, seed=4)
    switch = jnp.array([0, 2, 5, 8])
    out = generate(ref, ids, mask, key=jax.random.key(3), max_new_tokens=8, value_model=value, guidance="qsharp",
                   eta=0.02, top_k=V, switch_time=switch)
    tokens, lp, ref_lp = map(np.asarray, (out.tokens, out.logprobs, out.ref_logprobs))
    for b, h in enumerate(np.asarray(switch)):
        assert np.all(tokens[b, :h] == 7), tokens[b]
        np.testing.assert_allclose(lp[b, h:], ref_lp[b, h:], atol=1e-5)  # π_ref after the switch
        assert np.all(lp[b, :h] > ref_lp[b, :h])
    assert out.kl[0] == 0 and np.all(np.asarray(out.kl[1:]) > 0)
    assert np.any(tokens[0] != 7)


def test_eos_and_lengths(ref):
    ids, mask = prompts(16, seed=5)
    out = generate(ref, ids, mask, key=jax.random.key(4), max_new_tokens=12, top_k=None, eos_id=3, pad_id=11)
    tokens, m = np.asarray(out.tokens), np.asarray(out.mask)
    ended = 0
    for b in range(16):
        hits = np.flatnonzero(tokens[b] == 3)
        length = hits[0] + 1 if len(hits) else 12
        ended += bool(len(hits))
        assert out.lengths[b] == length and m[b].sum() == length and m[b, :length].all()
        assert np.all(tokens[b, length:] == 11)
        np.testing.assert_array_equal(np.asarray(out.logprobs[b, length:]), 0.0)
    assert ended > 0  # the test saw EOS


def test_cached_log_probs_equal_full_recompute(ref):
    ids, mask = prompts(3, seed=6)
    out = generate(ref, ids, mask, key=jax.random.key(5), max_new_tokens=6, top_k=None)
    full = jnp.concatenate([ids, out.tokens], 1)
    full_mask = jnp.concatenate([mask, out.mask], 1)
    log_probs = jax.nn.log_softmax(ref(full, full_mask), -1)[:, 4:-1]  # predictions of the new tokens
    expected = jnp.take_along_axis(log_probs, out.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.ref_logprobs, expected, atol=1e-4)


def test_same_key_same_tokens(ref):
    ids, mask = prompts(4, seed=7)
    a = generate(ref, ids, mask, key=jax.random.key(6), max_new_tokens=6, top_k=4, top_p=0.9, temperature=0.7)
    b = generate(ref, ids, mask, key=jax.random.key(6), max_new_tokens=6, top_k=4, top_p=0.9, temperature=0.7)
    c = generate(ref, ids, mask, key=jax.random.key(7), max_new_tokens=6, top_k=4, top_p=0.9, temperature=0.7)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert np.any(np.asarray(a.tokens) != np.asarray(c.tokens))


def test_top_p_and_temperature_shape_the_policy(ref):
    ids, _ = prompts(1, seed=8)
    n = 3000
    ids, mask = jnp.repeat(ids, n, 0), jnp.ones((n, 5), bool)
    out = generate(ref, ids, mask, key=jax.random.key(8), max_new_tokens=1, top_k=None, top_p=0.7, temperature=10.0)
    logits = ref(ids[:1])[0, -1] / 10.0
    probs = np.asarray(jax.nn.softmax(logits), np.float64)
    order = np.argsort(-probs)
    keep = order[: np.searchsorted(np.cumsum(probs[order]), 0.7) + 1]
    expected = np.zeros(V)
    expected[keep] = probs[keep] / probs[keep].sum()
    assert 3 <= len(keep) < V  # the nucleus is a real cut
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=V)
    assert counts[expected == 0].sum() == 0
    assert chi2_pvalue(counts[keep], expected[keep]) > 1e-3


def test_sharded_equals_single_device(ref):
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    value = token_value_model(np.random.default_rng(9).normal(size=(V, 11)))
    ids, mask = prompts(8, seed=9)
    kwargs = dict(key=jax.random.key(9), max_new_tokens=5, value_model=value, guidance="qsharp", eta=0.3, top_k=4,
                  switch_time=jnp.arange(8) % 6)
    single = generate(ref, ids, mask, **kwargs)

    kwargs["value_model"] = sharding.place(value, mesh)
    batch = sharding.batch_sharding(mesh, 2)
    out = generate(sharding.place(ref, mesh), jax.device_put(ids, batch), jax.device_put(mask, batch), **kwargs)
    np.testing.assert_array_equal(out.tokens, single.tokens)
    np.testing.assert_allclose(out.kl, single.kl, atol=1e-4)


def test_bad_inputs(ref):
    ids, mask = prompts(2)
    value = token_value_model(np.zeros((V, 11)))
    key = jax.random.key(0)
    kw = dict(key=key, max_new_tokens=2, top_k=4)
    with pytest.raises(ValueError, match="exceeds the cache"):
        generate(ref, ids, mask, key=key, max_new_tokens=4, cache_len=6, top_k=None)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, vocab_size=12\]"):
        generate(ref, ids, mask, key=key, max_new_tokens=2, top_k=13)
    with pytest.raises(ValueError, match="needs a value_model"):
        generate(ref, ids, mask, guidance="qsharp", **kw)
    with pytest.raises(ValueError, match="must be > 0"):
        generate(ref, ids, mask, value_model=value, guidance="qsharp", eta=0.0, **kw)
    other = ValueModel(TransformerConfig(**{**CFG.__dict__, "vocab_size": V + 1}), HeadConfig(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="value model vocabulary"):
        generate(ref, ids, mask, value_model=other, guidance="qsharp", **kw)
    with pytest.raises(ValueError, match="needs a bernoulli value head"):
        generate(ref, ids, mask, value_model=value, guidance="bernoulli", **kw)
    with pytest.raises(ValueError, match="left padded"):
        generate(ref, ids, mask.at[1, -1].set(False), **kw)
    with pytest.raises(ValueError, match="guidance=None"):
        generate(ref, ids, mask, value_model=value, **kw)
    with pytest.raises(ValueError, match="lookahead needs guidance"):
        generate(ref, ids, mask, lookahead=True, **kw)
    with pytest.raises(ValueError, match="lookahead must be an int >= 0"):
        generate(ref, ids, mask, value_model=value, guidance="qsharp", lookahead=-1, **kw)
    learned = ValueModel(TransformerConfig(**{**CFG.__dict__, "positions": "learned"}), HeadConfig(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="beyond the value model's max_positions=64"):
        generate(ref, ids, mask, value_model=learned, guidance="qsharp", lookahead=CFG.max_positions, **kw)
    with pytest.raises(ValueError, match="a Q-type model has none"):
        generate(ref, ids, mask, value_model=token_value_model(np.zeros((V, 11)), q_type=True), guidance="qsharp",
                 lookahead=True, **kw)


@pytest.mark.parametrize("guide,lookahead,eos", [("qsharp", 0, None), ("qsharp", 1, None), ("cd", 1, 3),
                                                ("qsharp", 3, 3), ("cd", 2, None)])
def test_guided_by_a_token_shift_value_model_equals_whole_sequence_guidance(ref, guide, lookahead, eos):
    """A V-type value model with a token shift guides decoding through the KV-cache engine: every
    step's log-probability (and KL) equals the guided policy recomputed from whole sequences (π_ref
    on the prefix, the value model on the prefix followed by each of π_ref's top-k; with a
    ``lookahead`` of d, on the prefix, the candidate, π_ref's d − 1 most likely tokens after it and
    each of π_ref's top-k continuations of those, combined by the Bellman equation of the
    guidance's value; a path through ``eos`` valued at it)."""
    cfg = TransformerConfig(vocab_size=V, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=4,
                            mlp_dim=32, max_positions=64, token_shift=2)
    graphdef, state = nnx.split(ValueModel(cfg, HeadConfig("categorical", 11), rngs=nnx.Rngs(4)))
    value = nnx.merge(graphdef, jax.tree.map(lambda x: x * 4.0, state))  # values far from uniform
    ids, mask = prompts(3, seed=6)
    width = ids.shape[1] + 4 + max(lookahead, 1)  # the longest sequence scored below
    whole_ref, whole_value = at_width(ref, width), at_width(value, width)
    eta, k, steps = 0.2, 4, 4
    atoms = jnp.linspace(0, 1, 11)
    out = generate(ref, ids, mask, key=jax.random.key(5), max_new_tokens=steps, value_model=value, guidance=guide,
                   eta=eta, top_k=k, switch_time=jnp.array([steps, 2, steps]), lookahead=lookahead, eos_id=eos)
    offset = {"qsharp": guidance.qsharp_logit_offset, "cd": guidance.cd_logit_offset}[guide]
    ones = jnp.ones((3, 1), bool)
    reached_eos = []

    def value_of(seq, keep, y):  # the offset of candidates y [3] after seq, as `generate` defines it
        grow = lambda s, kp, tok: (jnp.concatenate([s, tok[:, None]], 1), jnp.concatenate([kp, ones], 1))  # noqa: E731
        seq, keep = grow(seq, keep, y)
        if not lookahead:
            return offset(whole_value(seq, keep)[:, -1], atoms, eta)
        ended, at_end = y == eos, offset(whole_value(seq, keep)[:, -1], atoms, eta)
        for _ in range(lookahead - 1):
            seq, keep = grow(seq, keep, jnp.argmax(whole_ref(seq, keep)[:, -1], -1))
            now = (seq[:, -1] == eos) & ~ended
            at_end = jnp.where(now, offset(whole_value(seq, keep)[:, -1], atoms, eta), at_end)
            ended = ended | now
        top_logits, nxt = jax.lax.top_k(whole_ref(seq, keep)[:, -1], k)
        later = jnp.stack([offset(whole_value(*grow(seq, keep, nxt[:, c]))[:, -1], atoms, eta) for c in range(k)], 1)
        w = jax.nn.softmax(top_logits, axis=-1)
        mixed = jnp.sum(w * later, -1) if guide == "cd" else jnp.log(jnp.sum(w * jnp.exp(later), -1))
        reached_eos.append(np.asarray(ended))
        return jnp.where(ended, at_end, mixed)

    tokens = np.asarray(out.tokens)


    kl = np.zeros(3)
    for t in range(steps):
        seq = jnp.concatenate([ids, jnp.asarray(tokens[:, :t])], 1)
        keep = jnp.concatenate([mask, jnp.ones((3, t), bool)], 1)
        ref_logits = whole_ref(seq, keep)[:, -1]
        cand = jax.lax.top_k(ref_logits, k)[1]
        offsets = jnp.stack([value_of(seq, keep, cand[:, j]) for j in range(k)], 1)
        guided = jnp.where(jnp.array([True, t < 2, True])[:, None], guidance.guided_logits(ref_logits, cand, offsets),
                           ref_logits)
        kth = jnp.sort(guided, axis=-1)[:, -k][:, None]
        log_policy = jax.nn.log_softmax(jnp.where(guided < kth, -jnp.inf, guided), axis=-1)
        active = np.asarray(out.mask[:, t])
        np.testing.assert_allclose(
            np.asarray(out.logprobs[:, t])[active],
            np.take_along_axis(np.asarray(log_policy), tokens[:, t:t + 1], 1)[active, 0], atol=1e-4, err_msg=f"step {t}",
        )
        log_p, log_ref = np.asarray(log_policy, np.float64), np.asarray(jax.nn.log_softmax(ref_logits), np.float64)
        kl += active * np.sum(np.exp(log_p) * np.where(np.isfinite(log_p), log_p - log_ref, 0.0), axis=-1)
    # float32 KL of a policy near π_ref: a sum of p·(log p − log π_ref) whose rounding (~1e-6) varies with
    # the machine's kernels (seen: 8.465e-4 vs 8.474e-4), hence the absolute part
    np.testing.assert_allclose(out.kl, kl, rtol=1e-3, atol=1e-5)
    if eos is not None and lookahead:  # the end-of-sequence rule was exercised
        assert np.any(reached_eos)
    if lookahead:  # the look-ahead changes the policy here: it is not the plain guidance again
        plain = generate(ref, ids, mask, key=jax.random.key(5), max_new_tokens=1, value_model=value, guidance=guide,
                         eta=eta, top_k=k)
        assert np.abs(np.asarray(plain.logprobs) - np.asarray(out.logprobs[:, 0])).max() > 1e-3
