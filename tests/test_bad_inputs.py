"""Every bad input we know of, what `qsharp` answers, and the generated table of it in
docs/bad_inputs.md (this test fails when the table is stale; ``QSHARP_WRITE_DOCS=1`` rewrites it).

Each must end as one line on stderr naming what was wrong and how to fix it, exit code 2, no
traceback, and nothing written where a run directory would be.
"""

import os
import re
import socket
from pathlib import Path

import pytest

from experiments.tabular.__main__ import main as tabular_main
from qsharp_jax import cli
from qsharp_jax.lock import RunLock

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "bad_inputs.md"
TOY = "experiments/planted_token/config.yaml"
TINY = ["algorithm.iterations=1", "algorithm.prompts_per_iteration=8", "algorithm.epochs=1"]


def _cases(tmp: Path, done: Path) -> list[tuple[str, list[str]]]:
    """(what is wrong, the command) pairs; ``done`` is a completed run directory."""
    (tmp / "bad.yaml").write_text("algorithm: {eta: 0.1\n")
    (tmp / "binary.yaml").write_bytes(bytes(range(256)))
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    (tmp / "a_file").write_text("")
    run = f"run_dir={tmp}/run"
    math = _math_files(tmp)
    return [
        ("config file is not valid YAML", ["train", str(tmp / "bad.yaml"), run]),
        ("config file is binary", ["train", str(tmp / "binary.yaml"), run]),
        ("config file holds a list", ["train", str(tmp / "list.yaml"), run]),
        ("config file does not exist", ["train", str(tmp / "missing.yaml"), run]),
        ("unknown field (a typo)", ["train", TOY, run, "algorithm.etaa=0.1"]),
        ("override without `=`", ["train", TOY, run, "algorithm.eta"]),
        ("override value not YAML", ["train", TOY, run, "algorithm.eta=[0.1"]),
        ("wrong type", ["train", TOY, run, "algorithm.eta=abc"]),
        ("η = 0", ["train", TOY, run, "algorithm.eta=0"]),
        ("η < 0", ["train", TOY, run, "algorithm.eta=-1"]),
        ("unknown guidance", ["train", TOY, run, "algorithm.guidance=qsharpp"]),
        ("unknown loss", ["train", TOY, run, "algorithm.loss=kl"]),
        ("iterations = 0", ["train", TOY, run, "algorithm.iterations=0"]),
        ("temperature = 0", ["train", TOY, run, "algorithm.temperature=0"]),
        ("top_k beyond the vocabulary", ["train", TOY, run, "algorithm.top_k=9"]),
        ("unknown task", ["train", TOY, run, "task=chess"]),
        ("mesh of the wrong length", ["train", TOY, run, "mesh=[2,2]"]),
        ("mesh that does not match the devices", ["train", TOY, run, "mesh=[3,1,1]"]),
        ("train batch that does not split over the mesh", ["train", TOY, run, "mesh=[8,1,1]", "algorithm.batch_size=4"]),
        ("multi-host start-up without the coordinator's address",
         ["train", TOY, run, "--num-processes", "2", "--process-id", "0"]),
        ("a process id outside the job",
         ["train", TOY, run, "--coordinator-address", "127.0.0.1:1", "--num-processes", "2", "--process-id", "5"]),
        ("a coordinator address without a port", ["train", TOY, run, "--coordinator-address", "localhost",
                                                   "--num-processes", "2", "--process-id", "1", "--init-timeout", "1"]),
        ("atoms that do not cover the rewards", ["train", TOY, run, "head.v_max=0.5"]),
        ("loss the head cannot fit", ["train", TOY, run, "algorithm.loss=bernoulli"]),
        ("guidance the head cannot give", ["train", TOY, run, "algorithm.guidance=bernoulli"]),
        ("value and π_ref vocabularies differ", ["train", TOY, run, "value.vocab_size=9"]),
        ("unknown attention kernel", ["train", TOY, run, "value.attention_kernel=flash"]),
        ("an attention kernel this machine lacks", ["train", TOY, run, "value.attention_kernel=cudnn"]),
        ("negative learning rate", ["train", TOY, run, "algorithm.optimizer.learning_rate=-1"]),
        ("a learning rate so large that the fit diverges",
         ["train", TOY, f"run_dir={tmp}/diverged", *TINY, "algorithm.optimizer.learning_rate=1e30"]),
        ("run_dir is a file", ["train", TOY, f"run_dir={tmp}/a_file"]),
        ("run_dir cannot be written (below a file)", ["train", TOY, f"run_dir={tmp}/a_file/run"]),
        ("resume with another config", ["train", TOY, f"run_dir={done}", *TINY, "algorithm.eta=0.2"]),
        ("run directory in use", ["train", TOY, f"run_dir={tmp}/locked", *TINY]),
        ("run_dir is a gs:// URL (not a filesystem)", ["train", TOY, "run_dir=gs://bucket/runs/x"]),
        ("math: no train_file", ["train", run, *math["models"]]),
        ("math: a record without its answer", ["train", run, *math["models"], f"math.tokenizer={tmp}/chat",
                                               f"math.train_file={tmp}/bad.jsonl"]),
        ("math: dataset file does not exist", ["train", run, *math["models"], f"math.tokenizer={tmp}/chat",
                                               f"math.train_file={tmp}/none.jsonl"]),
        ("math: tokenizer without a chat template", ["train", run, *math["models"], f"math.train_file={tmp}/ok.jsonl",
                                                     f"math.tokenizer={tmp}/plain"]),
        ("math: value tokenizer differs from π_ref's", ["train", run, *math["args"], f"math.value_tokenizer={tmp}/other"]),
        ("math: every prompt longer than max_prompt_len", ["train", run, *math["args"], "math.max_prompt_len=4"]),
        ("math: prompt + response beyond learned positions",
         ["train", run, *math["args"], "reference.architecture=gpt2", "algorithm.max_new_tokens=60"]),
        ("math: eos_token not in the tokenizer", ["train", run, *math["args"], "math.eos_token=<eos>"]),
        ("unknown model preset", ["train", run, *math["args"], "reference.preset=llama-9b"]),
        ("eval-math of a run of another task", ["eval-math", str(done)]),
        ("eval-math: samples = 0", ["eval-math", str(done), "samples=0"]),
        ("eval-math: out is an s3:// URL", ["eval-math", str(done), "out=s3://bucket/eval"]),
        ("eval of a directory that is no run", ["eval", str(tmp)]),
        ("eval --mesh that is not three integers", ["eval", str(done), "--mesh", "2,2"]),
        ("sample --num 0", ["sample", str(done), "--num", "0"]),
        ("sample --num beyond the evaluation prompts", ["sample", str(done), "--num", "1000"]),
        ("plot of a directory that is no run", ["plot", str(tmp / "nothing")]),
        ("tabular: η = 0", ["tabular", "etas=[0]"]),
        ("tabular: depth 0", ["tabular", "depths=[0]"]),
    ]


def _math_files(tmp: Path) -> dict[str, list[str]]:
    """A 2-problem math dataset, a broken one, tokenizers (with a chat template, without one, another
    vocabulary), and the arguments of a math run on them with fresh models."""
    from test_math_data import tiny_chat_tokenizer

    (tmp / "ok.jsonl").write_text('{"problem": "two plus three", "answer": "5"}\n{"problem": "one", "answer": "1"}\n')
    (tmp / "bad.jsonl").write_text('{"problem": "two plus three", "answer": "5"}\n{"problem": "one"}\n')
    tiny_chat_tokenizer().save_pretrained(tmp / "chat")
    tiny_chat_tokenizer(template=False).save_pretrained(tmp / "plain")
    tiny_chat_tokenizer(extra=["four"]).save_pretrained(tmp / "other")
    models = ["task=math", "reference.vocab_size=40", "value.vocab_size=40", "math.workers=1", "math.eos_token=<end>"]
    return {"models": models, "args": [*models, f"math.train_file={tmp}/ok.jsonl", f"math.eval_file={tmp}/ok.jsonl",
                                       f"math.tokenizer={tmp}/chat"]}


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("done")
    assert cli.main(["train", TOY, f"run_dir={run_dir}", *TINY]) == 0
    return run_dir


def _answer(argv: list[str], capsys) -> tuple[int, str]:
    main = tabular_main if argv[0] == "tabular" else cli.main
    with pytest.raises(SystemExit) as exit_:
        main(argv[1:] if argv[0] == "tabular" else argv)
    return exit_.value.code, capsys.readouterr().err


def _generic(text: str, tmp: Path, done: Path) -> str:
    text = text.replace(str(done), "RUN").replace(str(tmp), "TMP")
    text = text.replace(socket.gethostname(), "HOST").replace(f"pid {os.getpid()}", "pid PID")
    text = re.sub(r"since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "since TIME", text)
    # the values of a diverged step depend on the machine's float rounding; the table must not
    return re.sub(r"\(loss \S+, gradient norm \S+\)", "(loss L, gradient norm G)", text)


def test_every_bad_input_gets_one_line_and_exit_2(tmp_path, done, capsys):
    rows = []
    for what, argv in _cases(tmp_path, done):
        if what == "run directory in use":
            (tmp_path / "locked").mkdir()
            with RunLock(tmp_path / "locked"):
                code, err = _answer(argv, capsys)
        else:
            code, err = _answer(argv, capsys)
        assert code == 2 and "Traceback" not in err, (what, code, err)
        # progress bars (of a run that got as far as its fit) may precede it; the error is one line
        lines = [line for line in err.splitlines() if ": error: " in line]
        assert len(lines) == 1 and err.rstrip().endswith(lines[0].strip()), (what, err)
        assert not (tmp_path / "run").exists(), what  # refused before the run directory was made
        assert not list((tmp_path / "diverged").glob("checkpoints/*")), what  # no diverged state saved
        command = " ".join(("python -m experiments.tabular" if argv[0] == "tabular" else "qsharp " + argv[0],
                            *argv[1:]))
        message = lines[0].split(": error: ", 1)[-1]
        rows.append(f"| {what} | `{_generic(command, tmp_path, done)}` | "
                    f"{_generic(message, tmp_path, done).replace('|', '/')} |")
    table = ("# What each bad input gets\n\n"
             "Generated by `tests/test_bad_inputs.py` (it fails when this file is stale; "
             "`QSHARP_WRITE_DOCS=1 pytest tests/test_bad_inputs.py` rewrites it). Every case exits with code 2 "
             "and prints one line on stderr; nothing is written to the run directory (the diverging run keeps its "
             "collected data, and no checkpoint of the diverged state). `TMP` and `RUN` stand for "
             "the test's temporary directory and a completed run; `L` and `G` the diverged step's loss and "
             "gradient norm.\n\n"
             "| bad input | command | message |\n|---|---|---|\n" + "\n".join(rows) + "\n")
    if os.environ.get("QSHARP_WRITE_DOCS"):
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(table)
    assert DOC.exists() and DOC.read_text() == table, "docs/bad_inputs.md is stale: rerun with QSHARP_WRITE_DOCS=1"
