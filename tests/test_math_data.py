"""Math data: both JSONL layouts with odd answers, bad records named by file, line and field,
deterministic splits, and the paper's prompt through a chat template (left padded, never cut)."""

import json

import pytest

from qsharp_jax.tasks.math_data import PROMPT, Problem, chat_prompt, encode_prompts, load_problems, split_problems


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_both_layouts_and_odd_answers(tmp_path):
    records = [
        {"problem": "A farm has 70 rows of 1000 plants.", "solution": "70*1000", "answer": "70,000"},
        {"question": "Split 14 apples in 3.", "answer": "Each gets 14/3.\n#### \\frac{14}{3}"},  # GSM8K original
        {"problem": "Solve.", "solution": "So $x = \\boxed{\\left(1, \\frac{\\sqrt{2}}{2}\\right)}$.",
         "type": "Algebra", "level": "Level 5", "unique_id": "test/algebra/1.json"},  # MATH original
        {"problem": "How many?", "solution": "", "answer": 12},
    ]
    problems = load_problems(write_jsonl(tmp_path / "d.jsonl", records))
    assert [p.answer for p in problems] == ["70,000", "\\frac{14}{3}", "\\left(1, \\frac{\\sqrt{2}}{2}\\right)", "12"]
    assert problems[1].problem == "Split 14 apples in 3." and problems[1].solution == "Each gets 14/3."
    assert (problems[2].subject, problems[2].level, problems[2].id) == ("Algebra", "Level 5", "test/algebra/1.json")
    (tmp_path / "d.json").write_text(json.dumps(records))
    assert load_problems(tmp_path / "d.json") == problems


@pytest.mark.parametrize("lines,message", [
    (['{"solution": "x", "answer": "1"}'], r"d.jsonl, line 1: field 'problem' \(or GSM8K's 'question'\) is missing"),
    (['{"problem": "p", "answer": "1"}', '{"problem": "q", "solution": "no box"}'],
     r"d.jsonl, line 2: no gold answer"),
    (['{"problem": "p", "answer": "1"}', "", '[1, 2]'], r"d.jsonl, line 3: a record must be a JSON object"),
    (['{"problem": "p", "answer": "1"', ], r"d.jsonl:1: not a JSON object"),
    ([], r"holds no records"),
])
def test_bad_records_are_named(tmp_path, lines, message):
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    with pytest.raises(ValueError, match=message):
        load_problems(tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match="not found"):
        load_problems(tmp_path / "missing.jsonl")


def test_split_is_deterministic_and_independent_of_the_rest():
    problems = [Problem(problem=f"problem {i}", answer=str(i)) for i in range(2000)]
    train, held = split_problems(problems, 0.1, seed=3)
    assert len(train) + len(held) == 2000 and 150 < len(held) < 250
    _, held_half = split_problems(problems[::2], 0.1, seed=3)
    assert {p.problem for p in held_half} == {p.problem for p in held} & {p.problem for p in problems[::2]}
    assert split_problems(problems, 0.1, seed=4)[1] != held


def tiny_chat_tokenizer(template=True, extra=()):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<user>", "<assistant>", "<end>"] + sorted(set(
        PROMPT.replace("{problem}", " ").replace("{{}}", "{}").split()) | {"two", "plus", "three", "one", *extra})
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")
    if template:
        tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <end> {% endfor %}"
                             "{% if add_generation_prompt %}<assistant> {% endif %}")
    return tok


def test_chat_prompt_left_padded_and_never_cut():
    tok = tiny_chat_tokenizer()
    text = chat_prompt(tok, "two plus three")
    assert text == "<user> Problem:\n\ntwo plus three Write your answer inside \\boxed{}.\n\nSolution: <end> <assistant> "
    problems = [Problem("two plus three", "5"), Problem("one", "1"), Problem(" ".join(["two"] * 40), "2")]
    with pytest.warns(UserWarning, match=r"1 of 3 prompts are longer than max_prompt_len=20 tokens \(longest 50\)"):
        ids, mask, kept = encode_prompts(tok, problems, max_prompt_len=20)
    assert kept == [0, 1] and ids.shape == mask.shape == (2, 13)
    assert mask[0].all() and not mask[1, 0] and mask[1, -1]  # left padded
    assert tok.decode(ids[0][mask[0]]).split() == text.split()
    assert (ids[1][~mask[1]] == tok.pad_token_id).all()
    with pytest.raises(ValueError, match="longer than max_prompt_len=20 .* raise max_prompt_len"):
        encode_prompts(tok, problems, max_prompt_len=20, too_long="error")
    with pytest.raises(ValueError, match="has no chat template; use an Instruct model's tokenizer"):
        chat_prompt(tiny_chat_tokenizer(template=False), "one")


def test_math_release_directory(tmp_path):
    """MATH's own release: one JSON file per problem under train/<subject>/ (subject in "type")."""
    (tmp_path / "algebra").mkdir()
    (tmp_path / "geometry").mkdir()
    (tmp_path / "algebra" / "1.json").write_text(json.dumps(
        {"problem": "Solve $x+1=3$.", "level": "Level 1", "type": "Algebra", "solution": "So $x=\\boxed{2}$."}))
    (tmp_path / "geometry" / "7.json").write_text(json.dumps(
        {"problem": "Area?", "level": "Level 5", "type": "Geometry", "solution": "$\\boxed{\\frac{9}{2}}$"}))
    problems = load_problems(tmp_path)
    assert [(p.answer, p.subject, p.level) for p in problems] == [("2", "Algebra", "Level 1"),
                                                                  ("\\frac{9}{2}", "Geometry", "Level 5")]
    (tmp_path / "geometry" / "8.json").write_text('{"problem": "no answer", "solution": "none"}')
    with pytest.raises(ValueError, match=r"geometry/8.json: no gold answer"):
        load_problems(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no \\*.json files"):
        load_problems(tmp_path / "empty")


def test_gsm8k_through_tensorflow_datasets_from_local_files(tmp_path):
    """tfds' gsm8k prepared from GSM8K's own JSONL (no download), read back without TensorFlow."""
    from qsharp_jax.tasks.math_data import load_source, prepare_gsm8k

    train = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
             {"question": "Write seventy thousand.", "answer": "It is 70,000\n#### 70,000"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "test.jsonl").write_text(json.dumps(train[0]) + "\n")
    prepare_gsm8k(tmp_path / "tfds", tmp_path / "train.jsonl", tmp_path / "test.jsonl")
    problems = load_source("tfds:gsm8k/train", tmp_path / "tfds")
    assert sorted((p.problem, p.answer) for p in problems) == sorted(
        (r["question"], r["answer"].rsplit("#### ", 1)[1]) for r in train)
    assert [p.answer for p in load_source("tfds:gsm8k/test", tmp_path / "tfds")] == ["7"]
    with pytest.raises(ValueError, match="cannot be read from .* prepare it first"):
        load_source("tfds:gsm8k/train", tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="needs math.tfds_data_dir"):
        load_source("tfds:gsm8k/train")
