"""Supervised next-token training of a policy (π_ref from scratch, or SFT of a checkpoint) on
prompt/response pairs, checkpointed so that a rerun with the same data and settings restores it
instead of training again, and a rerun with other data or settings is refused.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np

from qsharp_jax import objectives, train
from qsharp_jax import config as config_lib
from qsharp_jax.checkpoint import Checkpoints
from qsharp_jax.models.transformer import Transformer
from qsharp_jax.train import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Next-token training with teacher forcing on the responses.

    Fields:
      epochs: passes over the pairs (0: no training, the model as given).
      batch_size: pairs per optimizer step.
      optimizer: its optimizer.
    """

    epochs: int = 10
    batch_size: int = 256
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-3, weight_decay=0.1, warmup_steps=100)

    def __post_init__(self):
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError(f"sft: need epochs >= 0 and batch_size >= 1, got {self.epochs}, {self.batch_size}")


def train_sft(cfg: SFTConfig, model: Transformer, prompts: np.ndarray, prompt_mask: np.ndarray, responses: np.ndarray,
              response_mask: np.ndarray, *, seed: int, directory: str | Path | None = None,
              meta: dict[str, Any] | None = None, desc: str = "SFT", progress: bool = True) -> Transformer:
    """``model`` trained on (prompt ``[N, P]``, response ``[N, R]``) pairs (left-padded prompts,
    right-padded responses, bool masks); returns the trained model.

    With ``directory``, the result is checkpointed there: a later call whose ``cfg`` and ``meta``
    (what else the model depends on: its data, its sizes; values may be dataclass configs) match
    restores it; one that differs is refused with the fields that differ. A field that a
    checkpoint's config lacks (written before the field existed) counts as its default, so adding
    a config field with a default keeps older runs resumable.
    """
    optimizer = train.make_optimizer(cfg.optimizer)
    state = train.init_state(model, optimizer, jax.random.key(seed))
    plain = lambda v: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v  # noqa: E731
    meta = meta or {}
    config = config_lib.as_json({**dataclasses.asdict(cfg), **{k: plain(v) for k, v in meta.items()}, "seed": seed})
    defaults = {**config_lib.defaults_of(SFTConfig),
                **{k: config_lib.defaults_of(type(v)) for k, v in meta.items() if dataclasses.is_dataclass(v)}}
    checkpoints = Checkpoints(directory, keep=1, writer=True) if directory is not None else None
    if checkpoints is not None:
        # an unverifiable step (no checksums: an older release, a killed save) is moved aside and redone
        restored = checkpoints.restore(state, config, defaults=defaults, quarantine=True)
        if restored is not None:
            return restored[0].model()
    if cfg.epochs:
        state, _ = train.fit(
            state, train.make_train_epoch(objectives.next_token_loss, optimizer),
            objectives.policy_batch(prompts, prompt_mask, responses, response_mask), epochs=cfg.epochs,
            batch_size=cfg.batch_size, rng=np.random.default_rng([seed, 1]), desc=desc, progress=progress)
    if checkpoints is not None:
        checkpoints.save(0, state, {"config": config})
    return state.model()
