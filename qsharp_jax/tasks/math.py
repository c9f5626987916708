"""Math-reasoning answers: extraction, equivalence and the paper's Table-1 metrics (pure Python).

The rules follow the paper's evaluation (official code, ``math_reasoning/``): an answer is the last
brace-matched ``\\boxed{...}`` of a response (GSM8K's ``#### 42`` form as a fallback, for gold
solutions); a prediction is right if it equals the gold answer after normalization, else if
math-verify finds them equivalent (``verify(parse("$gold$"), parse("$pred$"))``). pass@1 is the
mean correctness over problems and samples; maj1@k the fraction of problems whose majority answer
among the first k samples (classes of equivalent answers, empty answers ignored, ties broken at
random with a seed) is right.

math-verify is imported lazily: only :func:`answers_match` needs it.
"""

from __future__ import annotations

import functools
import re
import signal
import threading
import time
from typing import Callable, Sequence, TypeVar

import numpy as np

T = TypeVar("T")

# Seconds one equivalence check may take (sympy can hang on adversarial input); a check that runs
# out is scored as not equivalent.
VERIFY_TIMEOUT = 5.0

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def extract_answer(text: str) -> str | None:
    """The content of the last brace-matched ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``;
    else what follows the last ``####`` (GSM8K's gold form) on its line; else None.

    A ``\\boxed{`` whose braces never close (a response cut at its length limit) is skipped for
    the one before it.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_answer needs a str, got {type(text).__name__}")
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    if "####" in text:
        answer = text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
        return answer or None
    return None


def normalize(answer: str) -> str:
    """A canonical spelling for exact comparison: no spaces or ``$``, ``\\dfrac``/``\\tfrac`` as
    ``\\frac``, no ``\\left``/``\\right`` or spacing commands, thousands separators dropped from
    plain numbers (``70,000`` → ``70000``; a tuple ``(1,2)`` keeps its comma), a trailing period
    dropped."""
    s = answer.strip().strip("$").strip()
    for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""),
                     ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\ ", "")):
        s = s.replace(old, new)
    s = re.sub(r"\s+", "", s).rstrip(".")
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return s


def answers_match(pred: str | None, gold: str, *, timeout: float = VERIFY_TIMEOUT) -> bool:
    """Is ``pred`` the same answer as ``gold``? Equal after :func:`normalize`, else equivalent by
    math-verify within ``timeout`` seconds. None (no answer), an unparsable answer or a check that
    runs out of time is False; never raises."""
    if pred is None:
        return False
    if normalize(pred) == normalize(gold):
        return True
    try:
        return bool(_bounded(lambda: _verify(pred, gold), timeout, default=False))
    except Exception:  # noqa: BLE001 - math-verify and sympy raise anything on odd input: not equivalent
        return False


def _verify(pred: str, gold: str) -> bool:
    parse, verify = _math_verify()
    return verify(parse(f"${gold}$", parsing_timeout=None), parse(f"${pred}$", parsing_timeout=None),
                  timeout_seconds=None)


@functools.cache
def _math_verify():
    """math-verify's (parse, verify), imported once per process (a worker's first check)."""
    import logging

    from math_verify import parse, verify

    # their own time-outs use signal.alarm, which only works in the main thread: ours bounds both
    # (so their warning that none is set, logged on every call, says nothing here)
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return parse, verify


def _bounded(fn: Callable[[], T], timeout: float, default: T) -> T:
    """``fn()``, or ``default`` if it takes longer than ``timeout`` seconds. In the main thread a
    SIGALRM interrupts it; elsewhere it runs in a daemon thread that is abandoned when late."""
    if threading.current_thread() is threading.main_thread():
        def expire(signum, frame):
            raise TimeoutError

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            return fn()
        except TimeoutError:
            return default
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    result: list = []
    worker = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    worker.start()
    worker.join(timeout)
    return result[0] if result else default


def pass_at_1(correct) -> float:
    """Mean correctness over problems and samples: ``correct`` is bool ``[problems, samples]``."""
    correct = np.asarray(correct)
    if correct.ndim != 2 or correct.shape[0] == 0 or correct.shape[1] == 0:
        raise ValueError(f"correct must be [problems, samples] with both >= 1, got shape {correct.shape}")
    return float(correct.astype(np.float64).mean())


def majority_answer(answers: Sequence[str | None], rng: np.random.Generator,
                    same: Callable[[str, str], bool] = lambda a, b: answers_match(a, b)) -> str | None:
    """The answer of the largest class of equivalent answers (None ignored; a tie is broken by
    ``rng``); None when every answer is None. Classes are formed greedily: an answer joins the
    first class whose first member it matches."""
    classes: list[list[str]] = []
    for answer in answers:
        if answer is None:
            continue
        for members in classes:
            if same(answer, members[0]):
                members.append(answer)
                break
        else:
            classes.append([answer])
    if not classes:
        return None
    sizes = np.array([len(c) for c in classes])
    best = np.flatnonzero(sizes == sizes.max())
    return classes[int(rng.choice(best))][0]


def maj_at_k(answers: Sequence[Sequence[str | None]], golds: Sequence[str], k: int, *, seed: int = 0) -> float:
    """maj1@k: the fraction of problems whose majority answer over their first ``k`` samples
    matches the gold answer (:func:`majority_answer`; ties broken by ``seed``)."""
    if len(answers) != len(golds) or not answers:
        raise ValueError(f"need one list of answers per gold answer (>= 1 problem), got {len(answers)} lists and "
                         f"{len(golds)} golds")
    short = [i for i, a in enumerate(answers) if len(a) < k]
    if k < 1 or short:
        raise ValueError(f"maj_at_k needs k >= 1 and at least k samples per problem; k={k}, problems with fewer: "
                         f"{short[:5]}")
    rng = np.random.default_rng(seed)
    hits = [answers_match(majority_answer(list(a[:k]), rng), g) for a, g in zip(answers, golds)]
    return float(np.mean(hits))


def _worker(conn, verify: Callable[[str, str], bool]) -> None:
    """A checker process: answers ``(pred, gold)`` pairs from ``conn`` until it gets None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which stops us
    try:  # warm up (imports, parser tables) before any pair's time-out starts counting
        verify("1", "1")
    except Exception:  # noqa: BLE001 - a verify that fails here fails on real pairs the same way
        pass
    conn.send("ready")
    while True:
        try:
            item = conn.recv()
        except EOFError:  # the parent is gone
            return
        if item is None:
            return
        pred, gold = item
        try:
            conn.send(bool(verify(pred, gold)))
        except Exception:  # noqa: BLE001 - odd input: not equivalent
            conn.send(False)


STARTUP_TIMEOUT = 300  # seconds for a checking worker to start and import its verifier


class AnswerChecker:
    """Checks many (prediction, gold) pairs in worker processes, each pair within ``timeout``
    seconds: a pathological LaTeX string that hangs sympy (even inside C code, where no signal
    reaches it) costs one worker, which is killed and replaced; the pair counts as wrong and as a
    time-out. Use as a context manager, or call :meth:`close`.

    Pairs equal after :func:`normalize` (most right answers) and None predictions never reach a
    worker. Workers are started with ``spawn`` (no copy of the parent's JAX state). ``verify``:
    the equivalence check the workers run (a module-level function; default math-verify's).
    """

    def __init__(self, workers: int = 2, timeout: float = VERIFY_TIMEOUT,
                 verify: Callable[[str, str], bool] | None = None):
        import multiprocessing

        if workers < 1 or not timeout > 0:
            raise ValueError(f"AnswerChecker needs workers >= 1 and timeout > 0, got {workers}, {timeout}")
        self._context = multiprocessing.get_context("spawn")
        self.timeout = timeout
        self._verify = _verify if verify is None else verify
        self.timeouts = 0  # pairs scored wrong because their check ran out of time, over all calls
        self._workers = [self._start() for _ in range(workers)]

    def _start(self):
        parent, child = self._context.Pipe()
        process = self._context.Process(target=_worker, args=(child, self._verify), daemon=True)
        process.start()
        child.close()
        # a fresh worker's first check includes its imports (seconds on a slow machine): wait for it
        # here, so that no pair is scored wrong for the worker's start-up
        try:
            ready = parent.poll(STARTUP_TIMEOUT) and parent.recv() == "ready"
        except EOFError:  # it died while starting
            ready = False
        if not ready:
            process.kill()
            raise RuntimeError(f"an answer-checking worker did not start within {STARTUP_TIMEOUT} s")
        return process, parent

    def __call__(self, preds: Sequence[str | None], golds: Sequence[str]) -> np.ndarray:
        """bool ``[n]``: does ``preds[i]`` match ``golds[i]`` (:func:`answers_match`'s rule)?"""
        from multiprocessing.connection import wait

        if len(preds) != len(golds):
            raise ValueError(f"{len(preds)} predictions for {len(golds)} gold answers")
        out = np.zeros(len(preds), bool)
        queue = []
        for i, (pred, gold) in enumerate(zip(preds, golds)):
            if pred is None:
                continue
            if normalize(pred) == normalize(gold):
                out[i] = True
            else:
                queue.append(i)
        queue.reverse()
        busy: dict[int, tuple[int, float]] = {}  # worker -> (item, deadline)
        clock = time.monotonic
        while queue or busy:
            for w in range(len(self._workers)):
                if w not in busy and queue:
                    i = queue.pop()
                    self._workers[w][1].send((preds[i], golds[i]))
                    busy[w] = (i, clock() + self.timeout)
            deadline = min(d for _, d in busy.values())
            ready = wait([self._workers[w][1] for w in busy], timeout=max(0.0, deadline - clock()))
            for w, (i, due) in list(busy.items()):
                conn = self._workers[w][1]
                if conn in ready:
                    try:
                        out[i] = conn.recv()
                    except EOFError:  # the worker died (e.g. out of memory): wrong, and replace it
                        self._replace(w)
                    del busy[w]
                elif clock() >= due:
                    self.timeouts += 1
                    self._replace(w)
                    del busy[w]
        return out

    def _replace(self, w: int) -> None:
        process, conn = self._workers[w]
        process.kill()
        process.join()
        conn.close()
        self._workers[w] = self._start()

    def close(self) -> None:
        for process, conn in self._workers:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            process.join(timeout=1)
            if process.is_alive():
                process.kill()
            conn.close()
        self._workers = []

    def __enter__(self) -> AnswerChecker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
