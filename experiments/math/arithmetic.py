"""The CPU math task: multi-step addition word problems, and the π_ref that solves them with
systematic, recoverable carry errors.

A problem ("Ann has 15 coins and gets Monday 8, Tuesday 6, Wednesday 9. How many coins now?") is
solved one step per line, then the boxed answer::

    Monday: 15 + 8 = 23
    Tuesday: 23 + 6 = 29
    Wednesday: 29 + 9 = 38
    \\boxed{38}

A step whose units overflow needs a carry into the tens. π_ref's data (what it is trained to
imitate) writes the carried tens digit with probability ``p_carry`` (0.4) and otherwise forgets the
carry (``15 + 8 = 13``), after which every later line is consistent with the wrong total and the
answer is wrong. With probability ``p_check`` (0.1) it first writes " (check)", after which the
carry is right with probability ``p_carry_checked`` (0.9). The mistake is recoverable: the right
digit is among π_ref's top candidates at every carry, and the value of a prefix is simple (0 once
a carry is lost, else the chance that π_ref gets the remaining carries right) — the regime where
Q♯'s optimal offset log E[exp(R/η)] beats CD's mean E[R]/η: with several carries ahead E[R] is
small, so CD barely moves π_ref, while exp(R/η) still separates right from wrong.

Every step is a look-up a small transformer learns in minutes on a CPU: the day after the last
one, the amount written after that day in the problem, the total of the line above. The tokenizer
keeps sequences short: one token per digit, word and fixed phrase (the paper's prompt text around
the problem, " (check)").

Pure Python + numpy: :func:`make_problems` draws problems (a :class:`~qsharp_jax.tasks.math_data.Problem`
each, its ``level`` the number of carries), :func:`solution` writes π_ref's training text,
:func:`make_tokenizer` builds the Hugging Face tokenizer (with a chat template) of the task,
:func:`carry_points` lists the decisions that matter (where a carry is kept or lost).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qsharp_jax.tasks.math_data import Problem

NAMES = ("Ann", "Ben", "Cy", "Dee", "Eve", "Finn", "Gus", "Hal")
THINGS = ("coins", "shells", "cards", "stamps", "marbles", "apples")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
SPECIAL = ("<|pad|>", "<|unk|>", "<|user|>", "<|assistant|>", "<|end|>")
# single tokens for the fixed phrases (matched first), then one per word or digit (with its leading
# space), newline or punctuation mark
PHRASES = ("Problem:\n\n", " Write your answer inside \\boxed{}.\n\nSolution:", " has", " and gets",
           ". How many", " now?", " (check)", "\\boxed{")
PIECES = r" ?[A-Za-z]+| ?\d|\n| ?[^\sA-Za-z\d]"
CHAT_TEMPLATE = ("{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@dataclasses.dataclass(frozen=True)
class ProblemConfig:
    """The problems and π_ref's noise.

    Fields:
      steps: the numbers of additions a problem can have (uniform; at most 5, one per weekday).
      min_carries, max_carries: the number of carries, uniform over this range.
      start: the starting amount lies in [start[0], start[1]] (totals stay below 100).
      p_carry: π_ref writes a needed carry.
      p_check: π_ref writes " (check)" before a step that needs a carry ...
      p_carry_checked: ... after which it writes the carry with this probability.
    """

    steps: tuple[int, ...] = (3, 4, 5)
    min_carries: int = 1
    max_carries: int = 5
    start: tuple[int, int] = (10, 49)
    p_carry: float = 0.4
    p_check: float = 0.1
    p_carry_checked: float = 0.9

    def __post_init__(self):
        if not self.steps or min(self.steps) < 1 or max(self.steps) > len(DAYS):
            raise ValueError(f"steps must lie in [1, {len(DAYS)}], got {self.steps}")
        if not 0 <= self.min_carries <= self.max_carries or self.min_carries > max(self.steps):
            raise ValueError(f"need 0 <= min_carries <= max_carries and min_carries <= max(steps), got {self}")
        if not 0 <= self.start[0] <= self.start[1] or self.start[1] + 9 * max(self.steps) > 99:
            raise ValueError(f"start={self.start}: totals must stay below 100 (start[1] + 9 * steps <= 99)")
        if not all(0 <= p <= 1 for p in (self.p_carry, self.p_check, self.p_carry_checked)):
            raise ValueError(f"probabilities must lie in [0, 1], got {self}")


def carries(start: int, amounts: tuple[int, ...]) -> int:
    """How many steps of ``start + amounts[0] + ...`` overflow the units."""
    count, total = 0, start
    for d in amounts:
        count += (total % 10) + d >= 10
        total += d
    return count


def make_problems(cfg: ProblemConfig, n: int, rng: np.random.Generator) -> list[Problem]:
    """``n`` problems with a number of carries uniform over ``[min_carries, max_carries]``;
    ``level`` is that number (as text), ``id`` the numbers (``"15:8,6,9"``)."""
    problems = []
    while len(problems) < n:
        c = int(rng.integers(cfg.min_carries, cfg.max_carries + 1))
        lengths = [k for k in cfg.steps if k >= c]
        if not lengths:
            continue
        k = int(rng.choice(lengths))
        start, amounts = _with_carries(cfg, k, c, rng)
        name, thing = NAMES[rng.integers(len(NAMES))], THINGS[rng.integers(len(THINGS))]
        gets = ", ".join(f"{day} {d}" for day, d in zip(DAYS, amounts))
        problems.append(Problem(problem=f"{name} has {start} {thing} and gets {gets}. How many {thing} now?",
                                answer=str(start + sum(amounts)), solution=solution(start, amounts), level=str(c),
                                id=f"{start}:{','.join(map(str, amounts))}"))
    return problems


def _with_carries(cfg: ProblemConfig, k: int, c: int, rng: np.random.Generator) -> tuple[int, tuple[int, ...]]:
    """A start and ``k`` amounts (1–9) with carries at ``c`` random steps: each amount is drawn
    among those that do (or do not) overflow the units there (redrawn when none can)."""
    while True:
        start = int(rng.integers(cfg.start[0], cfg.start[1] + 1))
        carry_at = set(rng.choice(k, size=c, replace=False).tolist())
        total, amounts = start, []
        for step in range(k):
            units = total % 10
            lo, hi = (max(1, 10 - units), 9) if step in carry_at else (1, 9 - units)
            if lo > hi:
                break
            amounts.append(int(rng.integers(lo, hi + 1)))
            total += amounts[-1]
        if len(amounts) == k:
            assert carries(start, tuple(amounts)) == c
            return start, tuple(amounts)


def numbers(problem: Problem) -> tuple[int, tuple[int, ...]]:
    """(start, amounts) of a problem of :func:`make_problems`."""
    start, amounts = problem.id.split(":")
    return int(start), tuple(int(d) for d in amounts.split(","))


def solution(start: int, amounts: tuple[int, ...], rng: np.random.Generator | None = None,
             cfg: ProblemConfig | None = None) -> str:
    """The step-by-step solution: right, or (with ``rng`` and ``cfg``) as π_ref's data writes it,
    each needed carry kept or forgotten as the module doc says."""
    lines, total = [], start
    for day, d in zip(DAYS, amounts):
        right = total + d
        written, check = right, ""
        if (total % 10) + d >= 10 and rng is not None:
            checked = rng.random() < cfg.p_check
            check = " (check)" if checked else ""
            if rng.random() >= (cfg.p_carry_checked if checked else cfg.p_carry):
                written = right - 10  # the carry into the tens is forgotten
        lines.append(f"{day}: {total} + {d}{check} = {written}")
        total = written
    return "\n".join(lines) + f"\n\\boxed{{{total}}}"


def carry_points(start: int, amounts: tuple[int, ...]) -> list[tuple[str, str, str, int]]:
    """Every needed carry of the right solution, as (the solution's text before the step's tens
    digit, the carried tens digit, the forgotten one, the carries still ahead after this one)."""
    points, lines, total = [], [], start
    ahead = carries(start, amounts)
    for day, d in zip(DAYS, amounts):
        right = total + d
        if (total % 10) + d >= 10:
            ahead -= 1
            points.append(("\n".join([*lines, f"{day}: {total} + {d} ="]), f" {right // 10}", f" {right // 10 - 1}",
                           ahead))
        lines.append(f"{day}: {total} + {d} = {right}")
        total = right
    return points


def make_tokenizer():
    """The task's tokenizer (decoding back to the exact text); the chat template wraps the user's
    turn as ``<|user|>…<|end|><|assistant|>``; EOS is ``<|end|>``."""
    import re

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    corpus = [*NAMES, *(f" {n}" for n in NAMES), *(f" {t}" for t in THINGS), *DAYS, *(f" {d}" for d in DAYS),
              *(f" {d}" for d in range(10)), *(str(d) for d in range(10)), " +", " =", ":", ",", "}", "\n"]
    pieces = sorted({p for text in corpus for p in re.findall(PIECES, text)})
    vocab = {t: i for i, t in enumerate([*SPECIAL, *PHRASES, *pieces])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(PIECES), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_tokens([AddedToken(p, normalized=False, single_word=False) for p in PHRASES])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|pad|>", unk_token="<|unk|>",
                                        eos_token="<|end|>", clean_up_tokenization_spaces=False)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
