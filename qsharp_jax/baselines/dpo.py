"""DPO (Rafailov et al. 2023) and RPO (DPO + the chosen answer's negative log-likelihood, Pang et
al. 2024) on preference pairs."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from qsharp_jax import policy
from qsharp_jax.models.transformer import Transformer


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
    model: Transformer, batch: policy.Batch, *, beta: float = 0.1, nll_weight: float = 0.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPO (``nll_weight=0``) or RPO (``nll_weight=1``, the paper's setting) on a batch of pairs.

    ``batch``: ``chosen`` and ``rejected`` policy batches (``tokens``, ``attention_mask``,
    ``loss_mask``) and π_ref's sequence log-probs ``ref_chosen``, ``ref_rejected`` float ``[N]``.
    RPO adds ``nll_weight`` × the mean chosen-answer negative log-likelihood (summed over tokens).
    """
    chosen = policy.sequence_logprobs(model, batch["chosen"])
    rejected = policy.sequence_logprobs(model, batch["rejected"])
    loss = dpo_loss_from_logprobs(chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], beta=beta)
    if nll_weight:
        loss = loss - nll_weight * jnp.mean(chosen)
    margin = (chosen - batch["ref_chosen"]) - (rejected - batch["ref_rejected"])
    return loss, {"margin": jnp.mean(margin), "chosen_logprob": jnp.mean(chosen)}
