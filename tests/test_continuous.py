"""Continuous batching (``generate(..., slots=)``) and prompts shared by their samples
(``samples_per_prompt``): each row is drawn exactly as by the static loop, whichever slot decodes
it and whenever it starts; the distributions are the policy's; switch times hold per row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_rollout import CFG, V, chi2_pvalue, token_value_model

from qsharp_jax import sharding
from qsharp_jax.models.transformer import Transformer, TransformerConfig
from qsharp_jax.models.value import HeadConfig, ValueModel
from qsharp_jax.rollout import generate

FIELDS = ("tokens", "mask", "lengths")


@pytest.fixture(scope="module")
def ref():
    graphdef, state = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
    return nnx.merge(graphdef, jax.tree.map(lambda x: x * 10.0, state))  # far from uniform


def grouped_prompts(groups: int, share: int, seed: int = 0, length: int = 5):
    """Left-padded prompts of several lengths, each repeated ``share`` times (row r: prompt r // share)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (groups, length)).astype(np.int32)
    mask = np.arange(length)[None] >= rng.integers(0, length - 1, groups)[:, None]
    return np.repeat(ids, share, axis=0), np.repeat(mask, share, axis=0)


def assert_same_rows(a, b):
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    for f in ("logprobs", "ref_logprobs", "kl", "guidance_kl"):  # float reassociation only
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=1e-4, atol=1e-5, err_msg=f)


VALUE_CFG = TransformerConfig(vocab_size=V, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8,
                              mlp_dim=16, max_positions=64, token_shift=1)


@pytest.mark.parametrize("setting", ["plain", "v_type", "q_type", "lookahead", "token_shift_rope"])
def test_continuous_rows_equal_the_static_loop(ref, setting):
    """Rows whose lengths vary (EOS), more rows than slots, refills of several sizes, switch times
    per row: every row's tokens equal the static loop's, log-probs and exact KL up to rounding."""
    ids, mask = grouped_prompts(12, 2, seed=1)
    n = len(ids)
    kwargs = dict(key=jax.random.key(3), max_new_tokens=9, eos_id=3, top_k=5, temperature=0.8)
    switch = np.random.default_rng(2).integers(0, 10, n)
    if setting == "v_type":
        kwargs.update(value_model=ValueModel(CFG, HeadConfig("categorical", 7), rngs=nnx.Rngs(1)), guidance="qsharp",
                      eta=0.3, switch_time=switch, top_p=0.9, max_lengths=np.random.default_rng(3).integers(1, 10, n))
    elif setting == "q_type":
        kwargs.update(value_model=ValueModel(CFG, HeadConfig("categorical", 7, q_type=True), rngs=nnx.Rngs(2)),
                      guidance="cd", eta=0.3, switch_time=switch)
    elif setting == "lookahead":
        kwargs.update(value_model=ValueModel(CFG, HeadConfig("bernoulli", 1), rngs=nnx.Rngs(3)), guidance="bernoulli",
                      eta=0.5, switch_time=switch, lookahead=2)
    elif setting == "token_shift_rope":
        graphdef, state = nnx.split(ValueModel(VALUE_CFG, HeadConfig("categorical", 7), rngs=nnx.Rngs(4)))
        kwargs.update(value_model=nnx.merge(graphdef, jax.tree.map(lambda x: x * 3.0, state)), guidance="qsharp",
                      eta=0.2)
    static = generate(ref, ids, mask, **kwargs)
    lengths = np.asarray(static.lengths)
    if "max_lengths" in kwargs:  # a row's budget ends it unless EOS came first
        unlimited = np.asarray(generate(ref, ids, mask, **{**kwargs, "max_lengths": None}).lengths)
        np.testing.assert_array_equal(lengths, np.minimum(unlimited, kwargs["max_lengths"]))
        assert np.any(lengths < unlimited)
    assert 1 < lengths.min() < lengths.max() == 9 or lengths.min() == 1  # rows of several lengths
    assert len(set(lengths.tolist())) >= 3
    for extra in (dict(slots=8, refill=2), dict(slots=6, refill=6), dict(slots=4, refill=2, samples_per_prompt=2),
                  dict(slots=1, refill=1), dict(samples_per_prompt=2)):
        assert_same_rows(generate(ref, ids, mask, **kwargs, **extra), static)


def test_continuous_first_and_second_tokens_follow_the_policy(ref):
    """Chi-square on a tiny model: rows decoded after refills (any slot, any ring offset) draw the
    first token from the tempered policy and the second from it given the first; each row's KL is
    the exact sum of its steps' KL(π_t ‖ π_ref,t)."""
    ids = np.asarray(np.random.default_rng(5).integers(0, V, (1, 5)), np.int32)
    n, temperature = 2400, 4.0
    logits = ref(jnp.asarray(ids))[0, -1]
    eos = int(np.argmax(logits))
    out = generate(ref, np.repeat(ids, n, 0), np.ones((n, 5), bool), key=jax.random.key(4), max_new_tokens=3,
                   eos_id=eos, top_k=None, temperature=temperature, slots=16, refill=4)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    assert (lengths == 1).mean() > 0.05 and (lengths == 3).mean() > 0.05, np.bincount(lengths)  # refills at many steps
    later = slice(16, None)  # rows that started in a refilled slot

    def policy(logits):
        log_p = jax.nn.log_softmax(logits / temperature)
        kl = jnp.sum(jnp.exp(log_p) * (log_p - jax.nn.log_softmax(logits)))
        return np.asarray(jnp.exp(log_p), np.float64), float(kl)

    probs, kl_first = policy(logits)
    assert chi2_pvalue(np.bincount(tokens[later, 0], minlength=V), probs) > 1e-3
    first = int(np.argsort(np.bincount(tokens[later, 0], minlength=V))[-2])  # the commonest first token but EOS
    rows = np.flatnonzero((tokens[:, 0] == first) & (lengths > 1))
    rows = rows[rows >= 16]
    second, kl_second = policy(ref(jnp.asarray(np.concatenate([ids, [[first]]], 1)))[0, -1])
    counts = np.bincount(tokens[rows, 1], minlength=V)
    keep = second * len(rows) >= 5  # chi-square needs expected counts >= 5: pool the rest
    assert chi2_pvalue(np.append(counts[keep], counts[~keep].sum()), np.append(second[keep], second[~keep].sum())) > 1e-3
    kl = np.asarray(out.kl)
    np.testing.assert_allclose(kl[lengths == 1], kl_first, rtol=1e-4)
    two = rows[tokens[rows, 1] == eos]  # first, then EOS
    assert len(two) > 0
    np.testing.assert_allclose(kl[two], kl_first + kl_second, rtol=1e-4)


@pytest.mark.parametrize("q_type", [False, True])
def test_continuous_switch_times_hold_per_row(ref, q_type):
    """A value model that wants token 7: rows are guided exactly for their first switch_time
    tokens and follow π_ref after, whichever slot decodes them and whoever shares the step."""
    value_logits = np.full((V, 11), -30.0)
    value_logits[:, 0] = 0.0
    value_logits[7] = -30.0
    value_logits[7, -1] = 0.0
    value = token_value_model(value_logits, q_type=q_type)
    ids, mask = grouped_prompts(24, 1, seed=6)
    switch = np.random.default_rng(7).integers(0, 9, len(ids))
    kwargs = dict(key=jax.random.key(5), max_new_tokens=8, top_k=V, eos_id=2)
    out = generate(ref, ids, mask, value_model=value, guidance="qsharp", eta=0.02, switch_time=switch, slots=4,
                   refill=1, **kwargs)
    unguided = generate(ref, ids, mask, value_model=value, guidance="qsharp", eta=0.02,
                        switch_time=np.zeros(len(ids), int), slots=4, refill=1, **kwargs)
    tokens, lp, ref_lp = map(np.asarray, (out.tokens, out.logprobs, out.ref_logprobs))
    for b, h in enumerate(switch):
        assert np.all(tokens[b, :h] == 7), (b, h, tokens[b])
        np.testing.assert_allclose(lp[b, h:], ref_lp[b, h:], atol=1e-5)  # π_ref after the switch
        assert (out.guidance_kl[b] > 0) == (h > 0) and (out.kl[b] > 0) == (h > 0)
        if h == 0:  # never guided: the row it is when no row is guided
            np.testing.assert_array_equal(tokens[b], np.asarray(unguided.tokens)[b])


def test_continuous_on_a_mesh_equals_one_device(ref):
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    value = token_value_model(np.random.default_rng(9).normal(size=(V, 11)))
    ids, mask = grouped_prompts(8, 2, seed=9)
    kwargs = dict(key=jax.random.key(9), max_new_tokens=6, guidance="qsharp", eta=0.3, top_k=4, eos_id=3,
                  switch_time=np.arange(16) % 6, slots=8, refill=4, samples_per_prompt=2)
    single = generate(ref, ids, mask, value_model=value, **kwargs)
    rows = sharding.batch_sharding(mesh, 2)
    on_mesh = dict(value_model=sharding.place(value, mesh), **kwargs)
    ids, mask, ref = jax.device_put(ids, rows), jax.device_put(mask, rows), sharding.place(ref, mesh)
    out = generate(ref, ids, mask, **on_mesh)
    np.testing.assert_array_equal(out.tokens, single.tokens)
    on_mesh.pop("slots"), on_mesh.pop("refill")
    assert_same_rows(out, generate(ref, ids, mask, **on_mesh))  # the static loop on the same mesh


def test_bad_batching_inputs(ref):
    ids, mask = grouped_prompts(4, 2)
    base = dict(key=jax.random.key(0), max_new_tokens=4, top_k=None)
    cases = [
        (dict(slots=8, cache_len=7), "exceeds the cache"),  # a slot holds prompt + max_new_tokens tokens
        (dict(slots=3, samples_per_prompt=2), "slots must be a positive multiple of samples_per_prompt=2"),
        (dict(slots=0), "slots must be a positive multiple"),
        (dict(slots=4, refill=6), r"refill must be a multiple of samples_per_prompt=1 in \[1, slots=4\]"),
        (dict(slots=4, refill=3, samples_per_prompt=2), "refill must be a multiple of samples_per_prompt=2"),
        (dict(refill=2), "refill is for continuous batching: set slots too"),
        (dict(samples_per_prompt=3), "8 rows are not groups of samples_per_prompt=3"),
        (dict(samples_per_prompt=4), "the rows of a group are not copies of one prompt"),
        (dict(samples_per_prompt=0), "samples_per_prompt must be an int >= 1"),
        (dict(max_lengths=np.array([1, 2, 3, 4, 5, 1, 1, 1])), r"max_lengths must be in \[1, max_new_tokens=4\], got "
                                                                 "values from 1 to 5"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            generate(ref, ids, mask, **base, **extra)


def test_a_ring_cache_takes_one_token_per_call(ref):
    cache = ref.init_cache(2, 8).replace(ring=True)
    with pytest.raises(ValueError, match="a ring cache takes one token per call"):
        ref.extend(jnp.ones((2, 3), jnp.int32), cache)


def test_continuous_slots_stay_split_over_the_mesh():
    """On an 8-way data mesh each device holds its share of the slots' caches, as in the static
    loop (the slots are gathered from the queue; unconstrained, XLA kept every slot on every
    device: 8x the cache memory). Also when traced under jit, the mesh taken from jax.set_mesh."""
    cfg = TransformerConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=32,
                            mlp_dim=64, max_positions=128)
    mesh = sharding.make_mesh(data=8)
    ref = sharding.place(Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
    value = sharding.place(ValueModel(cfg, HeadConfig("categorical", 5), rngs=nnx.Rngs(1)), mesh)
    (ref_graph, ref_state), (value_graph, value_state) = nnx.split(ref), nnx.split(value)

    def temporaries(rows: int, **batching) -> int:
        ids = jax.ShapeDtypeStruct((rows, 16), jnp.int32, sharding=sharding.batch_sharding(mesh, 2))
        mask = jax.ShapeDtypeStruct((rows, 16), jnp.bool_, sharding=sharding.batch_sharding(mesh, 2))

        def run(r, v, i, m):
            return generate(nnx.merge(ref_graph, r), i, m, key=jax.random.key(0), max_new_tokens=112, top_k=4,
                            value_model=nnx.merge(value_graph, v), guidance="qsharp", **batching)

        with jax.set_mesh(mesh):
            compiled = jax.jit(run).lower(ref_state, value_state, ids, mask).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    cache = 2 * 2 * 2 * 2 * 128 * 32 * 4  # per row: two models' k and v, 2 layers, 2 heads, 128 slots, 32 floats
    static, continuous = temporaries(32), temporaries(128, slots=32, refill=8)
    # measured: static 1.2 MB, continuous 2.2 MB (the queue's outputs, the refill's caches), unconstrained 9.6 MB
    assert continuous < 2.5 * static
    assert continuous < 32 * cache  # below every slot's caches on one device (4.2 MB)
