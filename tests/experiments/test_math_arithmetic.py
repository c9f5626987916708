"""The CPU math demo's problems: carry counts as asked, right solutions that reach the gold answer,
π_ref's noise at the configured rates (against the exact probabilities), exact tokenization."""

import numpy as np
import pytest

from experiments.math import arithmetic
from qsharp_jax.tasks.math import extract_answer
from qsharp_jax.tasks.math_data import chat_prompt


def test_problems_and_right_solutions():
    cfg = arithmetic.ProblemConfig()
    problems = arithmetic.make_problems(cfg, 500, np.random.default_rng(0))
    counts = np.bincount([int(p.level) for p in problems], minlength=6)
    assert counts[0] == 0 and counts[1:].min() > 70  # 1..5 carries, about uniform
    for p in problems:
        start, amounts = arithmetic.numbers(p)
        assert arithmetic.carries(start, amounts) == int(p.level) and len(amounts) in cfg.steps
        assert int(p.answer) == start + sum(amounts) < 100
        assert extract_answer(p.solution) == p.answer and "(check)" not in p.solution
    assert arithmetic.solution(15, (8, 6)) == "Monday: 15 + 8 = 23\nTuesday: 23 + 6 = 29\n\\boxed{29}"
    with pytest.raises(ValueError, match="totals must stay below 100"):
        arithmetic.ProblemConfig(start=(10, 60))


def test_carry_points_are_the_right_solutions_decisions():
    assert arithmetic.carry_points(15, (8, 6, 9)) == [
        ("Monday: 15 + 8 =", " 2", " 1", 1), ("Monday: 15 + 8 = 23\nTuesday: 23 + 6 = 29\nWednesday: 29 + 9 =", " 3",
                                              " 2", 0)]
    for p in arithmetic.make_problems(arithmetic.ProblemConfig(), 200, np.random.default_rng(2)):
        right = p.solution
        points = arithmetic.carry_points(*arithmetic.numbers(p))
        assert [a for *_, a in points] == list(range(int(p.level) - 1, -1, -1))
        for text, kept, lost, _ in points:  # the right solution continues with the carried digit
            assert right.startswith(text + kept) and int(lost) == int(kept) - 1


def test_noisy_solutions_forget_carries_at_the_configured_rate():
    cfg = arithmetic.ProblemConfig()
    rng = np.random.default_rng(1)
    problems = arithmetic.make_problems(cfg, 4000, rng)
    right = np.array([extract_answer(arithmetic.solution(*arithmetic.numbers(p), rng, cfg)) == p.answer
                      for p in problems])
    # a carry is kept with probability p_check * p_carry_checked + (1 - p_check) * p_carry, each independently
    keep = cfg.p_check * cfg.p_carry_checked + (1 - cfg.p_check) * cfg.p_carry
    for c in range(1, 6):
        at = np.array([int(p.level) == c for p in problems])
        assert abs(right[at].mean() - keep**c) < 4 * np.sqrt(keep**c * (1 - keep**c) / at.sum()) + 1e-3, c


def test_tokenizer_round_trips_prompts_and_solutions():
    tok = arithmetic.make_tokenizer()
    cfg = arithmetic.ProblemConfig()
    rng = np.random.default_rng(2)
    for p in arithmetic.make_problems(cfg, 50, rng):
        for text in (chat_prompt(tok, p.problem), arithmetic.solution(*arithmetic.numbers(p), rng, cfg)):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids and tok.decode(ids) == text
    assert tok.eos_token == "<|end|>" and len(tok) <= 80
