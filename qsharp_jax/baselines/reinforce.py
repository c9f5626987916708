"""REINFORCE (policy gradient on whole-sequence rewards, no KL term), as the paper's baseline."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from qsharp_jax import policy
from qsharp_jax.models.transformer import Transformer


def shaped_rewards(correct: jax.Array, *, right: float = 1.0, wrong: float = -0.1) -> jax.Array:
    """float ``[N]``: the paper's star-graph REINFORCE reward, +1 for a correct path, −0.1 otherwise."""
    return jnp.where(jnp.asarray(correct) > 0.5, right, wrong).astype(jnp.float32)


def reinforce_loss(
    model: Transformer, batch: policy.Batch, *, baseline: bool = True
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """−mean_n (r_n − b)·log π(y_n | x_n) over sequences sampled from the current policy.

    ``batch`` is a policy batch (``tokens``, ``attention_mask``, ``loss_mask`` on the response)
    with ``rewards`` float ``[N]``. ``baseline``: subtract the batch-mean reward (variance
    reduction; the gradient stays unbiased up to O(1/N)).
    """
    rewards = batch["rewards"].astype(jnp.float32)
    chex.assert_shape(rewards, batch["tokens"].shape[:1], custom_message="batch['rewards'] must be [N]")
    advantage = rewards - jnp.mean(rewards) if baseline else rewards
    logp = policy.sequence_logprobs(model, batch)
    loss = -jnp.mean(jax.lax.stop_gradient(advantage) * logp)
    return loss, {"reward": jnp.mean(rewards), "logprob": jnp.mean(logp)}
