"""Tasks: what Algorithm 1 is run on. One module per task, each behind the one :class:`Task`
protocol and registered by name in :data:`TASKS` (the ``task`` field of ``qsharp train``).

A new task is a module here with a class that has the protocol's attributes and methods, plus one
line in :data:`TASKS`: a factory from the run's config (a task with settings of its own reads them
from its typed section of :class:`~qsharp_jax.runs.RunConfig`, as ``math`` does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

if TYPE_CHECKING:
    from qsharp_jax.runs import RunConfig


class Task(Protocol):
    """What Algorithm 1 needs from a task. Prompts are left padded to one fixed length.

    Attributes:
      eos_id: the token that ends a response (None: responses run to ``max_new_tokens``).
      pad_id: the token written after EOS.
      reward_range: ``(lo, hi)``, the rewards :meth:`reward` can return; the value head's atoms
        must cover it (checked before a run starts).
    """

    eos_id: int | None
    pad_id: int
    reward_range: tuple[float, float]

    def sample_prompts(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` training prompts: ids int32 ``[n, P]`` and mask bool ``[n, P]``."""

    def eval_prompts(self) -> tuple[np.ndarray, np.ndarray]:
        """The fixed evaluation prompts."""

    def reward(self, prompts: np.ndarray, completions: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """float ``[n]`` inside ``reward_range`` for completions ``[n, N]`` (mask False after EOS)."""


def _planted_token(cfg: RunConfig | None) -> Task:
    from qsharp_jax.tasks.planted_token import PlantedTokenTask

    return PlantedTokenTask()


def _star_graph(cfg: RunConfig | None) -> Task:
    from qsharp_jax.tasks.star_graph import StarGraphTask

    return StarGraphTask.make()


def _math(cfg: RunConfig | None) -> Task:
    from qsharp_jax.tasks.math_task import MathTask

    if cfg is None:
        raise ValueError("the math task needs a run config (its `math:` section names the data and tokenizer)")
    return MathTask.from_config(cfg.math, reference=cfg.reference.hf_path, value=cfg.value.hf_path)


# name -> a task from the run's config (imported lazily: a task's dependencies load only when used)
TASKS: dict[str, Callable[[RunConfig | None], Task]] = {
    "planted_token": _planted_token, "star_graph": _star_graph, "math": _math,
}


def make_task(name: str, cfg: RunConfig | None = None) -> Task:
    """The registered task ``name``, built from the run config ``cfg`` (None: its defaults)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name](cfg)
