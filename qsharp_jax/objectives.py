"""Objectives: the value losses Algorithm 1 fits and the language-model objectives π_ref
pretraining and the policy baselines train. Each is ``loss(model, batch) -> (loss, metrics)``, the
form :func:`qsharp_jax.train.make_train_epoch` takes.

A value-training batch is a dict of arrays (all ``[N, T]`` unless noted):

* ``tokens`` int32, prompt + response, left padded; ``attention_mask`` bool;
* ``loss_mask`` bool: the prefixes whose value is fitted — those ending at the last roll-in token
  or later, whose continuation was sampled from π_ref (Algorithm 1);
* ``rewards`` float32 ``[N]``: the return of each sequence (or ``returns`` float32 ``[N, T]``, a
  target per prefix).

Returns must lie inside the value head's atom range (``HeadConfig.v_min`` .. ``v_max``). That is
checked on the host where data enters (:func:`check_returns`; Algorithm 1 checks every reward it
collects), not inside the compiled train step, which clips only float rounding away.

A policy batch is ``tokens``, ``attention_mask`` and ``loss_mask`` (the tokens whose probability
is trained: the response; position t's token is predicted at t − 1).
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp
import numpy as np

from qsharp_jax import _validate, losses, rollout
from qsharp_jax.models.transformer import Transformer
from qsharp_jax.models.value import HeadConfig, ValueModel

Batch = dict[str, jax.Array]
ValueLossKind = Literal["categorical", "bernoulli", "mse", "categorical_bellman"]
# the Monte-Carlo loss each head kind is fitted with
LOSS_OF_HEAD = {"categorical": "categorical", "bernoulli": "bernoulli", "scalar": "mse"}
HEAD_OF_LOSS = {"categorical": "categorical", "bernoulli": "bernoulli", "mse": "scalar",
                "categorical_bellman": "categorical"}


def check_returns(returns: np.ndarray, head: HeadConfig, what: str = "returns") -> np.ndarray:
    """Host-side check (numpy, before any compiled step): finite and inside the head's range."""
    returns = np.asarray(returns, np.float64)
    if not np.all(np.isfinite(returns)):
        raise ValueError(f"{what} must be finite; got {returns[~np.isfinite(returns)][:5]}")
    lo, hi = head.reward_range
    tol = _validate.RANGE_TOLERANCE * (hi - lo)
    if returns.size and (returns.min() < lo - tol or returns.max() > hi + tol):
        raise ValueError(f"{what} must lie in [{lo:g}, {hi:g}] (the value head's atom range, head.v_min .. "
                         f"head.v_max); got {returns.min():g} .. {returns.max():g}")
    return returns


def check_loss_fits_head(kind: str, head: HeadConfig) -> None:
    """A loss kind needs its head kind (categorical losses a categorical head, ...)."""
    if kind not in HEAD_OF_LOSS:
        raise ValueError(f"loss must be one of {sorted(HEAD_OF_LOSS)}, got {kind!r}")
    if HEAD_OF_LOSS[kind] != head.kind:
        raise ValueError(f"loss {kind!r} does not fit a {head.kind!r} value head (it needs {HEAD_OF_LOSS[kind]!r})")


# --------------------------------------------------------------------------- value losses


def value_loss(
    model: ValueModel, batch: Batch, *, kind: Literal["categorical", "bernoulli", "mse"] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Monte-Carlo value loss of a V- or Q-type value model on a batch (see module docstring).

    V-type: the output at position t is the value of the prefix ending at t. Q-type: the output at
    t for token a is the value of that prefix extended by a, so the prefix ending at t is read at
    position t - 1, token ``tokens[t]``.

    The target of every fitted prefix is its sequence's ``rewards`` ``[N]``, or, when the batch has
    ``returns`` float ``[N, T]`` instead, a target per prefix (e.g. auxiliary labels). ``kind``:
    the loss (default: the head's own, :data:`LOSS_OF_HEAD`); the atoms are the head's. With
    ``segment_ids`` ``[N, T]`` the rows are packed sequences (:func:`qsharp_jax.packing.pack_rows`),
    with ``branch_ids`` answers sharing their prompt (V-type only).
    """
    tokens, attention = batch["tokens"], batch["attention_mask"]
    chex.assert_rank(tokens, 2, custom_message="batch['tokens'] must be [N, T]")
    chex.assert_equal_shape([tokens, attention, batch["loss_mask"]],
                            custom_message="tokens, attention_mask and loss_mask must share [N, T]")
    if "returns" in batch:
        chex.assert_shape(batch["returns"], tokens.shape, custom_message="batch['returns'] must be [N, T]")
        returns = batch["returns"].astype(jnp.float32)
    else:
        chex.assert_shape(batch["rewards"], tokens.shape[:1], custom_message="batch['rewards'] must be [N]")
        returns = jnp.broadcast_to(batch["rewards"][:, None].astype(jnp.float32), tokens.shape)
    head = model.head_cfg
    kind = LOSS_OF_HEAD[head.kind] if kind is None else kind
    if kind == "categorical_bellman":
        raise ValueError("categorical_bellman is bellman_value_loss, not a Monte-Carlo value_loss kind")
    check_loss_fits_head(kind, head)
    segments = batch.get("segment_ids")  # packed rows (qsharp_jax.packing): each row kept to itself
    branches = batch.get("branch_ids")  # and answers sharing their prompt
    if branches is not None and head.q_type:
        raise ValueError("a Q-type model reads each token's value at the token before it, which a shared prompt's "
                         "answers do not have in their own branch: pack its rows without groups")
    out = model(tokens, attention, segments, branches)  # [N, T, (V,) (K)]
    mask = batch["loss_mask"] & attention
    if head.q_type:
        nxt = tokens[:, 1:]
        index = nxt[:, :, None, None] if out.ndim == 4 else nxt[:, :, None]
        out = jnp.take_along_axis(out[:, :-1], index, axis=2)[:, :, 0]
        mask, returns = mask[:, 1:], returns[:, 1:]
        if segments is not None:  # a row's first token is not the previous row's next token
            mask &= segments[:, 1:] == segments[:, :-1]
    # clip: the range was checked where the data came in (check_returns); in the step it only
    # absorbs float rounding, and leaves no host callback in the compiled loop
    if kind == "categorical":
        atoms = head.atoms
        loss = losses.categorical_return_loss(out, returns, atoms, mask, clip=True)
        mean = jax.nn.softmax(out) @ atoms
    elif kind == "bernoulli":
        loss = losses.bernoulli_return_loss(out, returns, mask, clip=True)
        mean = jax.nn.sigmoid(out)
    else:
        loss = losses.mse_return_loss(out, returns, mask)
        mean = out
    return loss, _fit_metrics(mean, returns, mask)


def reference_inputs(ref: Transformer, tokens: jax.Array, attention_mask: jax.Array, *, top_k: int | None) -> Batch:
    """What :func:`bellman_value_loss` needs from the frozen π_ref for a batch.

    ``top_k=None`` (Q-type): ``{"ref_logits": [N, T, V]}``. Otherwise (V-type):
    ``{"ref_top_ids": int32 [N, T, k], "ref_top_logits": [N, T, k]}``, π_ref's k likeliest next
    tokens after each prefix — the tokens guided V-type decoding chooses among.
    """
    logits = jax.lax.stop_gradient(ref(tokens, attention_mask))
    if top_k is None:
        return {"ref_logits": logits}
    top_logits, top_ids = jax.lax.top_k(logits, top_k)
    return {"ref_top_ids": top_ids.astype(jnp.int32), "ref_top_logits": top_logits}


def bellman_value_loss(model: ValueModel, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Distributional Bellman loss of a categorical value model under π_ref (no max).

    The target for the return distribution of a fitted state-action is the C51 projection of
    ``r + γ·z`` (γ = 1; the reward arrives with the last token) under the π_ref mixture of the
    model's own next-step distributions, with the gradient stopped (a semi-gradient target, as with
    a target network refreshed every step):

    * Q-type: the target for Z(s_t, a_{t+1}) is Σ_a π_ref(a | s_{t+1}) p(· | s_{t+1}, a), exact
      over the vocabulary. Needs ``batch["ref_logits"]`` float ``[N, T, V]``.
    * V-type: the target for Z(s_t) (the prefix ending at t) is Σ_j π̃_ref(c_j | s_t) p(· | s_t c_j)
      over π_ref's top-k next tokens c_j, π̃_ref renormalized over them — the support of guided
      V-type decoding. All T·k branches are scored in one forward
      (:meth:`ValueModel.score_branches`). Needs ``batch["ref_top_ids"]`` int ``[N, T, k]`` and
      ``batch["ref_top_logits"]`` float ``[N, T, k]`` (see :func:`reference_inputs`).

    The last real token of a row is terminal: its target is the reward.
    """
    head = model.head_cfg
    if head.kind != "categorical":
        raise ValueError(f"categorical_bellman needs a categorical value head, got {head.kind!r}")
    tokens, attention = batch["tokens"], batch["attention_mask"]
    chex.assert_rank(tokens, 2, custom_message="batch['tokens'] must be [N, T]")
    atoms = head.atoms
    last = tokens.shape[1] - 1 - jnp.argmax(attention[:, ::-1], axis=1)  # last real token of each row
    if head.q_type:
        if "ref_logits" not in batch:
            raise ValueError("a Q-type categorical_bellman batch needs 'ref_logits' (π_ref's next-token logits "
                             "[N, T, V]; see objectives.reference_inputs)")
        chex.assert_shape(batch["ref_logits"], (*tokens.shape, model.vocab_size),
                          custom_message="batch['ref_logits'] must be [N, T, V]")
        out = model(tokens, attention)  # [N, T, V, K]
        chosen = jnp.take_along_axis(out[:, :-1], tokens[:, 1:, None, None], axis=2)[:, :, 0]  # Z(s_t, a_{t+1})
        own = jax.nn.softmax(jax.lax.stop_gradient(out[:, 1:]), axis=-1)  # p(· | s_{t+1}, a) for every a
        ref = jax.nn.softmax(batch["ref_logits"][:, 1:].astype(jnp.float32), axis=-1)  # π_ref(a | s_{t+1})
        next_probs = jnp.einsum("ntv,ntvk->ntk", ref, own)
        terminal = jnp.arange(1, tokens.shape[1])[None, :] == last[:, None]
        mask = (batch["loss_mask"] & attention)[:, 1:]
    else:
        ids = batch.get("ref_top_ids")
        if ids is None or "ref_top_logits" not in batch:
            raise ValueError("a V-type categorical_bellman batch needs 'ref_top_ids' and 'ref_top_logits' "
                             "(π_ref's top-k next tokens; see objectives.reference_inputs)")
        chex.assert_equal_shape([ids, batch["ref_top_logits"]],
                                custom_message="ref_top_ids and ref_top_logits must share [N, T, k]")
        chex.assert_equal_shape_prefix([tokens, ids], 2, custom_message="ref_top_ids must be [N, T, k]")
        chosen, branches = model.score_branches(tokens, attention, ids)  # [N, T, K], [N, T, k, K]
        own = jax.nn.softmax(jax.lax.stop_gradient(branches), axis=-1)
        ref = jax.nn.softmax(batch["ref_top_logits"].astype(jnp.float32), axis=-1)  # renormalized over top-k
        next_probs = jnp.einsum("ntj,ntjk->ntk", ref, own)
        terminal = jnp.arange(tokens.shape[1])[None, :] == last[:, None]
        mask = batch["loss_mask"] & attention
    rewards = jnp.where(terminal, batch["rewards"][:, None], 0.0)
    discounts = jnp.where(terminal, 0.0, 1.0)
    loss = losses.categorical_bellman_loss(chosen, next_probs, rewards, discounts, atoms, mask, clip=True)
    returns = jnp.broadcast_to(batch["rewards"][:, None], mask.shape).astype(jnp.float32)
    return loss, _fit_metrics(jax.nn.softmax(chosen) @ atoms, returns, mask)


def _fit_metrics(mean: jax.Array, returns: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """How well the predicted mean return explains the observed returns, over fitted positions."""
    fitted = mask.astype(jnp.float32)
    count = jnp.maximum(fitted.sum(), 1.0)
    mean_return = (returns * fitted).sum() / count
    residual = ((mean - returns) ** 2 * fitted).sum() / count
    variance = ((returns - mean_return) ** 2 * fitted).sum() / count
    explained = jnp.where(variance > 0, 1.0 - residual / jnp.where(variance > 0, variance, 1.0), 0.0)
    return {"explained_variance": explained, "fitted_tokens": fitted.sum()}


# --------------------------------------------------------------------------- policy objectives


def policy_batch(prompts: np.ndarray, prompt_mask: np.ndarray, responses: np.ndarray, response_mask: np.ndarray
                 ) -> dict[str, np.ndarray]:
    """A policy batch (numpy) of prompts ``[N, P]`` and responses ``[N, R]`` with their masks: the
    response tokens are the trained ones."""
    tokens = np.concatenate([prompts, responses], axis=1)
    loss_mask = np.zeros(tokens.shape, bool)
    loss_mask[:, prompts.shape[1] :] = True
    return {"tokens": tokens, "attention_mask": np.concatenate([prompt_mask, response_mask], axis=1).astype(bool),
            "loss_mask": loss_mask}


def token_logprobs(model: Transformer, tokens: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """float32 ``[N, T]``: log π(tokens[t] | tokens[<t]); position 0 (nothing predicts it) is 0."""
    chex.assert_rank(tokens, 2, custom_message="tokens must be [N, T]")
    logits = model(tokens, attention_mask)[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(picked, ((0, 0), (1, 0)))


def sequence_logprobs(model: Transformer, batch: Batch) -> jax.Array:
    """float32 ``[N]``: log-probability of each row's trained tokens (``loss_mask``)."""
    mask = batch["loss_mask"] & batch["attention_mask"]
    return jnp.sum(jnp.where(mask, token_logprobs(model, batch["tokens"], batch["attention_mask"]), 0.0), axis=1)


def next_token_loss(model: Transformer, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Teacher-forced cross-entropy on the trained tokens (mean per token), and token accuracy."""
    tokens, attention = batch["tokens"], batch["attention_mask"]
    chex.assert_equal_shape([tokens, attention, batch["loss_mask"]],
                            custom_message="tokens, attention_mask and loss_mask must share [N, T]")
    logits = model(tokens, attention)[:, :-1]
    target = tokens[:, 1:]
    mask = (batch["loss_mask"] & attention)[:, 1:]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), target[..., None], axis=-1)[..., 0]
    loss = _validate.masked_mean(-logp, mask)
    accuracy = _validate.masked_mean((jnp.argmax(logits, axis=-1) == target).astype(jnp.float32), mask)
    return loss, {"token_accuracy": accuracy}


def sampled_kl(
    model: Transformer, ref: Transformer, prompts: jax.Array, prompt_mask: jax.Array, completions: jax.Array,
    completion_mask: jax.Array, *, top_k: int | None = None, temperature: float = 1.0, top_p: float = 1.0,
) -> jax.Array:
    """float32 ``[N]``: Σ_t KL(π_t ‖ π_ref,t) along sampled completions, as ``rollout.generate``
    reports it for guided decoding: π_t is ``model``'s sampling distribution (temperature, top-k,
    top-p: :func:`qsharp_jax.rollout.truncate`, the truncation sampling uses), π_ref,t the
    reference model's full next-token distribution.

    For a policy that is itself a trained network (REINFORCE, DPO, RPO), sampled by
    ``rollout.generate(model, ...)`` (whose own KL is then to ``model``).
    """
    tokens = jnp.concatenate([prompts, completions], axis=1)
    mask = jnp.concatenate([prompt_mask, completion_mask], axis=1)
    start = prompts.shape[1] - 1  # the logits that predict the first completion token
    log_policy, ids = rollout.truncate(model(tokens, mask)[:, start:-1], top_k=top_k, top_p=top_p,
                                       temperature=temperature)
    ref_logp = jnp.take_along_axis(jax.nn.log_softmax(ref(tokens, mask)[:, start:-1], axis=-1), ids, axis=-1)
    p = jnp.exp(log_policy)
    kl = jnp.sum(jnp.where(p > 0, p * (log_policy - ref_logp), 0.0), axis=-1)
    return jnp.sum(jnp.where(completion_mask, jnp.maximum(kl, 0.0), 0.0), axis=1)
