"""REINFORCE (policy gradient on whole-sequence rewards, no KL term), as the paper's baseline."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from qsharp_jax import objectives, train
from qsharp_jax.baselines import RewardFn, SampleFn
from qsharp_jax.models.build import clone
from qsharp_jax.models.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class ReinforceConfig:
    """On-policy REINFORCE from π_ref (the paper's star-graph baseline: +1 / −0.1, no KL).

    Fields:
      steps: optimizer steps, each on a fresh batch of samples of the current policy.
      batch_size: prompts per step (one sample each).
      right, wrong: the shaped reward of a correct / incorrect response (paper: 1, −0.1).
      optimizer: the policy's optimizer (paper's star graph: lr 1e-5 at its scale).
    """

    steps: int = 200
    batch_size: int = 128
    right: float = 1.0
    wrong: float = -0.1
    optimizer: train.OptimizerConfig = train.OptimizerConfig(learning_rate=1e-4, weight_decay=0.1)

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"reinforce: steps >= 0 and batch_size >= 1 needed, got {self.steps}, {self.batch_size}")


def shaped_rewards(correct: jax.Array, *, right: float = 1.0, wrong: float = -0.1) -> jax.Array:
    """float ``[N]``: the paper's star-graph REINFORCE reward, +1 for a correct path, −0.1 otherwise."""
    return jnp.where(jnp.asarray(correct) > 0.5, right, wrong).astype(jnp.float32)


def reinforce_loss(
    model: Transformer, batch: objectives.Batch, *, baseline: bool = True
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """−mean_n (r_n − b)·log π(y_n | x_n) over sequences sampled from the current policy.

    ``batch`` is a policy batch (``tokens``, ``attention_mask``, ``loss_mask`` on the response)
    with ``rewards`` float ``[N]``. ``baseline``: subtract the batch-mean reward (variance
    reduction; the gradient stays unbiased up to O(1/N)).
    """
    rewards = batch["rewards"].astype(jnp.float32)
    chex.assert_shape(rewards, batch["tokens"].shape[:1], custom_message="batch['rewards'] must be [N]")
    advantage = rewards - jnp.mean(rewards) if baseline else rewards
    logp = objectives.sequence_logprobs(model, batch)
    loss = -jnp.mean(jax.lax.stop_gradient(advantage) * logp)
    return loss, {"reward": jnp.mean(rewards), "logprob": jnp.mean(logp)}


def train_reinforce(
    cfg: ReinforceConfig, ref: Transformer, prompts: np.ndarray, prompt_mask: np.ndarray, sample_fn: SampleFn,
    reward_fn: RewardFn, *, seed: int = 0, progress: bool = True,
) -> Transformer:
    """REINFORCE from a copy of ``ref``: every step samples one response per prompt of a random
    batch of ``prompts`` ``[n, P]`` from the current policy, scores it with ``reward_fn`` and takes
    one optimizer step. Draws are keyed by ``seed``. Returns the trained policy."""
    optimizer = train.make_optimizer(cfg.optimizer)
    state = train.init_state(clone(ref), optimizer, jax.random.key(seed))
    step = train.make_train_step(reinforce_loss, optimizer)
    rng = np.random.default_rng([seed, 2])
    bar = tqdm(range(cfg.steps), desc="REINFORCE", disable=not progress, leave=False)
    for i in bar:
        index = rng.integers(0, len(prompts), size=cfg.batch_size)
        chunk, mask = prompts[index], prompt_mask[index]
        out = sample_fn(state.model(), chunk, mask, jax.random.fold_in(jax.random.key(seed + 3), i))
        tokens, token_mask = np.asarray(out.tokens), np.asarray(out.mask)
        correct = np.asarray(reward_fn(chunk, tokens, token_mask))
        batch = objectives.policy_batch(chunk, mask, tokens, token_mask)
        batch["rewards"] = np.asarray(shaped_rewards(correct, right=cfg.right, wrong=cfg.wrong))
        state, _ = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
        bar.set_postfix(accuracy=f"{correct.mean():.2f}")
    return state.model()
