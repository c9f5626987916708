"""The planted-token task: a toy with a known answer, for tests and a first ``qsharp train``."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class PlantedTokenTask:
    """A toy task with a known answer: prompt ``(BOS=0, x)`` with x in 1..``num_keys``; reward 1
    iff the first response token is ``x + num_keys + 1``, else 0.

    A randomly initialized π_ref puts about 1/vocab on that token, so its reward is low; a value
    model fitted on π_ref's own rollouts lets Q♯ guidance find it.
    """

    vocab_size: int = 8  # must equal π_ref's vocabulary
    num_keys: int = 3  # prompts x in 1..num_keys
    eval_per_key: int = 32  # evaluation prompts per key
    eos_id: int | None = None
    pad_id: int = 0
    reward_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        if 2 * self.num_keys + 1 >= self.vocab_size + 1 or self.num_keys < 1:
            raise ValueError(f"need 1 <= num_keys and 2 * num_keys + 1 < vocab_size + 1, got num_keys={self.num_keys}, "
                             f"vocab_size={self.vocab_size}")

    def sample_prompts(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self.sample_prompt_rows(rng, n, np.arange(n))

    def sample_prompt_rows(self, rng: np.random.Generator, n: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if n < 1:
            raise ValueError(f"need at least one prompt per iteration, got {n}")
        x = rng.integers(1, self.num_keys + 1, size=n)[rows]
        return np.stack([np.zeros(len(x), int), x], 1).astype(np.int32), np.ones((len(x), 2), bool)

    def eval_prompts(self) -> tuple[np.ndarray, np.ndarray]:
        x = np.tile(np.arange(1, self.num_keys + 1), self.eval_per_key)
        return np.stack([np.zeros_like(x), x], 1).astype(np.int32), np.ones((len(x), 2), bool)

    def reward(self, prompts: np.ndarray, completions: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return ((completions[:, 0] == prompts[:, 1] + self.num_keys + 1) & mask[:, 0]).astype(np.float32)

