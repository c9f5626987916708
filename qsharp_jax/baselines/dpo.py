"""DPO (Rafailov et al. 2023) and RPO (DPO + the chosen answer's negative log-likelihood, Pang et
al. 2024) on preference pairs: a reference (correct) response is chosen, a wrong sample of π_ref
rejected."""

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
class PreferenceConfig:
    """DPO / RPO from π_ref.

    Fields:
      pairs: prompts to build pairs from (those whose π_ref sample is right give none).
      epochs: passes over the pairs.
      batch_size: pairs per optimizer step.
      beta: DPO's β (paper: 0.1).
      rpo_nll_weight: RPO's weight on the chosen response's negative log-likelihood (paper: 1).
      optimizer: the policy's optimizer.
    """

    pairs: int = 20000
    epochs: int = 2
    batch_size: int = 128
    beta: float = 0.1
    rpo_nll_weight: float = 1.0
    optimizer: train.OptimizerConfig = train.OptimizerConfig(learning_rate=1e-4, weight_decay=0.1)

    def __post_init__(self):
        if self.pairs < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"preference: pairs, epochs and batch_size must be >= 1, got {self.pairs}, "
                             f"{self.epochs}, {self.batch_size}")
        if not self.beta > 0:
            raise ValueError(f"preference.beta (DPO's β) must be > 0, got {self.beta}")


def dpo_loss_from_logprobs(
    chosen: jax.Array, rejected: jax.Array, ref_chosen: jax.Array, ref_rejected: jax.Array, *, beta: float = 0.1
) -> jax.Array:
    """Mean −log σ(β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))]); all ``[N]``."""
    chex.assert_equal_shape([chosen, rejected, ref_chosen, ref_rejected],
                            custom_message="chosen/rejected log-probs of policy and π_ref must share [N]")
    if beta <= 0:
        raise ValueError(f"DPO needs beta > 0, got {beta}")
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    return -jnp.mean(jax.nn.log_sigmoid(beta * margin))


def preference_loss(
    model: Transformer, batch: objectives.Batch, *, beta: float = 0.1, nll_weight: float = 0.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPO (``nll_weight=0``) or RPO (``nll_weight=1``, the paper's setting) on a batch of pairs.

    ``batch``: ``chosen`` and ``rejected`` policy batches (``tokens``, ``attention_mask``,
    ``loss_mask``) and π_ref's sequence log-probs ``ref_chosen``, ``ref_rejected`` float ``[N]``.
    RPO adds ``nll_weight`` × the mean chosen-answer negative log-likelihood (summed over tokens).
    """
    chosen = objectives.sequence_logprobs(model, batch["chosen"])
    rejected = objectives.sequence_logprobs(model, batch["rejected"])
    loss = dpo_loss_from_logprobs(chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], beta=beta)
    if nll_weight:
        loss = loss - nll_weight * jnp.mean(chosen)
    margin = (chosen - batch["ref_chosen"]) - (rejected - batch["ref_rejected"])
    return loss, {"margin": jnp.mean(margin), "chosen_logprob": jnp.mean(chosen)}


# jitted once here: every chunk of every preference set reuses the compilation
_sequence_logprobs = jax.jit(objectives.sequence_logprobs)


def preference_pairs(
    cfg: PreferenceConfig, ref: Transformer, prompts: np.ndarray, prompt_mask: np.ndarray, chosen: np.ndarray,
    sample_fn: SampleFn, reward_fn: RewardFn, *, seed: int = 0, chunk: int = 1000, progress: bool = True,
) -> dict:
    """Pairs for DPO / RPO from the first ``cfg.pairs`` prompts: chosen = the given correct
    response ``chosen`` ``[n, R]`` (all real tokens), rejected = π_ref's sample of the same prompt
    when ``reward_fn`` scores it 0 (prompts whose sample was right are skipped). Also π_ref's
    sequence log-probs of both (``ref_chosen``, ``ref_rejected``). π_ref samples ``chunk`` prompts
    per call, keyed by ``seed``."""
    count = min(cfg.pairs, len(prompts))
    prompts, prompt_mask, chosen = prompts[:count], prompt_mask[:count], chosen[:count]
    samples, masks = [], []
    for start in tqdm(range(0, count, chunk), desc="π_ref samples for DPO", disable=not progress, leave=False):
        out = sample_fn(ref, prompts[start : start + chunk], prompt_mask[start : start + chunk],
                        jax.random.fold_in(jax.random.key(seed + 4), start))
        samples.append(np.asarray(out.tokens))
        masks.append(np.asarray(out.mask))
    samples, masks = np.concatenate(samples), np.concatenate(masks)
    wrong = np.asarray(reward_fn(prompts, samples, masks)) == 0
    if not wrong.any():
        raise ValueError(f"π_ref answered all {count} preference prompts correctly: there is no rejected answer for "
                         "DPO/RPO (raise preference.pairs, or leave dpo/rpo out of methods)")
    pairs = {"chosen": objectives.policy_batch(prompts[wrong], prompt_mask[wrong], chosen[wrong],
                                               np.ones(chosen[wrong].shape, bool)),
             "rejected": objectives.policy_batch(prompts[wrong], prompt_mask[wrong], samples[wrong], masks[wrong])}
    for name in ("chosen", "rejected"):
        batch = pairs[name]
        pairs[f"ref_{name}"] = np.concatenate([
            np.asarray(_sequence_logprobs(ref, {k: jnp.asarray(v[i : i + chunk]) for k, v in batch.items()}))
            for i in range(0, len(batch["tokens"]), chunk)
        ])
    return pairs


def train_preference(
    cfg: PreferenceConfig, ref: Transformer, pairs: dict, *, nll_weight: float, seed: int, progress: bool = True,
    desc: str = "DPO",
) -> Transformer:
    """DPO (``nll_weight=0``) or RPO on ``pairs`` (:func:`preference_pairs`) from a copy of
    ``ref``; returns the trained policy."""
    optimizer = train.make_optimizer(cfg.optimizer)
    state = train.init_state(clone(ref), optimizer, jax.random.key(seed))
    loss = lambda m, b: preference_loss(m, b, beta=cfg.beta, nll_weight=nll_weight)  # noqa: E731
    batch_size = min(cfg.batch_size, len(pairs["ref_chosen"]))
    state, _ = train.fit(state, train.make_train_epoch(loss, optimizer), pairs, epochs=cfg.epochs,
                         batch_size=batch_size, rng=np.random.default_rng([seed, 5]), desc=desc, progress=progress)
    return state.model()
