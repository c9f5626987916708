"""Attention to a KV cache over its filled blocks only (``transformer.CACHE_BLOCK``): decoding reads
the slots written so far, rounded up to whole blocks, and gives what attention over the whole
preallocated cache gives."""

import jax
import numpy as np
from flax import nnx
from test_continuous import assert_same_rows, grouped_prompts
from test_rollout import CFG

from qsharp_jax.models import transformer
from qsharp_jax.models.value import HeadConfig, ValueModel
from qsharp_jax.rollout import generate


def test_blocked_cache_attention_equals_the_whole_cache(monkeypatch):
    graphdef, state = nnx.split(transformer.Transformer(CFG, rngs=nnx.Rngs(0)))
    ref = nnx.merge(graphdef, jax.tree.map(lambda x: x * 10.0, state))
    value = ValueModel(CFG, HeadConfig("categorical", 7), rngs=nnx.Rngs(1))
    ids, mask = grouped_prompts(6, 1, seed=4)
    ids, mask = np.pad(ids, ((0, 0), (9, 0))), np.pad(mask, ((0, 0), (9, 0)))  # prompts across blocks
    kwargs = dict(key=jax.random.key(2), max_new_tokens=15, top_k=5, eos_id=3, value_model=value,
                  guidance="qsharp", eta=0.3, switch_time=np.arange(6) * 3)
    runs, jaxprs = {}, {}
    for name, block in (("blocks of 4", 4), ("whole cache", 10**6)):
        monkeypatch.setattr(transformer, "CACHE_BLOCK", block)
        jax.clear_caches()  # the block size is read when the loop is traced
        for lookahead in (0, 2):  # the candidates' pass and the look-ahead paths read the cache too
            runs[name, lookahead] = generate(ref, ids, mask, lookahead=lookahead, **kwargs)
        jaxprs[name] = str(jax.make_jaxpr(lambda: generate(ref, ids, mask, **kwargs))())
    for lookahead in (0, 2):
        assert_same_rows(runs["blocks of 4", lookahead], runs["whole cache", lookahead])
    # the blocked loop picks among 8 cache lengths (prompt 14 + 15 new = 29 slots -> 4, 8, ..., 28, 29)
    assert jaxprs["blocks of 4"].count("cond[") > jaxprs["whole cache"].count("cond[")
    assert "branches=(" in jaxprs["blocks of 4"]
