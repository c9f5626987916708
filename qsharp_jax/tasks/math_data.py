"""Math-reasoning data: GSM8K / MATH records from local JSONL, deterministic splits, and the
paper's prompt through a tokenizer's chat template (pure Python + the tokenizer).

Layouts read (one JSON object per line; a ``.json`` file holding a list works too):

- the official Q♯ layout of both datasets: ``{"problem", "solution", "answer"}`` (plus MATH's
  ``subject``/``type``, ``level``, ``unique_id`` where present);
- GSM8K's original ``{"question", "answer": "... #### 72"}``;
- MATH's original ``{"problem", "solution", "type"|"subject", "level"}`` with no ``answer``: the
  gold answer is the last ``\\boxed{}`` of the solution.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from qsharp_jax.config import read_text
from qsharp_jax.tasks.math import extract_answer

# The paper's prompt (one user turn, no system prompt, no few-shot examples).
PROMPT = "Problem:\n\n{problem} Write your answer inside \\boxed{{}}.\n\nSolution:"


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem: its text, gold answer, reference solution and (MATH) subject and level."""

    problem: str
    answer: str
    solution: str = ""
    subject: str | None = None
    level: str | None = None
    id: str | None = None


def load_problems(path: str | Path) -> list[Problem]:
    """Every record of a local JSONL (or JSON list) file as a :class:`Problem`, or of every
    ``*.json`` file (one record each) under a directory (MATH's release: ``train/<subject>/<n>.json``);
    a bad record is a ValueError naming the file, the line and the field."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.json"))
        if not files:
            raise ValueError(f"dataset directory {path} holds no *.json files")
        problems = []
        for file in files:
            try:
                record = json.loads(read_text(file, "dataset file", "JSON"))
            except ValueError as error:
                raise ValueError(f"{file}: not valid JSON ({error})") from None
            problems.append(_problem(record, str(file)))
        return problems
    text = read_text(path, "dataset file", "JSONL")
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except ValueError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: a .json dataset must hold a list of records, got a {type(records).__name__}")
        numbered = [(f"record {i}", r) for i, r in enumerate(records)]
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    numbered.append((f"line {number}", json.loads(line)))
                except ValueError as error:
                    raise ValueError(f"{path}:{number}: not a JSON object ({error})") from None
    problems = [_problem(record, f"{path}, {where}") for where, record in numbered]
    if not problems:
        raise ValueError(f"{path} holds no records")
    return problems


def prepare_gsm8k(data_dir: str | Path, train_file: str | Path, test_file: str | Path) -> Path:
    """Prepare tensorflow-datasets' ``gsm8k`` in ``data_dir`` from GSM8K's own JSONL files (its
    ``train.jsonl`` / ``test.jsonl``) instead of its download (the builder's URLs are answered with
    the local files; its "socratic" splits, unused here, get the same files). Returns the
    dataset's directory; :func:`load_source` reads it as ``tfds:gsm8k/train``."""
    from unittest import mock

    import tensorflow_datasets as tfds
    from tensorflow_datasets.text.gsm8k import gsm8k  # noqa: F401 - registers the builder

    local = {"train": Path(train_file), "test": Path(test_file)}
    for split, file in local.items():
        load_problems(file)  # a missing file or a bad record fails here, by name, not inside tfds
    builder = tfds.builder("gsm8k", data_dir=str(data_dir), file_format="array_record")
    answer = lambda _, urls: {k: str(local[k.split("_")[0]]) for k in urls}  # noqa: E731
    with mock.patch.object(tfds.download.DownloadManager, "download_and_extract", answer):
        builder.download_and_prepare()
    return Path(builder.data_dir)


def load_source(source: str, tfds_data_dir: str | Path | None = None) -> list[Problem]:
    """The problems of ``source``: a local file or directory (:func:`load_problems`), or
    ``tfds:<name>/<split>`` (e.g. ``tfds:gsm8k/train``), a tensorflow-datasets dataset prepared in
    ``tfds_data_dir`` (read with ``tfds.data_source``, without TensorFlow)."""
    if not source.startswith("tfds:"):
        return load_problems(source)
    name, _, split = source.removeprefix("tfds:").partition("/")
    if not name or not split or not tfds_data_dir:
        raise ValueError(f"{source!r}: a tensorflow-datasets source is tfds:<name>/<split> (e.g. tfds:gsm8k/train) "
                         "and needs math.tfds_data_dir, where it was prepared (qsharp prepare-gsm8k)")
    import tensorflow_datasets as tfds

    try:
        records = tfds.data_source(name, split=split, data_dir=str(tfds_data_dir), download=False)
    except Exception as error:  # noqa: BLE001 - tfds raises many kinds; all mean "not prepared there"
        raise ValueError(f"{source!r} cannot be read from {tfds_data_dir} ({' '.join(str(error).split())[:200]}); "
                         "prepare it first (qsharp prepare-gsm8k)") from None
    text = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
    return [_problem({k: text(v) for k, v in records[i].items()}, f"{source} record {i}") for i in range(len(records))]


def _problem(record: Any, where: str) -> Problem:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    text = record.get("problem", record.get("question"))
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: field 'problem' (or GSM8K's 'question') is missing or empty")
    solution = record.get("solution", "")
    answer = record.get("answer")
    if isinstance(answer, str) and "####" in answer:  # GSM8K's original: the solution, then "#### 72"
        solution, answer = answer.rsplit("####", 1)[0].strip(), extract_answer(answer)
    elif answer is None and isinstance(solution, str):  # MATH's original: the last \boxed{} of the solution
        answer = extract_answer(solution)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"{where}: no gold answer: field 'answer' is missing or empty and the solution has no "
                         "\\boxed{} (or '####') answer")
    if not isinstance(solution, str):
        raise ValueError(f"{where}: field 'solution' must be text, got {type(solution).__name__}")
    subject = record.get("subject", record.get("type"))
    level = record.get("level")
    return Problem(problem=text, answer=answer.strip(), solution=solution,
                   subject=None if subject is None else str(subject), level=None if level is None else str(level),
                   id=None if record.get("unique_id") is None else str(record["unique_id"]))


def split_problems(problems: Sequence[Problem], eval_fraction: float, seed: int = 0
                   ) -> tuple[list[Problem], list[Problem]]:
    """(train, eval): a problem goes to eval when a seeded hash of its text falls below
    ``eval_fraction`` — the same problem lands on the same side whatever else the file holds."""
    if not 0 <= eval_fraction <= 1:
        raise ValueError(f"eval_fraction must lie in [0, 1], got {eval_fraction}")
    train, held_out = [], []
    for p in problems:
        digest = hashlib.sha256(f"{seed}\0{p.problem}".encode()).digest()
        (held_out if int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction else train).append(p)
    return train, held_out


def chat_prompt(tokenizer, problem: str) -> str:
    """The paper's prompt for ``problem`` as one user turn of ``tokenizer``'s chat template, with
    the generation prompt (the text the model continues)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} has no chat "
                         "template; use an Instruct model's tokenizer (its tokenizer_config.json carries "
                         "'chat_template') or set tokenizer.chat_template")
    return tokenizer.apply_chat_template([{"role": "user", "content": PROMPT.format(problem=problem)}],
                                         add_generation_prompt=True, tokenize=False)


def encode_prompts(tokenizer, problems: Sequence[Problem], max_prompt_len: int, pad_id: int | None = None, *,
                   too_long: Literal["drop", "error"] = "drop") -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Left-padded chat prompts: (ids int32 ``[n, P]``, mask bool ``[n, P]``, kept indices).

    Tokenized without extra special tokens (the template writes them). A prompt longer than
    ``max_prompt_len`` is never cut: it is dropped with a warning giving the count (or, with
    ``too_long="error"``, refused). ``pad_id`` defaults to the tokenizer's pad token.
    """
    pad_id = tokenizer.pad_token_id if pad_id is None else pad_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token: pass pad_id (Llama 3: the id of "
                         "<|reserved_special_token_0|>)")
    encoded = [encode_prompt(tokenizer, p) for p in problems]
    kept = fitting_prompts([len(ids) for ids in encoded], max_prompt_len, too_long=too_long)
    return (*left_pad([encoded[i] for i in kept], pad_id), kept)


def encode_prompt(tokenizer, problem: Problem) -> list[int]:
    """One problem's chat prompt as token ids (no extra special tokens: the template writes them)."""
    return tokenizer(chat_prompt(tokenizer, problem.problem), add_special_tokens=False)["input_ids"]


def fitting_prompts(lengths: Sequence[int], max_prompt_len: int, *,
                    too_long: Literal["drop", "error"] = "drop") -> list[int]:
    """Indices of the prompts of these token ``lengths`` that fit ``max_prompt_len`` (the others:
    a warning giving the count, or with ``too_long="error"`` refused; none fitting is refused)."""
    kept = [i for i, n in enumerate(lengths) if n <= max_prompt_len]
    if len(kept) < len(lengths):
        message = (f"{len(lengths) - len(kept)} of {len(lengths)} prompts are longer than max_prompt_len="
                   f"{max_prompt_len} tokens (longest {max(lengths)})")
        if too_long == "error":
            raise ValueError(message + "; raise max_prompt_len")
        warnings.warn(message + "; they are left out", stacklevel=3)
    if not kept:
        raise ValueError(f"all {len(lengths)} prompts are longer than max_prompt_len={max_prompt_len} tokens "
                         f"(shortest {min(lengths)}); raise math.max_prompt_len")
    return kept


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, width: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Token lists as a left-padded batch: (ids int32 ``[n, width]``, mask bool ``[n, width]``;
    ``width`` defaults to the longest)."""
    width = max(map(len, sequences)) if width is None else width
    ids = np.full((len(sequences), width), pad_id, np.int32)
    mask = np.zeros((len(sequences), width), bool)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = seq
        mask[row, width - len(seq):] = True
    return ids, mask
