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
        """``n`` training prompts: ids int32 ``[n, P]`` and mask bool ``[n, P]``.

        A task may also have ``sample_prompt_rows(rng, n, rows)``: rows ``rows`` of what
        ``sample_prompts(rng, n)`` returns, drawing from ``rng`` exactly as it does, making (encoding,
        loading) only those rows; see :func:`prompt_rows`.
        """

    def eval_prompts(self) -> tuple[np.ndarray, np.ndarray]:
        """The fixed evaluation prompts."""

    def reward(self, prompts: np.ndarray, completions: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """float ``[n]`` inside ``reward_range`` for completions ``[n, N]`` (mask False after EOS)."""


def prompt_rows(task: Task, rng: np.random.Generator, n: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``rows`` (int ``[r]``) of ``task.sample_prompts(rng, n)``: ids ``[r, P]`` and mask,
    with ``rng`` left as ``sample_prompts`` leaves it. On a pod each host asks for the rows it
    decodes; a task with ``sample_prompt_rows`` makes only those, any other makes all and slices."""
    rows = np.asarray(rows, np.int64)
    if rows.size and not (0 <= rows.min() and rows.max() < n):
        raise ValueError(f"prompt rows must lie in [0, {n}), got {rows.min()}..{rows.max()}")
    some = getattr(task, "sample_prompt_rows", None)
    if some is not None:
        return some(rng, n, rows)
    ids, mask = task.sample_prompts(rng, n)
    return ids[rows], mask[rows]


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
