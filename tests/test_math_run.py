"""The math pipeline end to end on a 4-problem fixture: `qsharp train` (task: math) with a tiny random
Llama (Llama 3's real tokenizer) and a tiny random Qwen2 checkpoint (Qwen's real tokenizer saved with
it), then `qsharp eval-math`. The models are random, so what is checked is the plumbing: every
number of eval.json follows from the samples it wrote (recomputed here), π_ref's KL is 0, the
Markdown table carries the same numbers, and eval-math over two processes writes what one writes."""

import json

import numpy as np
import pytest

from processes import launch, numbers, printed
from qsharp_jax import cli
from qsharp_jax.tasks.math import answers_match

PROBLEMS = [
    {"problem": "What is $2+3$?", "solution": "It is $\\boxed{5}$.", "answer": "5", "subject": "Algebra",
     "level": 1, "unique_id": "a/1"},
    {"problem": "Simplify $\\frac{28}{6}$.", "solution": "$\\boxed{\\frac{14}{3}}$", "answer": "\\frac{14}{3}",
     "subject": "Algebra", "level": 2, "unique_id": "a/2"},
    {"problem": "How many sides has a square?", "solution": "$\\boxed{4}$", "answer": "4", "subject": "Geometry",
     "level": 1, "unique_id": "g/1"},
    {"problem": "Write seventy thousand in digits.", "solution": "$\\boxed{70,000}$", "answer": "70,000",
     "subject": "Prealgebra", "level": 3, "unique_id": "p/1"},
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("math") / "problems.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return path


def common(data, run_dir):
    return [f"run_dir={run_dir}", "task=math", f"math.train_file={data}", f"math.eval_file={data}",
            "math.workers=1", "algorithm.iterations=1", "algorithm.prompts_per_iteration=4",
            "algorithm.samples_per_prompt=2", "algorithm.max_new_tokens=6", "algorithm.top_k=4",
            "algorithm.temperature=0.8", "algorithm.top_p=0.9", "algorithm.epochs=1"]


def check_eval(out_dir, methods, k):
    results = json.loads((out_dir / "eval.json").read_text())
    lines = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    assert results["problems"] == len(lines) == 4 and results["samples"] == k
    table = (out_dir / "eval.md").read_text()
    for method in methods:
        r = results["methods"][method]
        correct = np.array([row[method]["correct"] for row in lines])
        assert correct.shape == (4, k)
        # the stored correctness is the answer rule applied to the stored answers
        assert correct.tolist() == [[answers_match(a, row["gold"]) for a in row[method]["answers"]] for row in lines]
        assert r["pass@1"] == pytest.approx(correct.mean())
        assert r["ci95"]["pass@1"][0] <= r["pass@1"] <= r["ci95"]["pass@1"][1]
        none = np.mean([[a is None for a in row[method]["answers"]] for row in lines])
        assert r["no_answer"] == pytest.approx(none)
        assert sorted(r["by_level"]) == ["1", "2", "3"] and r["by_level"]["1"]["problems"] == 2
        assert sorted(r["by_subject"]) == ["Algebra", "Geometry", "Prealgebra"]
        assert f"{100 * r['pass@1']:.1f} [" in table
    assert results["methods"]["pretrained"]["kl"] == 0.0 < results["methods"]["pretrained"]["policy_kl"]
    return results


def test_llama3_tokenizer_fresh_models_train_and_eval_math(tmp_path, data, capsys):
    run_dir = tmp_path / "llama"
    models = ["reference.vocab_size=128256", "value.vocab_size=128256", "reference.max_positions=128",
              "value.max_positions=128", "math.tokenizer=llama3", "math.eos_token=<|eot_id|>",
              "math.pad_token=<|reserved_special_token_0|>"]
    assert cli.main(["train", *common(data, run_dir), *models]) == 0
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1
    capsys.readouterr()
    evaluation = ["samples=3", "sweep=[0.05]", "mesh=[8,1,1]"]  # π_ref and the value model on 8 devices
    assert cli.main(["eval-math", str(run_dir), *evaluation]) == 0
    shown = capsys.readouterr().out
    assert "| π_ref |" in shown and "| Q♯ |" in shown and "| CD |" in shown
    results = check_eval(run_dir / "eval", ("pretrained", "cd", "qsharp"), 3)
    assert results["methods"]["qsharp"]["kl"] > 0 and results["top_p"] == 0.9
    assert results["lookahead"] == 0  # the run's algorithm.lookahead
    assert {s["method"] for s in results["sweep"]} == {"cd", "qsharp"} and (run_dir / "eval" / "kl_sweep.png").exists()
    # over two processes (4 devices each, the same 8-device mesh): each decodes and checks its rows, process 0
    # writes the same evaluation
    two = run_dir / "eval-two"
    for i, (rc, out, err) in enumerate(launch(lambda i: ["eval-math", str(run_dir), *evaluation, f"out={two}"])):
        assert rc == 0, err[-3000:]
        assert ("| Q♯ |" in printed(out)) == (i == 0)
    assert (two / "samples.jsonl").read_text() == (run_dir / "eval" / "samples.jsonl").read_text()
    assert numbers((two / "eval.json").read_text()) == pytest.approx(numbers((run_dir / "eval" / "eval.json").read_text()),
                                                                      rel=1e-4, abs=1e-5)


def test_qwen2_checkpoint_with_its_saved_tokenizer(tmp_path, data, capsys, monkeypatch):
    """A Qwen2 checkpoint and its saved tokenizer through train and eval-math; eval-math's own
    ``lookahead`` reaches the guided decoding (and only it) and eval.json."""
    from hf_fixtures import make_checkpoint

    from qsharp_jax import rollout
    from qsharp_jax.models.tokenizers import qwen2_tokenizer

    ckpt = tmp_path / "qwen"
    import transformers

    # a Qwen2 checkpoint with Qwen's real vocabulary (padded past the tokenizer, as Qwen2.5's are)
    config = transformers.Qwen2Config(vocab_size=151936, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    make_checkpoint(config, ckpt)
    qwen2_tokenizer().save_pretrained(ckpt)
    run_dir = tmp_path / "run"
    models = [f"reference.hf_path={ckpt}", f"value.hf_path={ckpt}"]
    assert cli.main(["train", *common(data, run_dir), *models]) == 0
    capsys.readouterr()
    lookaheads, generate = [], rollout.generate

    def recorded(*args, **kwargs):
        lookaheads.append((kwargs.get("guidance"), kwargs.get("lookahead", 0)))
        return generate(*args, **kwargs)

    monkeypatch.setattr(rollout, "generate", recorded)
    assert cli.main(["eval-math", str(run_dir), "samples=2", "methods=[pretrained,qsharp]", "max_new_tokens=4",
                     "lookahead=2", f"out={tmp_path / 'eval'}"]) == 0
    assert check_eval(tmp_path / "eval", ("pretrained", "qsharp"), 2)["lookahead"] == 2
    assert set(lookaheads) == {(None, 0), ("qsharp", 2)}
