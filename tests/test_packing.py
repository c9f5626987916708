"""Packed value-model fitting: rows packed end to end with segment ids give every row the states of
its forward alone, and the loss and gradients of the padded batch of the same rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsharp_jax import objectives
from qsharp_jax.models.transformer import TransformerConfig
from qsharp_jax.models.value import HeadConfig, ValueModel
from qsharp_jax.packing import BATCH_KEYS, SHARED_BATCH_KEYS, pack_rows


def rows(seed=0, n=7, t=12, vocab=32):
    """Left-padded prompts followed by responses that end early (mask False after), long-tailed lengths."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (n, t)).astype(np.int32)
    start = rng.integers(0, 4, n)  # left padding
    end = np.minimum(t, start + 2 + rng.geometric(0.25, n))  # where the response stops
    at = np.arange(t)
    mask = (at >= start[:, None]) & (at < end[:, None])
    loss_mask = mask & (at >= start[:, None] + 2)  # the response, after a 2-token prompt
    return {"tokens": tokens, "attention_mask": mask, "loss_mask": loss_mask,
            "rewards": rng.integers(0, 2, n).astype(np.float32)}


def model(q_type=False, token_shift=2, positions="rope"):
    cfg = TransformerConfig(vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                            mlp_dim=64, max_positions=32, token_shift=token_shift, positions=positions)
    graphdef, state = nnx.split(ValueModel(cfg, HeadConfig("categorical", 11, q_type=q_type), rngs=nnx.Rngs(3)))
    return nnx.merge(graphdef, jax.tree.map(lambda x: x * 3.0, state))  # outputs far from uniform


def assert_same_loss_and_gradients(value, data, packed_batch):
    """The value loss and its gradients on the packed batch equal those on the padded rows."""
    grad = jax.jit(nnx.value_and_grad(lambda m, b: objectives.value_loss(m, b)[0]))
    (loss, g) = grad(value, {k: jnp.asarray(v) for k, v in data.items()})
    packed_loss, packed_g = grad(value, packed_batch)
    assert float(packed_loss) == pytest.approx(float(loss), rel=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.state(g, nnx.Param)), jax.tree.leaves(nnx.state(packed_g, nnx.Param))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-4)


def test_packing_keeps_every_row_whole_and_fills_sequences():
    data = rows()
    packed = pack_rows(data, 16)
    lengths = data["attention_mask"].sum(1)
    assert packed["tokens"].shape[1] == 16 and len(packed["tokens"]) == -(-lengths.sum() // 16)  # no wasted sequence here
    for r in range(len(lengths)):  # each row once, contiguous, its real tokens in order
        where = packed["rows"] == r
        p = np.flatnonzero(where.any(1))
        assert len(p) == 1
        np.testing.assert_array_equal(packed["tokens"][p[0]][where[p[0]]], data["tokens"][r][data["attention_mask"][r]])
        np.testing.assert_array_equal(packed["loss_mask"][p[0]][where[p[0]]],
                                      data["loss_mask"][r][data["attention_mask"][r]])
        assert (packed["returns"][p[0]][where[p[0]]] == data["rewards"][r]).all()
        assert len(np.unique(packed["segment_ids"][p[0]][where[p[0]]])) == 1
    assert (packed["attention_mask"] == (packed["rows"] >= 0)).all()
    assert (packed["segment_ids"][~packed["attention_mask"]] == 0).all()
    with pytest.raises(ValueError, match=r"row \d has 1\d tokens, more than the pack length 8; raise the pack length"):
        pack_rows(data, 8)


@pytest.mark.parametrize("kind", ["v_rope_shift", "q_learned"])
def test_packed_rows_equal_their_forward_alone_and_the_padded_loss_and_gradients(kind):
    value = model(q_type=kind.startswith("q"), token_shift=2 if "shift" in kind else 0,
                  positions="rope" if "rope" in kind else "learned")
    data = rows(seed=1)
    packed = pack_rows(data, 16)
    alone = jax.jit(lambda m, x, k: m(x, k))(value, data["tokens"], data["attention_mask"])
    together = jax.jit(lambda m, x, k, s: m(x, k, s))(value, packed["tokens"], packed["attention_mask"],
                                                    packed["segment_ids"])
    for r in range(len(data["tokens"])):
        where = packed["rows"] == r
        p = np.flatnonzero(where.any(1))[0]
        np.testing.assert_allclose(np.asarray(together[p][where[p]]), np.asarray(alone[r][data["attention_mask"][r]]),
                                   atol=2e-5, rtol=1e-4)
    assert_same_loss_and_gradients(value, data, {k: jnp.asarray(packed[k]) for k in BATCH_KEYS})


def grouped_rows(seed=2, groups=3, samples=4, t=14, vocab=32):
    """``samples`` rows per prompt: one left-padded prompt per group, then responses of several
    lengths; rows fit from the last prompt token, as Algorithm 1's roll-outs from switch time 0."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(1, vocab, (groups, 4))
    pad = rng.integers(0, 2, groups)
    tokens = rng.integers(1, vocab, (groups * samples, t)).astype(np.int32)
    tokens[:, :4] = np.repeat(prompt, samples, axis=0)
    group = np.repeat(np.arange(groups), samples)
    start = pad[group]
    end = np.minimum(t, 4 + 1 + rng.geometric(0.2, groups * samples))
    at = np.arange(t)
    mask = (at >= start[:, None]) & (at < end[:, None])
    loss_mask = mask & (at >= 3)  # from the last prompt token on
    loss_mask[0, 3:6] = False  # one row rolled in for 2 tokens more: its fit starts later
    return {"tokens": tokens, "attention_mask": mask, "loss_mask": loss_mask,
            "rewards": rng.integers(0, 2, groups * samples).astype(np.float32)}, group


def test_shared_prompts_are_laid_out_once_and_every_row_keeps_its_tokens():
    data, group = grouped_rows()
    packed = pack_rows(data, 20, groups=group)
    plain = pack_rows(data, 20)
    assert packed["attention_mask"].sum() < plain["attention_mask"].sum()  # fewer tokens to encode
    lengths = data["attention_mask"].sum(1)
    prefix_of = {}
    for p in range(len(packed["tokens"])):
        for segment in np.unique(packed["segment_ids"][p][packed["attention_mask"][p]]):
            where = packed["segment_ids"][p] == segment
            branches = packed["branch_ids"][p][where]
            shared = packed["tokens"][p][where][branches == 0]
            assert not packed["loss_mask"][p][where][branches == 0].any()  # no fitted token is shared
            for b in np.unique(branches[branches > 0]):
                r = packed["rows"][p][where][branches == b][0]
                row = data["tokens"][r][data["attention_mask"][r]]
                # the prefix then the branch is the row's real tokens, fitted where the row is
                np.testing.assert_array_equal(np.concatenate([shared, packed["tokens"][p][where][branches == b]]), row)
                fit = packed["loss_mask"][p][where][(branches == 0) | (branches == b)]
                np.testing.assert_array_equal(fit, data["loss_mask"][r][data["attention_mask"][r]])
                prefix_of[r] = len(shared)
    assert sorted(prefix_of) == list(range(len(lengths)))  # every row once
    assert max(prefix_of.values()) == 3  # the prompt but its last token (fitted) is shared
    with pytest.raises(ValueError, match=r"groups must be \[N\]"):
        pack_rows(data, 20, groups=group[:3])


@pytest.mark.parametrize("kind", ["v_rope_shift", "v_learned"])
def test_shared_prompts_give_the_padded_states_loss_and_gradients(kind):
    value = model(token_shift=2 if "shift" in kind else 0, positions="rope" if "rope" in kind else "learned")
    data, group = grouped_rows(seed=3)
    packed = pack_rows(data, 24, groups=group)
    alone = jax.jit(lambda m, x, k: m(x, k))(value, data["tokens"], data["attention_mask"])
    together = jax.jit(lambda m, x, k, s, b: m(x, k, s, b))(value, packed["tokens"], packed["attention_mask"],
                                                          packed["segment_ids"], packed["branch_ids"])
    checked = 0
    for p in range(len(packed["tokens"])):  # each fitted token's state is the one of its row alone
        for q in np.flatnonzero(packed["loss_mask"][p]):
            r = packed["rows"][p, q]
            same = (packed["segment_ids"][p] == packed["segment_ids"][p, q]) & (
                (packed["branch_ids"][p] == 0) | (packed["branch_ids"][p] == packed["branch_ids"][p, q]))
            place = same[: q + 1].sum() - 1  # its index among its row's real tokens
            np.testing.assert_allclose(np.asarray(together[p, q]),
                                       np.asarray(alone[r][data["attention_mask"][r]][place]), atol=2e-5, rtol=1e-4)
            checked += 1
    assert checked == (data["loss_mask"] & data["attention_mask"]).sum()
    packed_batch = {k: jnp.asarray(packed[k]) for k in SHARED_BATCH_KEYS}
    assert_same_loss_and_gradients(value, data, packed_batch)
    with pytest.raises(ValueError, match="a Q-type model reads each token's value at the token before it"):
        objectives.value_loss(model(q_type=True), packed_batch)
