"""One jitted sampling loop for plain and value-guided decoding.

``generate`` prefills the reference model (and the value model, when guiding) on a left-padded
prompt batch, then runs a single ``lax.while_loop`` that, per step:

1. takes π_ref's next-token logits from its KV cache;
2. for sequences still inside their roll-in (generated tokens < ``switch_time``), adds the value
   model's offsets to π_ref's top-k candidates — a V-type model scores them in one forward
   against its own KV cache, a Q-type model reads their values from its last position (every
   token's, without ``top_k``);
3. applies temperature, top-k and top-p to that final policy and samples;
4. appends the token to both caches (a V-type model's cache takes the chosen candidate's keys and
   values from step 2, with no second forward), records log-probabilities and the exact per-step
   KL(π_t ‖ π_ref,t) over the full next-token distributions.

The loop stops as soon as every sequence has emitted EOS. Once every sequence has passed its switch
time, the value model is no longer run. Everything is deterministic given ``key`` and each row's id.

With ``slots`` (continuous batching) the same step runs over a fixed number of slots while the rows
wait in a queue: a slot whose row has ended is refilled with the next row (its prompt prefilled into
the slot's part of ring-buffer caches) inside the same compiled loop, so long rows do not hold a
batch of finished ones. Row r draws with the same keys either way. With ``samples_per_prompt`` S,
rows come in groups of S copies of a prompt, and each group's prompt is prefilled once.

π_ref,t in ``ref_logprobs`` and ``kl`` is the reference model's own next-token distribution
(softmax of its logits, no temperature or truncation): the KL is to π_ref itself.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
from typing import Any, Callable, Literal

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from tqdm import tqdm

from qsharp_jax import _validate, distributed, failpoints
from qsharp_jax import sharding as sharding_lib
from qsharp_jax import guidance as guidance_lib
from qsharp_jax.models import cache as cache_lib
from qsharp_jax.models.cache import KVCache
from qsharp_jax.models.transformer import Transformer
from qsharp_jax.models.value import ValueModel, check_compatible

Guidance = Literal["qsharp", "cd", "bernoulli"]
PER_ROW = ("switch_time", "max_lengths")  # generate's per-row arguments, which generate_chunked splits with the rows


@struct.dataclass
class Rollout:
    """Sampled continuations.

    Attributes:
      tokens: int32 ``[B, N]``; ``pad_id`` after EOS.
      mask: bool ``[B, N]``, True for generated tokens up to and including EOS.
      ref_logprobs: float32 ``[B, N]``, log π_ref of each sampled token (0 where masked).
      logprobs: float32 ``[B, N]``, log-probability under the policy actually sampled from.
      guidance_kl: float32 ``[B]``, Σ_t KL(π_g,t ‖ π_ref,t) with π_g,t = softmax(π_ref's logits +
        the value offsets) at temperature 1, before top-k / top-p (the paper's Table-1 KL:
        :func:`~qsharp_jax.guidance.guidance_kl`); 0 for π_ref and after the switch time.
      kl: float32 ``[B]``, Σ_t KL(π_t ‖ π_ref,t) over full next-token distributions.
      lengths: int32 ``[B]``, number of generated tokens (EOS included).
      finite: bool ``[B]``, False where some step's policy had NaN log-probabilities (a value
        model that outputs NaN or inf): that row's tokens, log-probs and KL mean nothing.
    """

    tokens: jax.Array
    mask: jax.Array
    ref_logprobs: jax.Array
    logprobs: jax.Array
    kl: jax.Array
    lengths: jax.Array
    finite: jax.Array
    guidance_kl: jax.Array


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static decoding settings (hashable: part of the jit cache key)."""

    max_new_tokens: int
    cache_len: int
    guidance: Guidance | None
    q_type: bool
    top_k: int | None  # candidates scored by the value model and the final top-k filter
    temperature: float
    top_p: float
    eos_id: int | None
    pad_id: int
    always_guided: bool  # no switch time: skip the per-step check whether guidance is still needed
    lookahead: int  # V-type: each candidate's value read this many π_ref steps later (0: at the candidate)
    share: int = 1  # rows come in groups of this many copies of one prompt, prefilled once per group
    slots: int | None = None  # continuous batching: rows decoded at once (None: the static loop)
    refill: int = 0  # continuous batching: slots prefilled together once that many are free
    mesh: jax.sharding.Mesh | None = None  # continuous batching on a mesh: the slots' state is laid out on it


def generate(
    ref_model: Transformer,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    *,
    key: jax.Array,
    max_new_tokens: int,
    value_model: ValueModel | None = None,
    guidance: Guidance | None = None,
    eta: float = 1.0,
    top_k: int | None = 20,
    temperature: float = 1.0,
    top_p: float = 1.0,
    switch_time: jax.Array | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    atoms: jax.Array | None = None,
    cache_len: int | None = None,
    row_ids: jax.Array | None = None,
    lookahead: int = 0,
    samples_per_prompt: int = 1,
    slots: int | None = None,
    refill: int | None = None,
    max_lengths: jax.Array | None = None,
) -> Rollout:
    """Sample ``max_new_tokens`` tokens after left-padded prompts, plain or value-guided.

    Args:
      ref_model: π_ref.
      prompt_ids, prompt_mask: ``[B, P]`` int32 / bool, left padded (every row ends with a real token).
      key: PRNG key; row b samples with ``fold_in(key, row_ids[b])``, so the same key and row id
        give the same tokens whatever other rows share the batch.
      value_model: needed when ``guidance`` is set; must share π_ref's vocabulary.
      guidance: None (plain π_ref), ``"qsharp"``/``"cd"`` (categorical head), ``"bernoulli"``.
      eta: KL coefficient η > 0 (paper's convention; the official code's flag is 1/η).
      top_k: the final policy is truncated to its top-k; guidance scores π_ref's top-k tokens (the
        paper's candidates, for V-type and Q-type models alike) and samples among them, whatever
        ``guided_logits``' ``others`` rule would give the rest. ``None``: no truncation (plain,
        or a Q-type model guiding every token).
      temperature, top_p: applied to the final (guided) policy, as in the paper.
      switch_time: int ``[B]``: sequence b is guided for its first ``switch_time[b]`` generated
        tokens and follows π_ref after (Algorithm 1's roll-in / roll-out). None = always guided.
      eos_id, pad_id: a sequence ends after emitting ``eos_id``; later slots hold ``pad_id``.
      atoms: float ``[K]`` of a categorical head; default the head's own (``HeadConfig.atoms``).
      cache_len: KV-cache slots; default ``P + max_new_tokens``.
      row_ids: int ``[B]``, each row's identity for the random draws (default ``arange(B)``); a
        caller that splits a batch into chunks passes the global row numbers.
      lookahead: d >= 1: a V-type value model's candidates are valued d π_ref steps later.
        Candidate y is followed by π_ref's most likely d − 1 tokens g (none for d = 1), and its
        offset combines the values of x y g c over π_ref's top-k continuations c (probabilities
        renormalized over them) by the Bellman equation of the guidance's own value —
        exp(Q(x, y)/η) = Σ_c π̃_ref(c | x y g) E_{p(x y g c)}[exp(Z/η)] for ``"qsharp"`` /
        ``"bernoulli"``, the π̃_ref-weighted mean for ``"cd"``: the same value up to π_ref's mass
        outside its top-k continuations (and, for d > 1, off its most likely path g), read where
        the model may have learned it better. A path that reaches ``eos_id`` is valued at it.
        Costs d·k more π_ref tokens and (d − 1 + k)·k value tokens per guided step.
        ``True`` is 1; 0 / ``False``: each candidate is valued where it stands.
      samples_per_prompt: S >= 1: rows come in groups of S copies of one prompt (Algorithm 1's
        samples of a prompt: row r is prompt r // S); each group is prefilled once and its caches
        copied, so prompt tokens cost one forward instead of S. B must be a multiple of S.
      slots: continuous batching. None: the B rows decode together until the longest has ended
        (the static loop). An int: ``slots`` rows decode at once and the other rows wait in a
        queue; once ``refill`` slots have finished (EOS or ``max_new_tokens``), the next
        ``refill`` rows are prefilled into them inside the compiled loop, so the device does not
        decode finished rows while long ones run. Each row is drawn exactly as by the static loop
        (its keys, switch time and η are its own), so the two give the same rows up to float
        rounding. The caches are rings of ``cache_len`` slots; a multiple of S.
      refill: rows prefilled per refill (a multiple of S, at most ``slots``); default about a
        quarter of the slots. Smaller: slots wait less for company, more prefill calls.
      max_lengths: int ``[B]`` in [1, max_new_tokens]: row b ends after ``max_lengths[b]`` tokens
        if it has not emitted EOS (a per-row budget); None: ``max_new_tokens`` for every row.
    """
    prompt_ids, prompt_mask = jnp.asarray(prompt_ids), jnp.asarray(prompt_mask).astype(bool)
    chex.assert_rank(prompt_ids, 2, custom_message="prompt_ids must be [batch, prompt_len]")
    chex.assert_shape(prompt_mask, prompt_ids.shape, custom_message="prompt_mask must have prompt_ids' shape")
    batch, prompt_len = prompt_ids.shape
    vocab = ref_model.cfg.vocab_size
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cache_len = prompt_len + max_new_tokens if cache_len is None else cache_len
    if prompt_len + max_new_tokens > cache_len:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} exceeds the cache ({cache_len} slots)"
        )
    if top_k is not None and not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must be in [1, vocab_size={vocab}] or None, got {top_k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    _validate.check_value(
        lambda m: (~jnp.all(m[:, -1]),), "prompts must be left padded: the last prompt column must be real tokens",
        prompt_mask,
    )
    if guidance is not None:
        if value_model is None:
            raise ValueError(f"guidance={guidance!r} needs a value_model")
        if guidance not in ("qsharp", "cd", "bernoulli"):
            raise ValueError(f'guidance must be None, "qsharp", "cd" or "bernoulli", got {guidance!r}')
        check_compatible(ref_model, value_model)
        _validate.check_eta(eta)
        kind = value_model.head_cfg.kind
        needed = "bernoulli" if guidance == "bernoulli" else "categorical"
        if kind != needed:
            raise ValueError(f"guidance={guidance!r} needs a {needed} value head, the value model has {kind!r}")
        if not value_model.head_cfg.q_type and top_k is None:
            raise ValueError("a V-type value model scores π_ref's top_k candidates: set top_k")
        if guidance != "bernoulli":
            k_atoms = value_model.head_cfg.num_atoms
            # numpy: its checks run here, once, even when `generate` itself is being traced
            atoms = np.asarray(value_model.head_cfg.atoms if atoms is None else atoms, np.float32)
            _validate.check_atoms(atoms)
            if atoms.shape != (k_atoms,):
                raise ValueError(f"atoms has shape {atoms.shape}, the value head has {k_atoms} atoms")
        if lookahead and value_model.head_cfg.q_type:
            raise ValueError("lookahead values a V-type model's candidates some π_ref steps later; a Q-type model "
                             "has none")
    elif value_model is not None:
        raise ValueError("a value_model was given but guidance=None; pass guidance='qsharp' (or 'cd', 'bernoulli')")
    if isinstance(lookahead, bool):
        lookahead = int(lookahead)
    if not isinstance(lookahead, (int, np.integer)) or lookahead < 0:
        raise ValueError(f"lookahead must be an int >= 0 (π_ref steps), got {lookahead!r}")
    lookahead = int(lookahead)
    if lookahead and guidance is None:
        raise ValueError("lookahead needs guidance and a V-type value_model")
    if lookahead:
        for name, model in (("π_ref", ref_model.cfg), ("the value model", value_model.backbone.cfg)):
            need = prompt_len + max_new_tokens + lookahead
            if model.positions == "learned" and need > model.max_positions:
                raise ValueError(
                    f"lookahead={lookahead} reads positions up to {need - 1}, beyond {name}'s max_positions="
                    f"{model.max_positions} (prompt {prompt_len} + max_new_tokens {max_new_tokens} + lookahead); "
                    "lower lookahead or max_new_tokens"
                )
    always_guided = switch_time is None
    if switch_time is None:
        switch_time = jnp.full((batch,), max_new_tokens, jnp.int32)
    switch_time = jnp.asarray(switch_time, jnp.int32)
    chex.assert_shape(switch_time, (batch,), custom_message="switch_time must be [batch]")
    if max_lengths is None:
        max_lengths = jnp.full((batch,), max_new_tokens, jnp.int32)
    max_lengths = jnp.asarray(max_lengths, jnp.int32)
    chex.assert_shape(max_lengths, (batch,), custom_message="max_lengths must be [batch]")
    _validate.check_value(
        lambda m: (jnp.any((m < 1) | (m > max_new_tokens)), jnp.min(m), jnp.max(m)),
        f"max_lengths must be in [1, max_new_tokens={max_new_tokens}], got values from {{}} to {{}}", max_lengths,
    )
    row_ids = jnp.arange(batch, dtype=jnp.int32) if row_ids is None else jnp.asarray(row_ids, jnp.int32)
    chex.assert_shape(row_ids, (batch,), custom_message="row_ids must be [batch]")

    share, slots, refill = _check_batching(prompt_ids, prompt_mask, samples_per_prompt, slots, refill)
    spec = _Spec(
        max_new_tokens=max_new_tokens, cache_len=cache_len, guidance=guidance,
        q_type=bool(value_model is not None and value_model.head_cfg.q_type), top_k=top_k,
        temperature=float(temperature), top_p=float(top_p), eos_id=eos_id, pad_id=pad_id,
        always_guided=always_guided, lookahead=lookahead, share=share, slots=slots, refill=refill,
        mesh=None if slots is None else _mesh_of(ref_model) or sharding_lib.context_mesh(),
    )
    ref_graph, ref_state = nnx.split(ref_model)
    value_graph, value_state = nnx.split(value_model) if value_model is not None else (None, None)
    loop = _generate if slots is None else _generate_continuous
    return loop(
        ref_graph, ref_state, value_graph, value_state, prompt_ids.astype(jnp.int32), prompt_mask, key, row_ids,
        switch_time, max_lengths, jnp.asarray(eta, jnp.float32), None if atoms is None else jnp.asarray(atoms),
        spec=spec,
    )


def _check_batching(prompt_ids, prompt_mask, samples_per_prompt, slots, refill) -> tuple[int, int | None, int]:
    """``(share, slots, refill)`` of :func:`generate`'s batching arguments, checked."""
    batch = prompt_ids.shape[0]
    share = samples_per_prompt
    if not isinstance(share, (int, np.integer)) or share < 1:
        raise ValueError(f"samples_per_prompt must be an int >= 1, got {share!r}")
    share = int(share)
    if batch % share:
        raise ValueError(f"{batch} rows are not groups of samples_per_prompt={share} (row r is prompt r // {share}); "
                         "pass whole groups")
    if share > 1:
        groups = lambda x: x.reshape(batch // share, share, -1)  # noqa: E731
        _validate.check_value(
            lambda i, m: (jnp.any((groups(i) != groups(i)[:, :1]) | (groups(m) != groups(m)[:, :1])),),
            f"samples_per_prompt={share}: the rows of a group are not copies of one prompt (row r must be prompt "
            f"r // {share}); repeat each prompt {share} times (np.repeat(prompts, {share}, axis=0))",
            prompt_ids, prompt_mask,
        )
    if slots is None:
        if refill is not None:
            raise ValueError("refill is for continuous batching: set slots too")
        return share, None, 0
    if not isinstance(slots, (int, np.integer)) or slots < 1 or slots % share:
        raise ValueError(f"slots must be a positive multiple of samples_per_prompt={share}, got {slots!r}")
    slots = int(slots)
    if refill is None:
        refill = max(share, slots // 4 // share * share)
    if not isinstance(refill, (int, np.integer)) or not share <= refill <= slots or refill % share:
        raise ValueError(f"refill must be a multiple of samples_per_prompt={share} in [{share}, slots={slots}], "
                         f"got {refill!r}")
    return share, slots, int(refill)


def truncate(
    logits: jax.Array, *, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """The sampling distribution of ``logits`` ``[..., V]`` after temperature, top-k and top-p.

    Returns ``(log_policy, ids)``, both ``[..., C]``: the candidates' token ids, best first when
    truncated (C = k with top-k, else V), and their log-probabilities (``-inf`` for candidates
    top-p drops; the best token always stays). Exactly k tokens survive top-k, ties broken by
    ``lax.top_k``. The decoding loop samples from this, and
    :func:`qsharp_jax.objectives.sampled_kl` measures it, so both see one truncation.
    """
    values, ids = _candidates(logits / temperature, top_k, top_p)
    return _nucleus(values, top_p), ids


def _candidates(logits: jax.Array, top_k: int | None, top_p: float) -> tuple[jax.Array, jax.Array]:
    """(values, ids) ``[..., C]`` of tempered logits ``[..., V]``: top-k (C = k) or, with no top-k,
    the whole vocabulary (sorted only when top-p needs it)."""
    vocab = logits.shape[-1]
    if top_k is not None and top_k < vocab:
        return jax.lax.top_k(logits, top_k)
    if top_p < 1.0:
        ids = jnp.argsort(-logits, axis=-1)
        return jnp.take_along_axis(logits, ids, axis=-1), ids
    return logits, jnp.broadcast_to(jnp.arange(vocab), logits.shape)


def _nucleus(values: jax.Array, top_p: float) -> jax.Array:
    """Log-probabilities over candidates ``[..., C]`` sorted best first, after top-p."""
    if top_p < 1.0:
        probs = jax.nn.softmax(values, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the better tokens
        values = jnp.where(before < top_p, values, -jnp.inf)  # the best token always stays
    # the same formula with and without guidance, so that an untouched policy has exactly zero KL
    return values - jax.nn.logsumexp(values, axis=-1, keepdims=True)


def _draw(log_policy: jax.Array, ids: jax.Array, ref_at_ids: jax.Array, ref_lse: jax.Array, keys: jax.Array):
    """Sample among candidates.

    Args:
      log_policy: ``[B, C]`` the final policy's log-probabilities of the candidates (from
        :func:`_nucleus`); ids: ``[B, C]`` their token ids; ref_at_ids: π_ref's raw logits there;
        ref_lse: ``[B]`` logsumexp of π_ref's full logits; keys: ``[B]`` one PRNG key per row.

    Returns:
      (choice ``[B]`` index into C, token, log π(token), log π_ref(token), KL(π_t ‖ π_ref,t)).
      The KL is exact: a truncated policy has no mass, hence no KL terms, off its candidates.
    """
    log_ref = ref_at_ids - ref_lse[:, None]
    choice = jax.vmap(jax.random.categorical)(keys, log_policy)
    probs = jnp.exp(log_policy)
    kl = jnp.sum(jnp.where(probs > 0, probs * (log_policy - log_ref), 0.0), axis=-1)
    kl = jnp.maximum(kl, 0.0)  # KL >= 0; only float rounding could say otherwise
    pick = lambda x: jnp.take_along_axis(x, choice[:, None], axis=-1)[:, 0]  # noqa: E731
    return choice, pick(ids).astype(jnp.int32), pick(log_policy), pick(log_ref), kl


@struct.dataclass
class _Models:
    """What one decoding step reads and updates for every row."""

    ref_logits: jax.Array  # float32 [B, V]: π_ref's next-token logits
    ref_cache: KVCache  # π_ref's keys and values
    value_cache: KVCache | None  # the value model's (None: plain decoding)
    value_out: jax.Array | None  # Q-type: the value head at the last position, [B, V, ...]; else None


@struct.dataclass
class _Sampled:
    """One decoding step's draw, per row ``[B]``."""

    token: jax.Array  # int32; pad_id for inactive rows
    logprob: jax.Array  # log π(token) under the sampled (guided, truncated) policy
    ref_logprob: jax.Array  # log π_ref(token)
    kl: jax.Array  # KL(π_t ‖ π_ref,t), exact
    guidance_kl: jax.Array  # KL(π_g,t ‖ π_ref,t) before truncation (0 where not guided)
    bad: jax.Array  # bool: the policy had NaN log-probabilities


@dataclasses.dataclass(frozen=True)
class _Decoder:
    """The models and settings of one traced decoding loop, and the steps both loops share."""

    ref: Transformer
    value: ValueModel | None
    spec: _Spec
    eta: jax.Array
    atoms: jax.Array | None

    @property
    def v_type(self) -> bool:
        return self.value is not None and not self.spec.q_type

    def prefill(self, prompt_ids: jax.Array, prompt_mask: jax.Array, cache_len: int) -> _Models:
        """Both models over left-padded prompts ``[R, P]`` into fresh caches of ``cache_len`` slots,
        the heads at the last position only; with ``spec.share`` S, rows come in groups of S copies
        of one prompt and each group is prefilled once (its caches repeated S times)."""
        share = self.spec.share
        if share > 1:
            prompt_ids, prompt_mask = prompt_ids[::share], prompt_mask[::share]
        batch = prompt_ids.shape[0]
        ref_logits, ref_cache = self.ref.extend(prompt_ids, self.ref.init_cache(batch, cache_len), prompt_mask,
                                                last_only=True)
        value_cache = value_out = None
        if self.value is not None:
            value_out, value_cache = self.value.extend(prompt_ids, self.value.init_cache(batch, cache_len),
                                                       prompt_mask, last_only=True)
            value_out = value_out[:, 0] if self.spec.q_type else None
        models = _Models(ref_logits[:, 0], ref_cache, value_cache, value_out)
        if share > 1:  # every per-row leaf repeated; the shared slot index stays a scalar
            models = jax.tree.map(lambda x: jnp.repeat(x, share, axis=0) if x.ndim else x, models)
        return models

    def offsets_of(self, values):  # η and the atoms were validated in `generate`: no checks in the loop
        return guidance_lib.UNCHECKED_OFFSETS[self.spec.guidance](values, self.atoms, self.eta)

    def ahead(self, ref_cache, value_cache, cand, values, kv):
        """float ``[B, k]``: each candidate's offset read ``lookahead`` π_ref steps later (see `generate`)."""
        ref, value, spec, offsets_of = self.ref, self.value, self.spec, self.offsets_of
        vocab = value.vocab_size
        h, ref_path = ref.paths_hidden(cand[:, :, None], ref_cache)
        chain = [cand]
        for _ in range(spec.lookahead - 1):  # π_ref's most likely tokens up to the last step
            chain.append(jnp.argmax(ref.logits(h[:, :, -1])[..., :vocab], axis=-1).astype(jnp.int32))
            h, ref_path = ref.paths_hidden(chain[-1][:, :, None], ref_cache, ref_path)
        next_logits, next_ids = jax.lax.top_k(ref.logits(h[:, :, -1])[..., :vocab], spec.top_k)
        log_w = jax.nn.log_softmax(next_logits, axis=-1)  # π_ref renormalized over its top-k
        path = (tuple(x[:, :, :, None] for x in kv[0]), tuple(x[:, :, :, None] for x in kv[1]), cand[:, :, None])
        chain_values = values[:, :, None]  # [B, k, lookahead, ...]
        if len(chain) > 1:
            more, path = value.score_paths(jnp.stack(chain[1:], axis=2), value_cache, path)
            chain_values = jnp.concatenate([chain_values, more], axis=2)
        later = offsets_of(value.score_paths(next_ids, value_cache, path, siblings=True)[0])  # [B, k, k]
        if spec.guidance == "cd":  # a mean: the π_ref-weighted mean of the means
            out = jnp.sum(jnp.exp(log_w) * later, axis=-1)
        else:  # a log moment-generating function: log Σ_c π̃(c) exp(offset_c)
            out = jax.nn.logsumexp(log_w + later, axis=-1)
        if spec.eos_id is None:
            return out
        # a path that has ended is valued at its end-of-sequence token: nothing after it is sampled
        ended = jnp.stack(chain, axis=2) == spec.eos_id  # [B, k, lookahead]
        first = jnp.argmax(ended, axis=2).reshape(*cand.shape, 1, *([1] * (chain_values.ndim - 3)))
        at_end = offsets_of(jnp.take_along_axis(chain_values, first, axis=2)[:, :, 0])
        return jnp.where(jnp.any(ended, axis=2), at_end, out)

    def candidates(self, m: _Models, guide_now):
        """Guidance on π_ref's top-k: guided logits there (+ a V-type model's K/V of each candidate).

        A V-type model scores the candidates in one forward against its cache; a Q-type model's
        values are read at their ids. Sampling within these k is exact for both of
        ``guided_logits``' ``others`` modes: every candidate's guided logit is >= any other token's
        (offsets >= their row minimum, π_ref logits >= the k-th), so the final top-k of the guided
        policy is this same set.
        """
        value, spec, offsets_of = self.value, self.spec, self.offsets_of
        ref_logits, batch = m.ref_logits, m.ref_logits.shape[0]
        # ids the value model has (its vocabulary may be padded less than π_ref's: a static slice)
        ref_top, cand = jax.lax.top_k(ref_logits[:, : value.vocab_size], spec.top_k)

        def score():
            if spec.q_type:  # [B, V, ...] -> [B, k, ...]
                at = cand.reshape(*cand.shape, *([1] * (m.value_out.ndim - 2)))
                return jnp.where(guide_now[:, None], offsets_of(jnp.take_along_axis(m.value_out, at, axis=1)), 0.0), None
            values, kv = value.score_candidates(cand, m.value_cache, return_kv=True)
            if not spec.lookahead:
                return jnp.where(guide_now[:, None], offsets_of(values), 0.0), kv
            return jnp.where(guide_now[:, None], self.ahead(m.ref_cache, m.value_cache, cand, values, kv), 0.0), kv

        def skip():  # no row is guided now: the value model is not needed
            shape = (batch, value.backbone.cfg.num_kv_heads, spec.top_k, value.backbone.cfg.head_dim)
            zeros = tuple(jnp.zeros(shape, m.value_cache.k[0].dtype) for _ in m.value_cache.k)
            return jnp.zeros(cand.shape, jnp.float32), (zeros, zeros, cand)

        if spec.always_guided or spec.q_type:
            offsets, kv = score()
        else:
            offsets, kv = jax.lax.cond(jnp.any(guide_now), score, skip)
        g_kl = guidance_lib.guidance_kl(ref_top, jax.nn.logsumexp(ref_logits, axis=-1), offsets)
        values = (ref_top + offsets) / spec.temperature
        if spec.top_p == 1.0:
            return _nucleus(values, 1.0), cand, ref_top, None, kv, g_kl
        order = jnp.argsort(-values, axis=-1)  # best first, for top-p
        take = lambda x: jnp.take_along_axis(x, order, axis=-1)  # noqa: E731
        return _nucleus(take(values), spec.top_p), take(cand), take(ref_top), order, kv, g_kl

    def step(self, m: _Models, t, active, guide_now, guide_next, row_keys) -> tuple[_Models, _Sampled]:
        """Sample every row's next token and append it to both caches.

        Args:
          t: int32 ``[B]``, tokens each row has generated (the step's key is ``fold_in(row_key, t)``);
          active: bool ``[B]``, rows still decoding (the others append padding); guide_now:
          ``[B]`` rows guided at this token; guide_next: ``[B]`` rows guided at the next one (a
          Q-type model's cache is only advanced while some row needs it); row_keys: ``[B]``.
        """
        spec, ref, value = self.spec, self.ref, self.value
        ref_logits = m.ref_logits
        batch = ref_logits.shape[0]
        ref_lse = jax.nn.logsumexp(ref_logits, axis=-1)
        g_kl = jnp.zeros((batch,), jnp.float32)
        order = kv = None
        if self.v_type or (spec.guidance is not None and spec.top_k is not None):
            log_policy, ids, ref_at_ids, order, kv, g_kl = self.candidates(m, guide_now)
        else:
            policy_logits = ref_logits
            if spec.guidance is not None:  # Q-type without top_k: every token guided
                policy_logits = jnp.where(guide_now[:, None], ref_logits + self.offsets_of(m.value_out), ref_logits)
                log_g = jax.nn.log_softmax(policy_logits, axis=-1)
                g_kl = jnp.sum(jnp.exp(log_g) * (log_g - jax.nn.log_softmax(ref_logits, axis=-1)), axis=-1)
            log_policy, ids = truncate(policy_logits, temperature=spec.temperature, top_k=spec.top_k,
                                       top_p=spec.top_p)
            ref_at_ids = jnp.take_along_axis(ref_logits, ids, axis=-1)
        choice, token, logprob, ref_logprob, kl = _draw(
            log_policy, ids, ref_at_ids, ref_lse, jax.vmap(jax.random.fold_in)(row_keys, t)
        )
        token = jnp.where(active, token, spec.pad_id)
        sampled = _Sampled(token=token, logprob=logprob, ref_logprob=ref_logprob, kl=kl,
                           guidance_kl=jnp.where(guide_now, g_kl, 0.0),
                           bad=active & jnp.any(jnp.isnan(log_policy), axis=-1))
        ref_logits, ref_cache = ref.extend(token[:, None], m.ref_cache, active[:, None])
        value_cache, value_out = m.value_cache, m.value_out
        if self.v_type:
            # the chosen candidate's keys/values are already computed: no second forward
            chosen = choice if order is None else jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
            value_cache = value.commit_candidate(value_cache, kv, chosen, active)
        elif value is not None:
            # a Q-type model needs the token's forward, while some sequence may still be guided
            def advance():
                out_, cache_ = value.extend(token[:, None], value_cache, active[:, None])
                return out_[:, 0], cache_

            value_out, value_cache = jax.lax.cond(jnp.any(guide_next), advance, lambda: (value_out, value_cache))
        return _Models(ref_logits[:, 0], ref_cache, value_cache, value_out), sampled


def _empty_out(rows: int, n: int, pad_id: int) -> dict[str, jax.Array]:
    return {
        "tokens": jnp.full((rows, n), pad_id, jnp.int32),
        "mask": jnp.zeros((rows, n), bool),
        "logprobs": jnp.zeros((rows, n), jnp.float32),
        "ref_logprobs": jnp.zeros((rows, n), jnp.float32),
        "kl": jnp.zeros((rows,), jnp.float32),
        "guidance_kl": jnp.zeros((rows,), jnp.float32),
        "finite": jnp.ones((rows,), bool),
    }


def _record(out: dict, rows: jax.Array, t: jax.Array, x: _Sampled, active: jax.Array) -> dict:
    """``out`` with step ``t [B]`` of the slots decoding ``rows [B]`` written (rows out of range: dropped)."""
    at = dict(mode="drop")
    return {
        "tokens": out["tokens"].at[rows, t].set(x.token, **at),
        "mask": out["mask"].at[rows, t].set(active, **at),
        "logprobs": out["logprobs"].at[rows, t].set(jnp.where(active, x.logprob, 0.0), **at),
        "ref_logprobs": out["ref_logprobs"].at[rows, t].set(jnp.where(active, x.ref_logprob, 0.0), **at),
        "kl": out["kl"].at[rows].add(jnp.where(active, x.kl, 0.0), **at),
        "guidance_kl": out["guidance_kl"].at[rows].add(x.guidance_kl, **at),
        "finite": out["finite"].at[rows].set(out["finite"].at[rows].get(mode="fill", fill_value=True) & ~x.bad, **at),
    }


def _rollout(out: dict) -> Rollout:
    return Rollout(lengths=jnp.sum(out["mask"], axis=1, dtype=jnp.int32), **out)


@struct.dataclass
class _StaticState:
    """The static loop's carry: every row starts together and the batch decodes until all ended."""

    t: jax.Array  # int32 []: tokens generated so far (every row)
    models: _Models
    out: dict  # the Rollout fields being written, [B, N] / [B]
    done: jax.Array  # bool [B]: the row emitted EOS


@functools.partial(jax.jit, static_argnames=("ref_graph", "value_graph", "spec"))
def _generate(ref_graph, ref_state, value_graph, value_state, prompt_ids, prompt_mask, key, row_ids, switch_time,
              max_lengths, eta, atoms, *, spec: _Spec) -> Rollout:
    dec = _Decoder(nnx.merge(ref_graph, ref_state),
                   nnx.merge(value_graph, value_state) if value_graph is not None else None, spec, eta, atoms)
    batch, n = prompt_ids.shape[0], spec.max_new_tokens
    row_keys = jax.vmap(lambda row: jax.random.fold_in(key, row))(row_ids)  # constant over the loop
    rows = jnp.arange(batch)

    def step(s: _StaticState) -> _StaticState:
        active = ~s.done
        t = jnp.broadcast_to(s.t, (batch,))
        models, x = dec.step(s.models, t, active, active & (t < switch_time), active & (t + 1 < switch_time),
                             row_keys)
        done = s.done | (t + 1 >= max_lengths)
        done = done | (x.token == spec.eos_id) if spec.eos_id is not None else done
        return _StaticState(t=s.t + 1, models=models, out=_record(s.out, rows, t, x, active), done=done)

    def cond(s: _StaticState):
        return (s.t < n) & ~jnp.all(s.done)

    start = _StaticState(t=jnp.int32(0), models=dec.prefill(prompt_ids, prompt_mask, spec.cache_len),
                         out=_empty_out(batch, n, spec.pad_id), done=jnp.zeros((batch,), bool))
    return _rollout(jax.lax.while_loop(cond, step, start).out)


@struct.dataclass
class _QueueState:
    """The continuous loop's carry: ``slots`` rows decode at once; a slot whose row ended takes the
    next rows of the queue (in refills of ``spec.refill`` slots)."""

    t: jax.Array  # int32 [slots]: tokens the slot's row has generated
    row: jax.Array  # int32 [slots]: the queue row the slot decodes (meaningless where free)
    free: jax.Array  # bool [slots]: the slot's row ended (EOS or max_new_tokens), or it never had one
    head: jax.Array  # int32 []: the next queue row to start
    models: _Models  # ring caches, one row per slot
    out: dict  # the Rollout fields of every queue row, [Q, N] / [Q]


@functools.partial(jax.jit, static_argnames=("ref_graph", "value_graph", "spec"))
def _generate_continuous(ref_graph, ref_state, value_graph, value_state, prompt_ids, prompt_mask, key, row_ids,
                         switch_time, max_lengths, eta, atoms, *, spec: _Spec) -> Rollout:
    dec = _Decoder(nnx.merge(ref_graph, ref_state),
                   nnx.merge(value_graph, value_state) if value_graph is not None else None, spec, eta, atoms)
    queue, n, slots, refill = prompt_ids.shape[0], spec.max_new_tokens, spec.slots, spec.refill
    keys = jax.vmap(lambda row: jax.random.fold_in(key, row))(row_ids)  # [Q]: each queue row's draws
    ring = lambda c: None if c is None else c.replace(ring=True)  # noqa: E731

    def pin(tree, rows: int = slots):
        """Arrays of ``rows`` rows split over the mesh's batch axes (KV heads over ``tensor``), as the
        static loop's follow from its sharded prompts: the slots' rows are gathered from the queue,
        so XLA would otherwise prefill and keep every slot on every device."""
        if spec.mesh is None or rows % (spec.mesh.shape["data"] * spec.mesh.shape["fsdp"]):
            return tree
        tensor = spec.mesh.shape["tensor"]

        def constrain(x):
            if not x.ndim or x.shape[0] != rows:
                return x
            heads = "tensor" if x.ndim == 4 and x.shape[1] % tensor == 0 else None  # [slots, kv_heads, S, D]
            spec_ = jax.sharding.PartitionSpec(("data", "fsdp"), *([heads] if x.ndim == 4 else []),
                                               *([None] * (x.ndim - 1 - (x.ndim == 4))))
            return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(spec.mesh, spec_))

        return jax.tree.map(constrain, tree)

    def refill_slots(s: _QueueState) -> _QueueState:
        """Prefill the next ``take`` queue rows into the first ``take`` free slots (the rest of the
        ``refill`` prefilled rows are dropped: a static shape)."""
        take = jnp.minimum(refill, queue - s.head)
        rows = jnp.minimum(s.head + jnp.arange(refill), queue - 1)
        fresh = dec.prefill(*pin((prompt_ids[rows], prompt_mask[rows]), refill), prompt_ids.shape[1])
        # the k-th free slot (k < take) takes the k-th prefilled row; selected, not scattered (see cache.refill)
        rank = jnp.cumsum(s.free) - 1
        source = jnp.where(s.free & (rank < take), rank, -1).astype(jnp.int32)  # [slots]
        taken, mine = source >= 0, jnp.maximum(source, 0)
        put = lambda old, new: jnp.where(taken.reshape(-1, *[1] * (old.ndim - 1)), new[mine], old)  # noqa: E731
        m = s.models
        models = _Models(
            ref_logits=put(m.ref_logits, fresh.ref_logits),
            ref_cache=cache_lib.refill(m.ref_cache, fresh.ref_cache, source),
            value_cache=None if m.value_cache is None else cache_lib.refill(m.value_cache, fresh.value_cache, source),
            value_out=None if m.value_out is None else put(m.value_out, fresh.value_out),
        )
        return s.replace(t=jnp.where(taken, 0, s.t), row=put(s.row, rows), free=s.free & ~taken,
                         head=s.head + take, models=pin(models))

    def step(s: _QueueState) -> _QueueState:
        waiting = queue - s.head
        s = jax.lax.cond((waiting > 0) & (jnp.sum(s.free) >= jnp.minimum(refill, waiting)), refill_slots,
                         lambda s: s, s)
        active = ~s.free
        switch = switch_time[s.row]
        models, x = dec.step(s.models, s.t, active, active & (s.t < switch), active & (s.t + 1 < switch),
                             keys[s.row])
        out = _record(s.out, jnp.where(active, s.row, queue), s.t, x, active)
        t = s.t + active
        ended = t >= max_lengths[s.row]
        ended = ended | (x.token == spec.eos_id) if spec.eos_id is not None else ended
        return s.replace(t=t, free=s.free | (active & ended), models=pin(models), out=out)

    def cond(s: _QueueState):
        return (s.head < queue) | ~jnp.all(s.free)

    first = jnp.minimum(jnp.arange(slots), queue - 1)  # the first slots' rows, prefilled together
    models = dec.prefill(*pin((prompt_ids[first], prompt_mask[first])), spec.cache_len)
    models = pin(models.replace(ref_cache=ring(models.ref_cache), value_cache=ring(models.value_cache)))
    start = _QueueState(t=jnp.zeros((slots,), jnp.int32), row=first.astype(jnp.int32),
                        free=jnp.arange(slots) >= queue, head=jnp.minimum(slots, queue).astype(jnp.int32),
                        models=models, out=_empty_out(queue, n, spec.pad_id))
    return _rollout(jax.lax.while_loop(cond, step, start).out)


def _prompts_of(rows: np.ndarray, local: np.ndarray | None, have: np.ndarray, ids: np.ndarray, mask: np.ndarray):
    """A chunk's prompts: ids and mask ``[len(rows), P]`` of its global ``rows``, from the rows
    ``have`` that this process holds; on a pod only its devices' positions ``local`` of the chunk
    (``[len(local), P]``; the others' are placed by their own hosts)."""
    at = np.searchsorted(have, rows if local is None else rows[local])
    return ids[at], mask[at]


def _mesh_of(model: nnx.Module):
    """The mesh ``model``'s parameters are laid out on (None: one device)."""
    leaf = jax.tree.leaves(nnx.state(model))[0]
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1:
        return sharding.mesh
    return None


def _local_positions(rows: jax.sharding.NamedSharding | None, size: int) -> np.ndarray | None:
    """Positions of a ``size``-row chunk that this process's devices hold under the row sharding
    ``rows`` (None in a single process: all of them)."""
    if rows is None or jax.process_count() == 1:
        return None
    held = rows.addressable_devices_indices_map((size,))
    return np.asarray(sorted({i for index in held.values() for i in range(*index[0].indices(size))}), np.int64)


def gather_rows(values: Any, mine: np.ndarray, count: int) -> np.ndarray:
    """Every process's ``values`` (``[len(mine), ...]``, numbers or objects) of its rows ``mine``,
    assembled into all ``count`` rows on every process (e.g. the rewards or answers each host
    computed for the rows it decoded). Rows several processes hold are the same on each. A
    collective on a pod; in a single process ``mine`` must cover every row."""
    values = np.asarray(values)
    out, filled = np.empty((count, *values.shape[1:]), values.dtype), np.zeros(count, bool)
    for positions, theirs in distributed.gather_objects((mine, values)):
        out[positions], filled[positions] = theirs, True
    if not filled.all():  # every row is on some device, so some host holds it: a bug if not
        raise RuntimeError(f"rows {np.flatnonzero(~filled)[:8].tolist()} of {count} came from no process")
    return out


@dataclasses.dataclass(frozen=True)
class _Chunks:
    """How :func:`generate_chunked` splits ``n`` rows: calls of ``size`` rows starting at
    ``starts``, each call's rows laid out by ``rows_of[ndim]`` (empty: one device) and this process's
    devices holding the call's positions ``local`` (None: all of them)."""

    n: int
    size: int
    starts: range
    rows_of: dict
    local: np.ndarray | None

    @classmethod
    def of(cls, ref_model: Transformer, n: int, batch: int) -> "_Chunks":
        mesh = _mesh_of(ref_model)
        shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        size = shards * -(-min(batch, n) // shards)  # rows per call: whole batch shards (padded with copies)
        rows_of = {} if mesh is None else {ndim: sharding_lib.batch_sharding(mesh, ndim) for ndim in (1, 2)}
        return cls(n, size, range(0, n, batch), rows_of, _local_positions(rows_of.get(1), size))

    def rows(self, start: int) -> np.ndarray:
        """The global rows of the call at ``start`` (the last call padded with copies of row n - 1)."""
        return np.minimum(np.arange(start, start + self.size), self.n - 1)

    def mine(self) -> np.ndarray:
        """The global rows this process decodes, sorted (all rows in a single process)."""
        if self.local is None:
            return np.arange(self.n)
        return np.unique(np.concatenate([self.rows(start)[self.local] for start in self.starts]))


def process_rows(ref_model: Transformer, n: int, batch: int) -> np.ndarray:
    """The rows of an ``n``-row :func:`generate_chunked` call (``batch`` rows per call) that this
    process decodes, sorted: on a pod, the prompts a host needs (``total_rows``); else all ``n``."""
    return _Chunks.of(ref_model, n, batch).mine()


def generate_chunked(
    ref_model: Transformer, prompt_ids: np.ndarray, prompt_mask: np.ndarray, *, key: jax.Array, batch: int,
    name: str = "generate", score: Callable[[np.ndarray, Rollout], Any] | None = None, progress: bool = False,
    total_rows: int | None = None, **kwargs,
) -> Rollout | tuple[Rollout, np.ndarray]:
    """:func:`generate` over any number of rows, at most ``batch`` per call; fields as numpy arrays.

    Row r is keyed by its global index (``row_ids``), so the tokens do not depend on ``batch``. The
    last chunk is padded with copies of the last row to the same shape (one compilation). When
    π_ref is laid out on a mesh, each chunk's rows are split over its ``data`` × ``fsdp`` devices
    (chunks rounded up to whole shards), so decoding is data-parallel, across hosts on a pod. Chunk
    i + 1 is dispatched before chunk i is copied to the host, and ``score(rows, chunk)`` (e.g. a
    task's rewards: decoding and answer checking, CPU work; ``rows``: the chunk's global row ids)
    runs on a helper thread meanwhile, so it stays off the accelerator's critical path; then
    ``(rollout, concatenated scores)`` is returned. On a pod each host scores only the rows it
    decoded, and the scores (numbers or objects) are gathered to every host.

    ``total_rows``: the prompts are this process's slice of ``total_rows`` rows, the rows
    :func:`process_rows` names (each host of a pod makes only the prompts it decodes); None: every
    row. ``kwargs``: of :func:`generate` (``switch_time``, ``max_lengths``: per row, every row,
    chunked with them; ``samples_per_prompt`` is a hint, dropped where chunks or slots would split
    a prompt's samples).

    Raises FloatingPointError (naming ``name`` and the rows) where the guidance was not finite.
    """
    n = len(prompt_ids) if total_rows is None else total_rows
    plan = _Chunks.of(ref_model, n, batch)
    share = kwargs.get("samples_per_prompt", 1)
    if share > 1 and (batch % share or plan.size % share or n % share or (kwargs.get("slots") or share) % share):
        kwargs["samples_per_prompt"] = 1  # chunks (or slots) that split a prompt's samples: each row prefilled
    rows_of, local = plan.rows_of, plan.local  # on a pod: the chunk positions this host decodes (and scores)
    have = plan.mine() if total_rows is not None else np.arange(n)  # the global rows prompt_ids holds
    if len(prompt_ids) != len(have):
        raise ValueError(f"{name}: {len(prompt_ids)} prompts given, but this process decodes {len(have)} of the "
                         f"{n} rows (rollout.process_rows); pass those rows' prompts")
    starts = plan.starts
    outs: list[Rollout] = []
    scores: list[concurrent.futures.Future] = []

    bar = tqdm(total=len(starts), desc=name, disable=not progress, unit="chunk")

    def finish(start: int, rows: np.ndarray, out: Rollout, pool) -> None:
        host = jax.tree.map(lambda x: x[: len(rows)], sharding_lib.to_host(out))
        outs.append(host)
        if score is not None:
            mine = np.arange(len(rows)) if local is None else local[local < len(rows)]
            part = host if local is None else jax.tree.map(lambda x: x[mine], host)
            scores.append((len(rows), mine, pool.submit(score, rows[mine], part)))
        bar.update(1)  # a chunk is done when its tokens are on the host, not when it is dispatched
        failpoints.reach(f"{name}/{start}")

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool, contextlib.closing(bar):
        pending = None
        for start in starts:
            rows = plan.rows(start)
            chunk = {k: (np.asarray(v)[rows] if k in PER_ROW and v is not None else v) for k, v in kwargs.items()}
            (ids, mask), row_ids = _prompts_of(rows, local, have, prompt_ids, prompt_mask), rows.astype(np.int32)
            if rows_of:  # each device (on a pod: each host) holds only its rows
                if local is None:
                    place = lambda x: sharding_lib.put(x, rows_of[x.ndim])  # noqa: E731
                else:  # a pod: the global chunk from each host's own rows
                    place = lambda x: sharding_lib.from_process_rows(x, rows_of[x.ndim], len(rows))  # noqa: E731
                    row_ids = row_ids[local]
                ids, mask, row_ids = place(ids), place(mask), place(row_ids)
                for k in PER_ROW:
                    if chunk.get(k) is not None:
                        values = chunk[k].astype(np.int32)
                        chunk[k] = place(values if local is None else values[local])
            out = generate(ref_model, ids, mask, key=key, row_ids=row_ids, **chunk)
            if pending is not None:
                finish(*pending, pool)
            pending = (start, rows[: min(batch, n - start)], out)
        if pending is not None:
            finish(*pending, pool)
        scored = [np.asarray(f.result()) if local is None else gather_rows(f.result(), mine, count)
                  for count, mine, f in scores]
    out = jax.tree.map(lambda *xs: np.concatenate(xs), *outs)
    if not out.finite.all():
        bad = np.flatnonzero(~out.finite)
        raise FloatingPointError(
            f"{name}: the value model's guidance was NaN or infinite on {len(bad)} of {n} rows (rows "
            f"{', '.join(map(str, bad[:8]))}{', ...' if len(bad) > 8 else ''}); its parameters are broken. "
            "Stopped before using these samples; the checkpoints on disk are kept")
    return out if score is None else (out, np.concatenate(scored))
