"""The math-reasoning :class:`~qsharp_jax.tasks.Task`: problems as chat prompts, rewards from the
gold answers (1 if the response's answer matches, else 0).

Prompts are encoded once, left padded to the longest kept prompt; a prompt's gold answer is found
from its tokens, so the driver's repeated rows (samples per prompt) need no bookkeeping. Answers
are checked by an :class:`~qsharp_jax.tasks.math.AnswerChecker` (worker processes, each pair in
bounded time); the count of time-outs is kept in :attr:`MathTask.timeouts`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qsharp_jax.tasks.math import AnswerChecker, extract_answer
from qsharp_jax.tasks.math_data import Problem, encode_prompts


class MathTask:
    """Args:
      tokenizer: π_ref's Hugging Face tokenizer (with a chat template).
      train, evaluation: the problems Algorithm 1 samples from, and the fixed evaluation set.
      max_prompt_len: longer prompts are left out (with a warning giving the count).
      pad_id, eos_id: default the tokenizer's pad and EOS tokens (Llama 3 Instruct: pass the id of
        ``<|eot_id|>``, the end of an assistant turn).
      workers, timeout: of the answer checker.
    """

    reward_range = (0.0, 1.0)

    def __init__(self, tokenizer, train: Sequence[Problem], evaluation: Sequence[Problem], *, max_prompt_len: int,
                 pad_id: int | None = None, eos_id: int | None = None, workers: int = 2, timeout: float = 5.0):
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if pad_id is None else pad_id
        self.eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no EOS token: pass eos_id (the token that ends a response)")
        self._gold: dict[bytes, str] = {}  # a prompt's tokens (padding left out) -> its gold answer
        self._train = self._encode(train, max_prompt_len, "train")
        self._eval = self._encode(evaluation, max_prompt_len, "evaluation")
        self._checker = AnswerChecker(workers=workers, timeout=timeout)
        self.vocab_size = len(tokenizer)

    def _encode(self, problems: Sequence[Problem], max_prompt_len: int, name: str):
        if not problems:
            raise ValueError(f"the {name} set has no problems")
        ids, mask, kept = encode_prompts(self.tokenizer, problems, max_prompt_len, self.pad_id)
        for row, gold in zip(ids, (problems[i].answer for i in kept)):
            self._gold[self._key(row, row != self.pad_id)] = gold
        return ids, mask

    @staticmethod
    def _key(ids: np.ndarray, mask: np.ndarray) -> bytes:
        return np.asarray(ids)[np.asarray(mask, bool)].astype(np.int32).tobytes()

    @property
    def timeouts(self) -> int:
        """Answer checks scored wrong because they ran out of time, so far."""
        return self._checker.timeouts

    def sample_prompts(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = self._train
        rows = rng.choice(len(ids), size=n, replace=n > len(ids))
        return ids[rows], mask[rows]

    def eval_prompts(self) -> tuple[np.ndarray, np.ndarray]:
        return self._eval

    def answers(self, completions: np.ndarray, mask: np.ndarray) -> list[str | None]:
        """The answer (last ``\\boxed{}``) of each decoded completion, None where there is none."""
        texts = self.tokenizer.batch_decode([c[m] for c, m in zip(np.asarray(completions), np.asarray(mask, bool))],
                                            skip_special_tokens=True)
        return [extract_answer(t) for t in texts]

    def golds(self, prompts: np.ndarray, prompt_mask: np.ndarray | None = None) -> list[str]:
        """The gold answer of each prompt row (found by its tokens)."""
        prompts = np.asarray(prompts)
        masks = prompts != self.pad_id if prompt_mask is None else np.asarray(prompt_mask, bool)
        try:
            return [self._gold[self._key(p, m)] for p, m in zip(prompts, masks)]
        except KeyError:
            raise ValueError("a prompt is not one of this task's problems") from None

    def reward(self, prompts: np.ndarray, completions: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self._checker(self.answers(completions, mask), self.golds(prompts)).astype(np.float32)

    def close(self) -> None:
        self._checker.close()
