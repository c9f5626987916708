"""Policy (language-model) objectives shared by π_ref pretraining and the policy baselines.

A policy batch is a dict of arrays: ``tokens`` int32 ``[N, T]``, ``attention_mask`` bool
``[N, T]`` and ``loss_mask`` bool ``[N, T]`` marking the tokens whose probability is trained
(the response; position t's token is predicted at t − 1).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from qsharp_jax import _validate
from qsharp_jax.models.transformer import Transformer

Batch = dict[str, jax.Array]


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
    completion_mask: jax.Array, *, top_k: int | None = None, temperature: float = 1.0,
) -> jax.Array:
    """float32 ``[N]``: Σ_t KL(π_t ‖ π_ref,t) along sampled completions, as ``rollout.generate``
    reports it for guided decoding: π_t is ``model``'s sampling distribution (temperature, then
    top-k), π_ref,t the reference model's full next-token distribution.

    For a policy that is itself a trained network (REINFORCE, DPO, RPO), sampled by
    ``rollout.generate(model, ...)`` (whose own KL is then to ``model``).
    """
    tokens = jnp.concatenate([prompts, completions], axis=1)
    mask = jnp.concatenate([prompt_mask, completion_mask], axis=1)
    start = prompts.shape[1] - 1  # the logits that predict the first completion token
    logits = model(tokens, mask)[:, start:-1] / temperature
    ref_logp = jax.nn.log_softmax(ref(tokens, mask)[:, start:-1], axis=-1)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0].min(axis=-1, keepdims=True)  # min, not [..., -1:]: no full sort
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    logp = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(logp)
    kl = jnp.sum(jnp.where(p > 0, p * (logp - ref_logp), 0.0), axis=-1)
    return jnp.sum(jnp.where(completion_mask, jnp.maximum(kl, 0.0), 0.0), axis=1)
