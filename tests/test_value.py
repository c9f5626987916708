"""Value models: heads, candidate scoring against the KV cache, loading and sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forward import at_width
from hf_fixtures import make_checkpoint
from qsharp_jax import sharding
from qsharp_jax.models import from_hf
from qsharp_jax.models.value import HeadConfig, ValueModel, check_compatible, value_from_hf, value_from_scratch
from qsharp_jax.rollout import generate


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_checkpoint("llama", path, seed=3)
    return path


def _ids(seed, shape=(3, 9)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 61, size=shape), jnp.int32)


@pytest.mark.parametrize(
    "head,shape",
    [
        (HeadConfig("categorical", 11), (3, 9, 11)),
        (HeadConfig("bernoulli"), (3, 9)),
        (HeadConfig("scalar"), (3, 9)),
        (HeadConfig("categorical", 5, q_type=True), (3, 9, 61, 5)),
        (HeadConfig("bernoulli", q_type=True), (3, 9, 61)),
    ],
)
def test_heads_read_the_pretrained_backbone(llama_dir, head, shape):
    value = value_from_hf(llama_dir, head, seed=1)
    assert not hasattr(value.backbone, "lm_head")  # the LM head is dropped, not stored
    ids = _ids(0)
    out = np.asarray(value(ids))
    assert out.shape == shape and out.dtype == np.float32
    hidden = np.asarray(from_hf(llama_dir).hidden(ids))  # the LM's own hidden states (golden-tested)
    flat = hidden @ np.asarray(value.head.kernel[...]).T + np.asarray(value.head.bias[...])  # kernel is [out, in]
    np.testing.assert_allclose(out, flat.reshape(shape), atol=1e-5, rtol=1e-5)


def test_score_candidates_equals_appending_each(llama_dir):
    value = value_from_hf(llama_dir, HeadConfig("categorical", 11), seed=2)
    ids = _ids(1, (2, 7))
    mask = jnp.asarray([[False, False, True, True, True, True, True], [True] * 7])
    cache = value.init_cache(2, 12)
    _, cache = jax.jit(value.extend)(ids, cache, mask)
    candidates = _ids(2, (2, 4))
    scored = np.asarray(jax.jit(lambda v, c, k: v.score_candidates(c, k))(value, candidates, cache))
    assert scored.shape == (2, 4, 11)
    for j in range(4):
        # appending candidate j to the prompt and running the whole sequence uncached
        full = np.asarray(jax.jit(value)(jnp.concatenate([ids, candidates[:, j : j + 1]], 1), jnp.concatenate([mask, jnp.ones((2, 1), bool)], 1)))
        np.testing.assert_allclose(scored[:, j], full[:, -1], atol=1e-4, rtol=1e-4)


def test_q_type_cannot_score_candidates(llama_dir):
    value = value_from_hf(llama_dir, HeadConfig("categorical", 3, q_type=True))
    with pytest.raises(ValueError, match="score_candidates is for V-type"):
        value.score_candidates(_ids(3, (1, 2)), value.init_cache(1, 4))


def test_sharded_value_models_equal_single_device(llama_dir):
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    head = HeadConfig("categorical", 11, q_type=True)
    ids = _ids(4, (4, 6))
    single, sharded = value_from_hf(llama_dir, head, seed=5), value_from_hf(llama_dir, head, seed=5, mesh=mesh)
    assert tuple(sharded.head.kernel[...].sharding.spec) == (None, "fsdp")  # 61*11 does not divide by 2
    np.testing.assert_allclose(jax.jit(lambda m, i: m(i))(sharded, ids), jax.jit(single)(ids), atol=1e-5)
    cfg = from_hf(llama_dir).cfg
    scratch, scratch_sharded = value_from_scratch(cfg, head, seed=6), value_from_scratch(cfg, head, seed=6, mesh=mesh)
    assert tuple(scratch_sharded.backbone.layers[0].up[...].sharding.spec) == ("tensor", "fsdp")
    np.testing.assert_allclose(jax.jit(lambda m, i: m(i))(scratch_sharded, ids), jax.jit(scratch)(ids), atol=1e-5)


def test_vocabulary_mismatch_and_bad_heads(llama_dir):
    ref = from_hf(llama_dir)
    sized = lambda v, **head: value_from_scratch(ref.cfg.__class__(**{**ref.cfg.__dict__, "vocab_size": v}),  # noqa: E731
                                                HeadConfig(**head))
    with pytest.raises(ValueError, match=r"value model vocabulary \(70\) differs from the reference model's \(61\)"
                                         ".* must be at most π_ref's"):
        check_compatible(ref, sized(70))
    with pytest.raises(ValueError, match=r"\(50\) differs .* must equal π_ref's \(a Q-type head"):
        check_compatible(ref, sized(50, q_type=True))
    check_compatible(ref, value_from_scratch(ref.cfg, HeadConfig()))
    # a V-type model padded less than π_ref (Qwen2.5 1.5B under 7B): guidance draws among its ids only
    smaller = sized(50)
    check_compatible(ref, smaller)
    out = generate(ref, np.ones((16, 2), np.int32), np.ones((16, 2), bool), key=jax.random.key(0), max_new_tokens=6,
                   value_model=smaller, guidance="qsharp", eta=0.5, top_k=20, temperature=3.0)
    assert int(np.max(out.tokens)) < 50 and np.isfinite(np.asarray(out.kl)).all()
    with pytest.raises(ValueError, match="categorical, bernoulli or scalar"):
        HeadConfig("gaussian")
    with pytest.raises(ValueError, match="num_atoms >= 2"):
        HeadConfig("categorical", 1)
    assert isinstance(value_from_scratch(ref.cfg, HeadConfig()), ValueModel)


def test_commit_candidate_equals_extend(llama_dir):
    """Appending a scored candidate from its own keys/values is the same as running extend on it."""
    value = value_from_hf(llama_dir, HeadConfig("categorical", 11), seed=4)
    ids = _ids(5, (2, 6))
    mask = jnp.asarray([[False, True, True, True, True, True], [True] * 6])
    cache = value.init_cache(2, 10)
    extend = jax.jit(value.extend)  # compiled, as decoding runs it (eagerly, it compiles op by op)
    _, cache = extend(ids, cache, mask)
    candidates = _ids(6, (2, 3))
    _, kv = jax.jit(value.score_candidates, static_argnames="return_kv")(candidates, cache, return_kv=True)
    choice = jnp.array([2, 0])
    committed = jax.jit(value.commit_candidate)(cache, kv, choice)
    chosen = jnp.take_along_axis(candidates, choice[:, None], 1)
    _, extended = extend(chosen, cache)
    for a, b in zip(jax.tree.leaves(committed), jax.tree.leaves(extended)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # and the next step sees the same thing
    nxt = _ids(7, (2, 1))
    np.testing.assert_allclose(extend(nxt, committed)[0], extend(nxt, extended)[0], atol=1e-5)


def test_identity_qk_init_sets_only_queries_and_keys():
    """ModelSpec.qk_identity: head h's query and key weights are s × rows h·D … (h+1)·D of the
    identity (q[h, d, e] = s·[h·D + d = e]), their biases 0, every other parameter the random init;
    bad uses are refused."""
    from flax import nnx

    from qsharp_jax.models.build import ModelSpec, build_reference, build_value
    from qsharp_jax.models.transformer import Transformer, TransformerConfig, identity_qk

    spec = ModelSpec(architecture="gpt2", vocab_size=11, hidden_size=16, num_layers=2, num_heads=4, mlp_dim=32,
                     max_positions=16, seed=3)
    head = HeadConfig("categorical", 5)
    plain, shaped = build_value(spec, head), build_value(dataclasses.replace(spec, qk_identity=3.0), head)
    h, d, e = 4, 4, 16
    expected = np.zeros((h, d, e))
    for i in range(h):
        for j in range(d):
            expected[i, j, i * d + j] = 3.0
    changed = {"q", "k", "q_bias", "k_bias"}
    for a, b in zip(plain.backbone.layers, shaped.backbone.layers):
        for name in ("q", "k"):
            np.testing.assert_array_equal(np.asarray(getattr(b, name)[...]), expected)
            np.testing.assert_array_equal(np.asarray(getattr(b, f"{name}_bias")[...]), 0)
        for name, var in vars(a).items():
            if isinstance(var, nnx.Param) and name not in changed:
                np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(getattr(b, name)[...]))
    ref = build_reference(dataclasses.replace(spec, architecture="llama", qk_identity=0.5))
    np.testing.assert_array_equal(np.asarray(ref.layers[0].k[...]), expected / 6)
    with pytest.raises(ValueError, match="qk_identity=1.0 shapes a fresh model"):
        ModelSpec(hf_path="/some/checkpoint", qk_identity=1.0)
    with pytest.raises(ValueError, match="qk_identity must be >= 0"):
        ModelSpec(qk_identity=-1.0)
    gqa = TransformerConfig(vocab_size=11, hidden_size=16, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=4,
                            mlp_dim=32, max_positions=16)
    with pytest.raises(ValueError, match="num_kv_heads == num_heads"):
        identity_qk(Transformer(gqa, rngs=nnx.Rngs(0)), 3.0)


def test_token_shift_adds_the_embedding_of_the_real_token_n_back():
    """TransformerConfig.token_shift = n: position t's input gains shift_embed[token at t − n]
    (nothing where there is no real token that far back). Checked against the same model without
    the option whose word embedding carries the shift by hand (one token type per position), and
    left padding changes nothing."""
    from flax import nnx

    from qsharp_jax.models.build import ModelSpec, build_reference

    spec = ModelSpec(architecture="gpt2", vocab_size=7, hidden_size=16, num_layers=2, num_heads=4, mlp_dim=32,
                     max_positions=16, seed=3)
    shifted, plain = build_reference(dataclasses.replace(spec, token_shift=2)), build_reference(spec)
    ids = np.array([[1, 4, 2, 6, 4, 0]])
    # by hand: a vocabulary of (token, token 2 back) pairs, one per position, embedded as the sum
    pairs = [(int(t), int(ids[0, i - 2]) if i >= 2 else None) for i, t in enumerate(ids[0])]
    table = np.stack([np.asarray(shifted.embed[...])[t] + (0 if b is None else np.asarray(shifted.shift_embed[...])[b])
                      for t, b in pairs])
    plain.embed = nnx.Param(jnp.asarray(table))
    for a, b in zip(shifted.layers, plain.layers):  # same seed: every other parameter is equal already
        for name, var in vars(a).items():
            if isinstance(var, nnx.Param):
                np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(getattr(b, name)[...]))
    by_hand = jax.jit(plain.hidden)(jnp.arange(len(pairs))[None])
    np.testing.assert_allclose(np.asarray(jax.jit(shifted.hidden)(jnp.asarray(ids))), np.asarray(by_hand), atol=1e-5)
    padded = np.concatenate([np.full((1, 3), 5), ids], axis=1)
    mask = np.arange(padded.shape[1])[None] >= 3
    np.testing.assert_allclose(np.asarray(jax.jit(shifted.hidden)(jnp.asarray(padded), jnp.asarray(mask)))[:, 3:],
                               np.asarray(by_hand), atol=1e-5)
    with pytest.raises(ValueError, match="token_shift must be >= 0"):
        dataclasses.replace(shifted.cfg, token_shift=-1)


@pytest.mark.parametrize("n", [0, 1, 3])
def test_cached_paths_equal_whole_sequences(n):
    """The KV-cache engine, with a token shift of n or none: prefill, decoding with inactive rows,
    candidate scoring, paths (chains extended in two calls, and siblings after them), committing a candidate and Bellman branches
    each equal the whole-sequence forward of the same real tokens (interior padding included: the
    shift reads real tokens)."""
    from qsharp_jax.models.build import ModelSpec, build_reference

    model = build_reference(ModelSpec(architecture="gpt2", vocab_size=9, hidden_size=16, num_layers=2, num_heads=4,
                                      mlp_dim=32, max_positions=24, seed=5, token_shift=n))
    # compiled, as the decoding loop runs them (eagerly, each call would compile op by op)
    extend_hidden, commit_candidate, branches_hidden = (jax.jit(f) for f in (
        model.extend_hidden, model.commit_candidate, model.branches_hidden))
    candidates_hidden = jax.jit(model.candidates_hidden, static_argnames="return_kv")
    paths_hidden = jax.jit(model.paths_hidden, static_argnames="siblings")
    rng = np.random.default_rng(8)
    ids = jnp.asarray(rng.integers(0, 9, (2, 5)), jnp.int32)
    mask = jnp.asarray([[False, False, True, True, True], [True] * 5])

    whole = at_width(model.hidden, 16)

    def last(tokens, keep):  # whole-sequence hidden state at the last real token
        h = whole(tokens, keep)
        return np.asarray(h)[np.arange(len(keep)), np.asarray(keep).shape[1] - 1 - np.argmax(np.asarray(keep)[:, ::-1], 1)]

    h, cache = extend_hidden(ids, model.init_cache(2, 12), mask)
    np.testing.assert_allclose(np.asarray(h)[np.asarray(mask)], np.asarray(whole(ids, mask))[np.asarray(mask)],
                               atol=1e-5)
    seq, keep = np.asarray(ids), np.asarray(mask)
    for step, active in enumerate([[True, False], [True, True], [False, True]]):  # row 0 pauses, then row 1
        token = jnp.asarray(rng.integers(0, 9, (2, 1)), jnp.int32)
        h, cache = extend_hidden(token, cache, jnp.asarray(active)[:, None])
        seq, keep = np.concatenate([seq, token], 1), np.concatenate([keep, np.array(active)[:, None]], 1)
        rows = np.array(active)
        np.testing.assert_allclose(np.asarray(h)[rows, 0], last(seq, keep)[rows], atol=1e-5, err_msg=f"step {step}")
    candidates = jnp.asarray(rng.integers(0, 9, (2, 4)), jnp.int32)
    scored, kv = candidates_hidden(candidates, cache, return_kv=True)
    for j in range(4):
        appended = np.concatenate([seq, candidates[:, j:j + 1]], 1), np.concatenate([keep, np.ones((2, 1), bool)], 1)
        np.testing.assert_allclose(np.asarray(scored)[:, j], last(*appended), atol=1e-5)
    # paths: a chain of 2 tokens, extended by 1 more, then 3 siblings after it
    chains = jnp.asarray(rng.integers(0, 9, (2, 4, 3)), jnp.int32)
    first, path = paths_hidden(chains[:, :, :2], cache)
    second, path = paths_hidden(chains[:, :, 2:], cache, path)
    np.testing.assert_array_equal(path[2], chains)
    siblings = jnp.asarray(rng.integers(0, 9, (2, 4, 3)), jnp.int32)
    after, same = paths_hidden(siblings, cache, path, siblings=True)
    assert after.shape == (2, 4, 3, 16) and same[2].shape == (2, 4, 3)
    along = np.concatenate([np.asarray(first), np.asarray(second)], 2)
    for j in range(4):
        for t in range(3):
            appended = np.concatenate([seq, chains[:, j, :t + 1]], 1), np.concatenate([keep, np.ones((2, t + 1), bool)], 1)
            np.testing.assert_allclose(along[:, j, t], last(*appended), atol=1e-5, err_msg=f"path {j}, token {t}")
            appended = (np.concatenate([seq, chains[:, j], siblings[:, j, t:t + 1]], 1),
                        np.concatenate([keep, np.ones((2, 4), bool)], 1))
            np.testing.assert_allclose(np.asarray(after)[:, j, t], last(*appended), atol=1e-5,
                                       err_msg=f"path {j}, sibling {t}")
    choice = jnp.array([3, 1])
    committed = commit_candidate(cache, kv, choice)
    _, extended = extend_hidden(jnp.take_along_axis(candidates, choice[:, None], 1), cache)
    for a, b in zip(jax.tree.leaves(committed), jax.tree.leaves(extended)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    if n:
        np.testing.assert_array_equal(committed.recent[1, -1], candidates[1, 1])
    branch_ids = jnp.asarray(rng.integers(0, 9, (*seq.shape, 2)), jnp.int32)
    hidden, branches = branches_hidden(jnp.asarray(seq), jnp.asarray(keep), branch_ids)
    np.testing.assert_allclose(np.asarray(hidden)[keep], np.asarray(whole(seq, keep))[keep],
                               atol=1e-5)
    for t in range(seq.shape[1]):
        for j in range(2):
            prefix = np.concatenate([seq[:, :t + 1], branch_ids[:, t, j:j + 1]], 1)
            prefix_keep = np.concatenate([keep[:, :t + 1], np.ones((2, 1), bool)], 1)
            rows = keep[:, :t + 1].any(1)
            np.testing.assert_allclose(np.asarray(branches)[rows, t, j], last(prefix, prefix_keep)[rows], atol=1e-5,
                                       err_msg=f"branch {j} after position {t}")
