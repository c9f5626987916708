"""Math-reasoning answers: extraction on odd responses, equivalence, time-outs, and pass@1 / maj1@k
against brute force."""

import itertools
import time

import numpy as np
import pytest

from qsharp_jax.tasks import math as m


@pytest.mark.parametrize("text,expected", [
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{1} then, correcting myself, \\boxed{\\frac{14}{3}}", "\\frac{14}{3}"),  # the last one
    ("nested: \\boxed{\\left(\\frac{1}{2}, \\sqrt{\\frac{3}{4}}\\right)}", "\\left(\\frac{1}{2}, \\sqrt{\\frac{3}{4}}\\right)"),
    ("\\boxed {70,000}", "70,000"),
    ("\\fbox{x+1}", "x+1"),
    ("\\boxed{7} and then a cut-off \\boxed{\\frac{1}{", "7"),  # unbalanced last: the one before it
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),  # GSM8K gold
    ("#### 1,000\nextra line", "1,000"),
    ("no answer at all", None),
    ("\\boxed{}", ""),
    ("####   ", None),
])
def test_extract_answer(text, expected):
    assert m.extract_answer(text) == expected


@pytest.mark.parametrize("pred,gold,same", [
    ("70,000", "70000", True),
    ("\\frac{14}{3}", "14/3", True),
    ("\\dfrac{1}{2}", "0.5", True),
    ("(1,2)", "(1, 2)", True),
    ("(1,2)", "(2,1)", False),
    ("72.", "72", True),
    ("\\$18", "18", True),
    ("x^2+2x+1", "(x+1)^2", True),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True),
    ("71", "72", False),
    (None, "72", False),
    ("}}{{\\frac{", "72", False),  # unparsable: wrong, never a crash
    ("", "0", False),
])
def test_answers_match(pred, gold, same):
    assert m.answers_match(pred, gold) is same


def test_a_hanging_check_is_cut_off_and_scored_wrong(monkeypatch):
    def hang(pred, gold):
        time.sleep(30)

    monkeypatch.setattr(m, "_verify", hang)
    started = time.monotonic()
    assert m.answers_match("1", "2", timeout=0.2) is False
    assert time.monotonic() - started < 5
    import threading

    out = []  # off the main thread (no SIGALRM there): abandoned in a daemon thread, still bounded
    worker = threading.Thread(target=lambda: out.append(m.answers_match("1", "2", timeout=0.2)))
    started = time.monotonic()
    worker.start()
    worker.join(10)
    assert out == [False] and time.monotonic() - started < 5


def test_pass_at_1_is_the_mean_over_problems_and_samples():
    rng = np.random.default_rng(0)
    correct = rng.random((7, 5)) < 0.3
    assert m.pass_at_1(correct) == pytest.approx(sum(map(sum, correct.tolist())) / 35)
    with pytest.raises(ValueError, match=r"\[problems, samples\]"):
        m.pass_at_1(np.zeros(3, bool))


def _brute_force_majorities(samples):
    """Every answer that could win the vote (the most frequent non-None strings)."""
    counts = {a: samples.count(a) for a in set(samples) if a is not None}
    if not counts:
        return {None}
    top = max(counts.values())
    return {a for a, c in counts.items() if c == top}


def test_maj_at_k_against_brute_force():
    """Answers from a small set of integers (equivalence = equality, so brute force can count);
    every seed's vote is one of the brute-force winners, and ties are broken by the seed."""
    rng = np.random.default_rng(1)
    pool = ["1", "2", "3", None]
    for _ in range(40):
        problems = [[pool[i] for i in rng.integers(0, 4, size=8)] for _ in range(6)]
        golds = [str(g) for g in rng.integers(1, 4, size=6)]
        for k in (1, 3, 8):
            winners = [_brute_force_majorities(p[:k]) for p in problems]
            best = np.mean([g in w for w, g in zip(winners, golds)])  # a tie won by the gold answer
            worst = np.mean([w == {g} for w, g in zip(winners, golds)])  # only an outright win
            for seed in range(3):
                assert worst - 1e-9 <= m.maj_at_k(problems, golds, k, seed=seed) <= best + 1e-9
    # an outright majority wins whatever the seed; equivalent spellings vote together
    assert m.maj_at_k([["\\frac{1}{2}", "0.5", "1/2", "3", "3"]], ["1/2"], 5) == 1.0
    assert m.maj_at_k([[None, None, "4"]], ["4"], 3) == 1.0
    assert m.maj_at_k([[None, None]], ["4"], 2) == 0.0
    ties = {m.maj_at_k([["1", "2"]], ["1"], 2, seed=s) for s in range(20)}
    assert ties == {0.0, 1.0}  # a tie goes either way, by seed
    with pytest.raises(ValueError, match="at least k samples"):
        m.maj_at_k([["1"]], ["1"], 2)


def test_majority_answer_classes_are_formed_by_equivalence():
    rng = np.random.default_rng(0)
    same = lambda a, b: a.lower() == b.lower()  # noqa: E731
    assert m.majority_answer(["a", "B", "b", "A", "a"], rng, same) in {"a"}
    for answers in itertools.product(["x", "y", None], repeat=3):
        winners = _brute_force_majorities(list(answers))
        assert m.majority_answer(list(answers), rng, lambda a, b: a == b) in winners


def _hang_then_answer(pred, gold):
    """A stand-in for a sympy call that never returns (on the pair ("hang", ...))."""
    if pred == "hang":
        while True:
            pass
    return pred == gold


def test_answer_checker_kills_a_hanging_worker_and_goes_on():
    """In worker processes: a pair whose check hangs (in a busy loop no signal interrupts) is
    scored wrong and counted; the others are answered as answers_match would."""
    preds = ["70,000", "\\frac{14}{3}", None, "71", "(1,2)", "\\dfrac{1}{2}"]
    golds = ["70000", "14/3", "3", "72", "(2,1)", "0.5"]
    with m.AnswerChecker(workers=2, timeout=3) as check:
        got = check(preds, golds)
        assert got.tolist() == [m.answers_match(p, g) for p, g in zip(preds, golds)]
        assert got.tolist() == [True, True, False, False, False, True] and check.timeouts == 0
    # the time-out covers a replacement worker's start-up too (0.5 s was not enough on a loaded
    # 2-core machine: a fresh worker's first answer timed out); the hangs never end, so any bound
    # on the total shows that the checker goes on
    with m.AnswerChecker(workers=1, timeout=4.0, verify=_hang_then_answer) as check:
        started = time.monotonic()
        got = check(["hang", "5", "hang", "6"], ["1", "6", "2", "6"])
        assert got.tolist() == [False, False, False, True]
        assert check.timeouts == 2 and time.monotonic() - started < 120
