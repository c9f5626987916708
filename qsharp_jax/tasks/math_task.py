"""The math-reasoning :class:`~qsharp_jax.tasks.Task`: problems as chat prompts, rewards from the
gold answers (1 if the response's answer matches, else 0).

Prompts are encoded once, left padded to the longest kept prompt; a prompt's gold answer is found
from its tokens, so the driver's repeated rows (samples per prompt) need no bookkeeping. Answers
are checked by an :class:`~qsharp_jax.tasks.math.AnswerChecker` (worker processes, each pair in
bounded time); the count of time-outs is kept in :attr:`MathTask.timeouts`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from qsharp_jax import distributed
from qsharp_jax.tasks.math import VERIFY_TIMEOUT, AnswerChecker, extract_answer
from qsharp_jax.tasks.math_data import (Problem, encode_prompt, encode_prompts, fitting_prompts, left_pad, load_source,
                                          split_problems)


@dataclasses.dataclass(frozen=True)
class MathTaskConfig:
    """The ``math:`` section of a run config (``task: math``): data, tokenizer, answer checking.

    Fields:
      train_file: problems Algorithm 1 samples from: a local JSONL (or JSON list) file in the
        official Q♯ layout, GSM8K's original or MATH's original (:func:`~qsharp_jax.tasks.math_data.load_problems`).
      tfds_data_dir: where ``tfds:<name>/<split>`` sources (e.g. ``train_file: tfds:gsm8k/train``)
        were prepared (``qsharp prepare-gsm8k``).
      eval_file: the per-iteration evaluation problems; "" holds out ``eval_fraction`` of
        ``train_file`` (by a seeded hash of the problem text: the same split on every machine).
      eval_fraction: the held-out share of ``train_file`` when ``eval_file`` is "" (the paper: 0.1).
      split_seed: seed of that hash.
      max_eval_problems: evaluate each iteration on the first this-many evaluation problems (0: all).
      tokenizer: π_ref's tokenizer: ``reference`` (the one saved with ``reference.hf_path``),
        ``llama3`` / ``qwen2`` (built offline from the tiktoken ranks that pip packages ship, with
        the Instruct chat template), or a local Hugging Face tokenizer directory.
      value_tokenizer: the value model's, which must equal π_ref's token for token (Q♯ scores π_ref's
        candidates by id): ``value`` (the one saved with ``value.hf_path``; nothing to check for a
        fresh value model, which uses π_ref's ids), or as for ``tokenizer``.
      max_prompt_len: prompts longer than this many tokens are left out (their count is reported).
      eos_token: the token that ends a response ("": the tokenizer's EOS). Llama 3 Instruct:
        ``<|eot_id|>``; Qwen2.5 Instruct: ``<|im_end|>``.
      pad_token: left of prompts and after EOS ("": the tokenizer's pad token). Llama 3:
        ``<|reserved_special_token_0|>`` (as the paper's code).
      workers: answer-checking processes.
      timeout: seconds per answer check; a check that runs out is scored wrong and counted.
    """

    train_file: str = ""
    tfds_data_dir: str = ""
    eval_file: str = ""
    eval_fraction: float = 0.1
    split_seed: int = 0
    max_eval_problems: int = 0
    tokenizer: str = "reference"
    value_tokenizer: str = "value"
    max_prompt_len: int = 512
    eos_token: str = ""
    pad_token: str = ""
    workers: int = 2
    timeout: float = VERIFY_TIMEOUT

    def __post_init__(self):
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"math.eval_fraction must lie in (0, 1), got {self.eval_fraction}")
        bad = [f"{k}={getattr(self, k)}" for k in ("max_prompt_len", "workers") if getattr(self, k) < 1]
        if self.max_eval_problems < 0 or not self.timeout > 0 or bad:
            raise ValueError(f"math: need max_prompt_len >= 1, workers >= 1, max_eval_problems >= 0 and timeout > 0; "
                             f"got max_prompt_len={self.max_prompt_len}, workers={self.workers}, "
                             f"max_eval_problems={self.max_eval_problems}, timeout={self.timeout}")


BUILT_TOKENIZERS = ("llama3", "qwen2")  # built offline by qsharp_jax.models.tokenizers


def tokenizer_source(name: str, model_path: str | None, field: str, role: str) -> str:
    """Where the tokenizer a :class:`MathTaskConfig` field names comes from: one of
    :data:`BUILT_TOKENIZERS`, or a directory (``reference``/``value``: the one saved with the model
    at ``model_path``; else ``name`` itself), resolved so that one directory has one source."""
    if name == role:
        if not model_path:
            raise ValueError(f"math.{field}={name!r} reads the tokenizer saved with {role}.hf_path, which is not set; "
                             f"set math.{field} to llama3, qwen2 or a local tokenizer directory")
        return str(Path(model_path).resolve())
    if name in BUILT_TOKENIZERS:
        return name
    if not Path(name).is_dir():
        raise ValueError(f"math.{field}={name!r} is neither {role}, llama3, qwen2 nor a tokenizer directory")
    return str(Path(name).resolve())


def load_tokenizer_from(source: str):
    """The tokenizer of a :func:`tokenizer_source` (seconds for a large vocabulary: load each source once)."""
    from qsharp_jax.models import tokenizers
    from qsharp_jax.models.hf import load_tokenizer

    builders = dict(zip(BUILT_TOKENIZERS, (tokenizers.llama3_tokenizer, tokenizers.qwen2_tokenizer)))
    return builders[source]() if source in builders else load_tokenizer(source)


def check_same_tokenizer(ref_tokenizer, value_tokenizer) -> None:
    """Refuse a value model whose tokenizer is not π_ref's (its scores would go to other tokens).

    The text tokens must have the same ids; added (special) tokens only the same ids, since their
    names may differ between releases of one tokenizer (Llama 3.1 and 3.2 renamed some of Llama 3's
    reserved tokens, e.g. id 128004 ``<|reserved_special_token_2|>`` -> ``<|finetune_right_pad_id|>``).
    """
    def split(tokenizer):
        added = {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
        vocab = tokenizer.get_vocab()
        return vocab, {t: i for t, i in vocab.items() if i not in added}, added

    (ref_vocab, ref_text, ref_added), (value_vocab, value_text, value_added) = map(split, (ref_tokenizer, value_tokenizer))
    if ref_text == value_text and ref_added == value_added:
        return
    differ = sorted({t for t in ref_text.keys() | value_text.keys() if ref_text.get(t) != value_text.get(t)}
                    | {t for t, i in (ref_vocab | value_vocab).items() if i in ref_added ^ value_added},
                    key=lambda t: (ref_vocab.get(t, len(ref_vocab)), t))
    first = differ[0]
    raise ValueError(f"the value model's tokenizer ({len(value_vocab)} tokens) differs from π_ref's ({len(ref_vocab)} "
                     f"tokens): {len(differ)} tokens have other ids, e.g. {first!r} is {ref_vocab.get(first, 'absent')} "
                     f"for π_ref and {value_vocab.get(first, 'absent')} for the value model. Q♯ scores π_ref's candidate "
                     "tokens by id, so the value model must share π_ref's tokenizer (Llama 3 / 3.1 8B: Llama 3.2 1B; "
                     "Qwen2.5 7B: Qwen2.5 1.5B)")


def _token_id(tokenizer, token: str, field: str) -> int:
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        raise ValueError(f"math.{field}={token!r} is not a token of the tokenizer")
    return int(vocab[token])


class MathTask:
    """Args:
      tokenizer: π_ref's Hugging Face tokenizer (with a chat template).
      train, evaluation: the problems Algorithm 1 samples from, and the fixed evaluation set.
      max_prompt_len: longer prompts are left out (with a warning giving the count).
      pad_id, eos_id: default the tokenizer's pad and EOS tokens (Llama 3 Instruct: pass the id of
        ``<|eot_id|>``, the end of an assistant turn).
      workers, timeout: of the answer checker.

    Attributes:
      evaluation: the evaluation problems kept (in the order of :meth:`eval_prompts`).
    """

    reward_range = (0.0, 1.0)

    def __init__(self, tokenizer, train: Sequence[Problem], evaluation: Sequence[Problem], *, max_prompt_len: int,
                 pad_id: int | None = None, eos_id: int | None = None, workers: int = 2, timeout: float = 5.0):
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if pad_id is None else pad_id
        self.eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no EOS token: pass eos_id (the token that ends a response)")
        if self.pad_id is None:
            raise ValueError("the tokenizer has no pad token: set math.pad_token (Llama 3: "
                             "<|reserved_special_token_0|>)")
        self._gold: dict[bytes, str] = {}  # a prompt's tokens (padding left out) -> its gold answer
        self._train_problems, self._tokens = list(train), {}
        if not self._train_problems:
            raise ValueError("the train set has no problems")
        self._train_kept, self._train_width = self._measure_train(max_prompt_len)
        self._eval, self.evaluation = self._encode(evaluation, max_prompt_len, "evaluation")
        self._checker = AnswerChecker(workers=workers, timeout=timeout)
        self.vocab_size = len(tokenizer)

    @classmethod
    def from_config(cls, cfg: MathTaskConfig, *, reference: str | None, value: str | None) -> MathTask:
        """The task of a run config's ``math:`` section; ``reference`` / ``value``: the models'
        ``hf_path`` (None: a fresh model), where ``reference`` / ``value`` tokenizers are read."""
        if not cfg.train_file:
            raise ValueError("task: math needs math.train_file (a JSONL file of problems; see the README's "
                             "'Math reasoning' section)")
        source = tokenizer_source(cfg.tokenizer, reference, "tokenizer", "reference")
        tokenizer = load_tokenizer_from(source)
        if cfg.value_tokenizer != "value" or value:
            value_source = tokenizer_source(cfg.value_tokenizer, value, "value_tokenizer", "value")
            if value_source != source:  # one source needs no comparison with itself
                check_same_tokenizer(tokenizer, load_tokenizer_from(value_source))
        problems = load_source(cfg.train_file, cfg.tfds_data_dir)
        if cfg.eval_file:
            train, evaluation = problems, load_source(cfg.eval_file, cfg.tfds_data_dir)
        else:
            train, evaluation = split_problems(problems, cfg.eval_fraction, cfg.split_seed)
        if cfg.max_eval_problems:
            evaluation = evaluation[: cfg.max_eval_problems]
        return cls(tokenizer, train, evaluation, max_prompt_len=cfg.max_prompt_len,
                   pad_id=_token_id(tokenizer, cfg.pad_token, "pad_token") if cfg.pad_token else None,
                   eos_id=_token_id(tokenizer, cfg.eos_token, "eos_token") if cfg.eos_token else None,
                   workers=cfg.workers, timeout=cfg.timeout)

    def _measure_train(self, max_prompt_len: int) -> tuple[np.ndarray, int]:
        """Which train problems fit ``max_prompt_len`` (they are what is drawn from) and the width
        their prompts are padded to. On a pod each host tokenizes only every P-th problem (its
        slice) and the hosts gather the lengths; a problem's tokens are kept for when it is drawn."""
        index, count = jax.process_index(), jax.process_count()
        mine = range(index, len(self._train_problems), count)
        lengths = np.zeros(len(self._train_problems), np.int64)
        for rows, theirs in distributed.gather_objects((np.asarray(mine), [len(self._train_tokens(i)) for i in mine])):
            lengths[rows] = theirs
        kept = np.asarray(fitting_prompts(lengths.tolist(), max_prompt_len), np.int64)
        return kept, int(lengths[kept].max())

    def _train_tokens(self, i: int) -> list[int]:
        """Train problem ``i``'s prompt tokens, tokenized once on this host."""
        if i not in self._tokens:
            self._tokens[i] = encode_prompt(self.tokenizer, self._train_problems[i])
        return self._tokens[i]

    def _train_prompts(self, problems: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded prompts of these train problems (tokenized when first drawn here)."""
        ids, mask = left_pad([self._train_tokens(i) for i in problems], self.pad_id, self._train_width)
        for row, m, i in zip(ids, mask, problems):
            self._gold.setdefault(self._key(row, m), self._train_problems[i].answer)
        return ids, mask

    def _encode(self, problems: Sequence[Problem], max_prompt_len: int, name: str):
        if not problems:
            raise ValueError(f"the {name} set has no problems")
        ids, mask, kept = encode_prompts(self.tokenizer, problems, max_prompt_len, self.pad_id)
        for row, gold in zip(ids, (problems[i].answer for i in kept)):
            self._gold[self._key(row, row != self.pad_id)] = gold
        return (ids, mask), [problems[i] for i in kept]

    @staticmethod
    def _key(ids: np.ndarray, mask: np.ndarray) -> bytes:
        return np.asarray(ids)[np.asarray(mask, bool)].astype(np.int32).tobytes()

    @property
    def timeouts(self) -> int:
        """Answer checks scored wrong because they ran out of time, so far."""
        return self._checker.timeouts

    def sample_prompts(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self.sample_prompt_rows(rng, n, np.arange(n))

    def sample_prompt_rows(self, rng: np.random.Generator, n: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # which problems fit max_prompt_len (measured at start-up) decides what is drawn; only the
        # rows asked for are tokenized (a pod's host: the rows it decodes)
        kept = self._train_kept
        drawn = rng.choice(len(kept), size=n, replace=n > len(kept))[np.asarray(rows)]
        return self._train_prompts(kept[drawn])

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

    def check(self, answers: Sequence[str | None], golds: Sequence[str]) -> np.ndarray:
        """bool ``[n]``: does each answer match its gold (bounded time per pair; see :attr:`timeouts`)?"""
        return self._checker(answers, golds)

    def reward(self, prompts: np.ndarray, completions: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.check(self.answers(completions, mask), self.golds(prompts)).astype(np.float32)

    def close(self) -> None:
        self._checker.close()
