"""``generate`` against an uncached recomputation, with value models that read the whole context.

Every step of every row is rebuilt from full forwards of its prefix (no KV cache) and from the
recipe in rollout.py's docstring, so a wrong cache entry, a stale value or a skipped forward shows
up as a wrong log-probability or KL. The sampled tokens themselves are taken from ``generate``.
"""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import logsumexp
from test_rollout import CFG, V

from qsharp_jax import guidance as guidance_lib
from qsharp_jax.models.transformer import Transformer
from qsharp_jax.models.value import HeadConfig, ValueModel
from qsharp_jax.rollout import generate

P, N, TOP_K, ATOMS, ETA = 6, 5, 4, 11, 0.3
PROMPT_LENGTHS = np.array([6, 4, 5, 3])  # real tokens per row: rows 1-3 are left padded
SWITCH = np.array([N, 0, 3, 2])  # guided for the whole rollout, never, for part of it
L = P + N  # the longest prefix (P + N - 1 tokens) plus one candidate: one shape for every forward


def scaled(model, factor: float, part: str | None = None):
    """``model`` with all its parameters (or those under attribute ``part``) multiplied by ``factor``."""
    graphdef, state = nnx.split(model)
    if part is None:
        state = jax.tree.map(lambda x: x * factor, state)
    else:
        state[part] = jax.tree.map(lambda x: x * factor, state[part])
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def ref():
    # π_ref peaked enough that top-p cuts, flat enough that most steps keep several tokens
    return scaled(Transformer(CFG, rngs=nnx.Rngs(0)), 3.0)


@functools.cache
def value_model(kind: str, q_type: bool, cls=ValueModel) -> ValueModel:
    """A random value model that reads its context (a sharpened backbone) with a head large enough
    that η = ETA moves the policy a lot (offsets spread over ~1 nat)."""
    model = cls(CFG, HeadConfig(kind, ATOMS, q_type=q_type), rngs=nnx.Rngs(1 + 2 * q_type + (kind == "bernoulli")))
    return scaled(scaled(model, 3.0, "backbone"), 100.0, "head")


def prompts(seed: int):
    """Left-padded ``[4, P]`` ids / mask with PROMPT_LENGTHS real tokens."""
    ids = np.random.default_rng(seed).integers(0, V, size=(len(PROMPT_LENGTHS), P))
    mask = np.arange(P)[None, :] >= (P - PROMPT_LENGTHS)[:, None]
    return jnp.asarray(np.where(mask, ids, 0), jnp.int32), jnp.asarray(mask)


@functools.partial(jax.jit, static_argnums=0)
def _last_position(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)[:, -1]


def last_position(model, seqs: list[np.ndarray]) -> np.ndarray:
    """Full uncached forwards of token sequences, each left padded to L: outputs at their last token,
    float64 ``[M, ...]`` (logits ``[M, V]``; V-type ``[M, (K)]``; Q-type ``[M, V, (K)]``)."""
    ids, mask = np.zeros((len(seqs), L), np.int32), np.zeros((len(seqs), L), bool)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):], mask[i, L - len(s):] = s, True
    return np.asarray(_last_position(*nnx.split(model), ids, mask), np.float64)


def final_log_policy(logits: np.ndarray, top_k: int | None, temperature: float, top_p: float) -> np.ndarray:
    """Temperature, then top-k, then top-p, on full-vocabulary logits ``[V]``: log-probabilities
    ``[V]`` (float64, -inf off the support)."""
    z = logits / temperature
    if top_k is not None:
        z = np.where(z >= np.sort(z)[-top_k], z, -np.inf)
    if top_p < 1:
        order = np.argsort(-z)
        probs = np.exp(z[order] - logsumexp(z))
        before = np.cumsum(probs) - probs  # mass of the better tokens
        assert np.min(np.abs(before[probs > 0] - top_p)) > 1e-4, "nucleus edge within rounding: pick another seed"
        z[order[before >= top_p]] = -np.inf
    return z - logsumexp(z)


def offsets_of(values: np.ndarray, guidance: str) -> np.ndarray:
    values = jnp.asarray(values, jnp.float32)
    if guidance == "bernoulli":
        return np.asarray(guidance_lib.bernoulli_logit_offset(values, ETA), np.float64)
    offset = guidance_lib.qsharp_logit_offset if guidance == "qsharp" else guidance_lib.cd_logit_offset
    return np.asarray(offset(values, jnp.linspace(0.0, 1.0, ATOMS), ETA), np.float64)


def recompute(ref, value, prompt_ids, prompt_mask, tokens, *, guidance, top_k, temperature, top_p):
    """The policy of every step, rebuilt without caches from the sampled ``tokens [B, N]``.

    Returns (log π_t ``[B, N, V]``, log π_ref,t ``[B, N, V]``, unguided log π_t ``[B, N, V]``, the
    guidance's KL(softmax(π_ref logits + offsets) ‖ π_ref) at temperature 1, untruncated ``[B, N]``),
    float64.
    Steps after a row's EOS are computed too (on pad tokens) and must simply be ignored.
    """
    prefixes = [np.concatenate([np.asarray(prompt_ids[b])[np.asarray(prompt_mask[b])], tokens[b, :t]])
                for b in range(len(tokens)) for t in range(N)]  # row-major [B * N]
    ref_logits = last_position(ref, prefixes)  # [B*N, V]
    if value.head_cfg.q_type:  # every next token's value at the prefix's last position
        offsets = offsets_of(last_position(value, prefixes), guidance)  # [B*N, V]
    if top_k is not None:  # guidance on π_ref's top-k tokens only; the rest get the row min
        cand = np.argsort(-ref_logits, axis=-1)[:, :top_k]  # [B*N, k]
        if value.head_cfg.q_type:
            scores = np.take_along_axis(offsets, cand, axis=-1)
        else:  # V-type: the value of the prefix extended by each candidate
            extended = [np.append(p, c) for p, row in zip(prefixes, cand) for c in row]
            scores = offsets_of(last_position(value, extended), guidance).reshape(cand.shape)
        offsets = np.repeat(scores.min(-1, keepdims=True), V, axis=-1)
        np.put_along_axis(offsets, cand, scores, axis=-1)
    guided = (np.arange(N)[None, :] < SWITCH[:, None]).reshape(-1, 1)  # roll-in, then π_ref
    policy = functools.partial(final_log_policy, top_k=top_k, temperature=temperature, top_p=top_p)
    log_pi = np.stack([policy(x) for x in ref_logits + np.where(guided, offsets, 0.0)])
    unguided = np.stack([policy(x) for x in ref_logits])
    log_ref = ref_logits - logsumexp(ref_logits, axis=-1, keepdims=True)
    log_g = ref_logits + offsets - logsumexp(ref_logits + offsets, axis=-1, keepdims=True)
    g_kl = np.where(guided[:, 0], np.sum(np.exp(log_g) * (log_g - log_ref), axis=-1), 0.0)
    return (*(x.reshape(len(tokens), N, V) for x in (log_pi, log_ref, unguided)), g_kl.reshape(len(tokens), N))


# (head kind, Q-type, guidance, top_k, temperature, top_p, eos_id, seed): each is one compilation
CASES = {
    "v-qsharp": ("categorical", False, "qsharp", TOP_K, 0.7, 0.8, None, 0),
    "v-cd": ("categorical", False, "cd", TOP_K, 1.0, 0.8, 5, 1),
    "q-qsharp": ("categorical", True, "qsharp", TOP_K, 0.7, 1.0, None, 2),
    "v-bernoulli": ("bernoulli", False, "bernoulli", TOP_K, 1.3, 1.0, None, 3),
    "q-bernoulli": ("bernoulli", True, "bernoulli", None, 0.7, 0.8, 5, 4),
}


@pytest.mark.parametrize("case", CASES)
def test_guided_rollout_equals_uncached_recompute(ref, case):
    """Log-probabilities, KL and EOS masking of ``generate`` equal the step-by-step uncached policy.

    Guards M1 (V-type: the value cache takes the wrong candidate's keys/values, so later offsets
    are scored in the wrong context) and M2 (Q-type: the value cache is never advanced, so offsets
    after the first step are stale).
    """
    kind, q_type, guidance, top_k, temperature, top_p, eos_id, seed = CASES[case]
    value = value_model(kind, q_type)
    ids, mask = prompts(seed)
    out = generate(ref, ids, mask, key=jax.random.key(seed), max_new_tokens=N, value_model=value, guidance=guidance,
                   eta=ETA, top_k=top_k, temperature=temperature, top_p=top_p, switch_time=jnp.asarray(SWITCH),
                   eos_id=eos_id, pad_id=V - 1)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    log_pi, log_ref, unguided, g_kl = recompute(ref, value, ids, mask, tokens, guidance=guidance, top_k=top_k,
                                          temperature=temperature, top_p=top_p)

    for b in range(len(tokens)):
        ends = np.flatnonzero(tokens[b] == eos_id) if eos_id is not None else []
        n = ends[0] + 1 if len(ends) else N
        assert lengths[b] == n, tokens[b]
        np.testing.assert_array_equal(np.asarray(out.mask[b]), np.arange(N) < n)
        np.testing.assert_array_equal(tokens[b, n:], V - 1)  # pad after EOS
        np.testing.assert_array_equal(np.asarray(out.logprobs[b, n:]), 0.0)
        np.testing.assert_array_equal(np.asarray(out.ref_logprobs[b, n:]), 0.0)
        steps, tok = np.arange(n), tokens[b, :n]
        np.testing.assert_allclose(out.logprobs[b, :n], log_pi[b, steps, tok], atol=1e-4, err_msg=f"row {b}")
        np.testing.assert_allclose(out.ref_logprobs[b, :n], log_ref[b, steps, tok], atol=1e-4, err_msg=f"row {b}")
        pi = np.exp(log_pi[b, :n])
        kl = np.sum(pi * np.where(pi > 0, log_pi[b, :n] - log_ref[b, :n], 0.0))  # 0 log 0 = 0
        np.testing.assert_allclose(out.kl[b], kl, atol=1e-4, rtol=1e-4, err_msg=f"row {b}")
        np.testing.assert_allclose(out.guidance_kl[b], g_kl[b, :n].sum(), atol=1e-4, rtol=1e-4, err_msg=f"row {b}")
    assert np.asarray(out.guidance_kl)[SWITCH == 0].max() == 0 and g_kl.max() > 0.01

    # the checks above have teeth only if guidance matters, top-p cuts and (with EOS) some row ends early
    live = np.arange(N)[None, :] < lengths[:, None]
    tv = 0.5 * np.abs(np.exp(log_pi) - np.exp(unguided)).sum(-1)  # [B, N]
    assert tv[live & (np.arange(N)[None, :] < SWITCH[:, None])].max() > 0.2
    if top_p < 1:
        assert np.any(np.isfinite(log_pi).sum(-1)[live] < (top_k or V))
    if eos_id is not None:
        assert lengths.min() < N


_CALLS = collections.Counter()


class CountingValueModel(ValueModel):
    """Counts the value-model forwards ``generate`` runs. A subclass: its graphdef differs from
    ValueModel's, so it gets its own trace (with the callbacks) rather than a cached one."""

    def extend(self, *args, **kwargs):
        jax.debug.callback(lambda: _CALLS.update(["extend"]))  # runs only where its lax.cond branch runs
        return super().extend(*args, **kwargs)

    def score_candidates(self, *args, **kwargs):
        jax.debug.callback(lambda: _CALLS.update(["score_candidates"]))
        return super().score_candidates(*args, **kwargs)


@pytest.mark.parametrize("q_type", [False, True], ids=["v-type", "q-type"])
def test_value_model_stops_running_after_every_switch_time(ref, q_type):
    """Exact count of value-model forwards over 6 steps, no EOS; s = the largest switch time (>= 1).

    V-type: one ``extend`` (the prefill), and one scoring per step where some row is guided (t < s).
    Q-type: ``extend`` for the prefill, then one advance per step whose next step guides some row
    (t + 1 < s): s in all. Guards M2 (Q-type: the cache is never advanced) and M3 (V-type: the
    skip branch is never taken, so every step scores).
    """
    value = value_model("categorical", q_type, CountingValueModel)
    ids, mask = prompts(5)

    def forwards(switch):
        _CALLS.clear()
        generate(ref, ids, mask, key=jax.random.key(0), max_new_tokens=6, value_model=value, guidance="qsharp",
                 eta=ETA, top_k=TOP_K, switch_time=jnp.asarray(switch))
        jax.effects_barrier()  # debug callbacks may run asynchronously
        return dict(_CALLS)

    def expected(s):
        return {"extend": s} if q_type else {"extend": 1, "score_candidates": s}

    assert forwards([2, 2, 2, 2]) == expected(2)
    assert forwards([0, 2, 4, 1]) == expected(4)  # the last row to switch decides
