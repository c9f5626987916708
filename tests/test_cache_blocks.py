"""Attention to a KV cache over its filled blocks only (``transformer.CACHE_BLOCK``): decoding reads
the slots written so far (a ring: back to the longest live row's first slot), rounded up to whole
blocks, and gives what attention over the whole preallocated cache gives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_continuous import assert_same_rows, grouped_prompts
from test_rollout import CFG

from qsharp_jax.models import transformer
from qsharp_jax.models.cache import ENDED, refill
from qsharp_jax.models.value import HeadConfig, ValueModel
from qsharp_jax.rollout import generate


@pytest.mark.parametrize("batching", [{}, dict(slots=3, refill=1), dict(slots=4, refill=2)],
                         ids=["static", "ring, refills of 1", "ring, refills of 2"])
def test_blocked_cache_attention_equals_the_whole_cache(monkeypatch, batching):
    graphdef, state = nnx.split(transformer.Transformer(CFG, rngs=nnx.Rngs(0)))
    ref = nnx.merge(graphdef, jax.tree.map(lambda x: x * 10.0, state))
    value = ValueModel(CFG, HeadConfig("categorical", 7), rngs=nnx.Rngs(1))
    ids, mask = grouped_prompts(6, 1, seed=4)
    if not batching:  # prompts across blocks (in a ring a row's padding is the oldest slots: not this)
        ids, mask = np.pad(ids, ((0, 0), (9, 0))), np.pad(mask, ((0, 0), (9, 0)))
    kwargs = dict(key=jax.random.key(2), max_new_tokens=15, top_k=5, eos_id=3, value_model=value,
                  guidance="qsharp", eta=0.3, switch_time=np.arange(6) * 3)
    runs, jaxprs = {}, {}
    for name, block in (("blocks of 4", 4), ("whole cache", 10**6)):
        monkeypatch.setattr(transformer, "CACHE_BLOCK", block)
        jax.clear_caches()  # the block size is read when the loop is traced
        for lookahead in (0, 2):  # the candidates' pass and the look-ahead paths read the cache too
            runs[name, lookahead] = generate(ref, ids, mask, lookahead=lookahead, **kwargs, **batching)
        jaxprs[name] = str(jax.make_jaxpr(lambda: generate(ref, ids, mask, **kwargs))())
    for lookahead in (0, 2):
        assert_same_rows(runs["blocks of 4", lookahead], runs["whole cache", lookahead])
        if batching:  # and rows decoded in a ring (wrapped around, refilled at any step) are the static loop's
            monkeypatch.setattr(transformer, "CACHE_BLOCK", 10**6)
            assert_same_rows(runs["blocks of 4", lookahead], generate(ref, ids, mask, lookahead=lookahead, **kwargs))
    # the blocked loop picks among 8 cache lengths (prompt 14 + 15 new = 29 slots -> 4, 8, ..., 28, 29)
    assert jaxprs["blocks of 4"].count("cond[") > jaxprs["whole cache"].count("cond[")
    assert "branches=(" in jaxprs["blocks of 4"]


def test_a_ring_reads_back_to_its_longest_live_row(monkeypatch):
    """``_over_filled`` on a ring of 10 slots in blocks of 4: the last ``need`` slots before ``end``,
    wrapping, rounded up to a block (all slots at most); in order, the first ``end`` slots."""
    k = jnp.broadcast_to(jnp.arange(10.0)[None, None, :, None], (1, 1, 10, 1))  # key s holds s
    mask = jnp.ones((1, 1, 10), bool)

    def read(k, v, m):  # which slots fn was given
        return jnp.zeros(10).at[k[0, 0, :, 0].astype(int)].add(m[0, 0])

    monkeypatch.setattr(transformer, "CACHE_BLOCK", 4)

    def got(*window):
        return np.flatnonzero(np.asarray(transformer._over_filled(read, k, k, mask, *map(jnp.int32, window))))

    np.testing.assert_array_equal(got(2, 3), [0, 1, 8, 9])  # slots 9, 0, 1, rounded up to 8, 9, 0, 1
    np.testing.assert_array_equal(got(7, 5), [0, 1, 2, 3, 4, 5, 6, 9])  # 8 slots: 9, 0, ..., 6
    np.testing.assert_array_equal(got(7, 9), np.arange(10))  # 12 is more than the ring: all of it
    np.testing.assert_array_equal(got(3, -5), [0, 1, 2, 9])  # no live row: the smallest block
    np.testing.assert_array_equal(got(5), np.arange(8))  # in order: slots 0..4 rounded up to 8


def test_a_ring_row_that_writes_padding_ends():
    """A ring row that writes padding drops out (no slot attended, ``start`` ENDED): the window is
    the live rows' span. A real token after the end starts a sequence without context."""
    model = transformer.Transformer(CFG, rngs=nnx.Rngs(0))
    _, cache = model.extend(jnp.array([[1, 2, 3], [4, 5, 6]]), model.init_cache(2, 8))
    cache = cache.replace(ring=True)
    _, cache = model.extend(jnp.array([[7], [8]]), cache, jnp.array([[True], [False]]))
    np.testing.assert_array_equal(cache.start, [0, ENDED])
    assert not np.asarray(cache.kv_mask[1]).any() and np.asarray(cache.kv_mask[0]).sum() == 4
    assert int(model._filled(cache)[1]) == 4  # row 0's 4 slots
    logits, cache = model.extend(jnp.array([[7], [9]]), cache)
    np.testing.assert_array_equal(cache.start, [0, 4])
    alone, _ = model.extend(jnp.array([[9]]), model.init_cache(1, 8).replace(positions=jnp.array([3])))
    np.testing.assert_allclose(logits[1], alone[0], rtol=1e-5, atol=1e-6)
    # row 0 ends, row 1 takes a 3-token prompt: the window is those 3 slots, then 4 with the next token
    _, cache = model.extend(jnp.array([[7], [9]]), cache, jnp.array([[False], [True]]))
    _, fresh = model.extend(jnp.array([[5, 6, 7], [5, 6, 7]]), model.init_cache(2, 3))
    cache = refill(cache, fresh, jnp.array([-1, 0]))
    np.testing.assert_array_equal(cache.start, [ENDED, int(cache.index) - 3])
    assert int(model._filled(cache)[1]) == 3
    logits, cache = model.extend(jnp.array([[8], [8]]), cache, jnp.array([[False], [True]]))
    assert int(model._filled(cache)[1]) == 4
    alone, _ = model.extend(jnp.array([[5, 6, 7, 8]]), model.init_cache(1, 8))
    np.testing.assert_allclose(logits[1, 0], alone[0, -1], rtol=1e-5, atol=1e-6)
