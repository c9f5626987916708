"""The math Task: prompts from problems, rewards from the gold answers of the prompts' problems."""

import numpy as np
import pytest

from qsharp_jax.tasks.math_data import Problem
from qsharp_jax.tasks.math_task import MathTask
from test_math_data import tiny_chat_tokenizer


def test_rewards_follow_the_gold_answer_of_each_prompt():
    tok = tiny_chat_tokenizer(extra=["\\boxed{5}", "\\boxed{1}", "\\boxed{\\frac{1}{2}}", "so", "it", "is"])
    problems = [Problem("two plus three", "5"), Problem("one", "1"), Problem("one plus one", "0.5")]
    task = MathTask(tok, problems, problems[:2], max_prompt_len=32, eos_id=tok.convert_tokens_to_ids("<end>"))
    try:
        prompts, mask = task.sample_prompts(np.random.default_rng(0), 6)
        assert prompts.shape == (6, 13) and mask[:, -1].all()  # left padded: the last column is real
        said = {"5": "so it is \\boxed{5} <end>", "1": "\\boxed{1} <end>", "0.5": "\\boxed{\\frac{1}{2}}"}
        golds = task.golds(prompts)
        # each prompt answered right, then each answered with the next problem's answer (wrong)
        right = [tok(said[g], add_special_tokens=False)["input_ids"] for g in golds]
        wrong = [tok(said[golds[(i + 1) % 6]] if golds[(i + 1) % 6] != g else "so", add_special_tokens=False)
                 ["input_ids"] for i, g in enumerate(golds)]
        for answers, expected in ((right, 1.0), (wrong, 0.0)):
            width = max(map(len, answers))
            completions = np.zeros((6, width), np.int32)
            cmask = np.zeros((6, width), bool)
            for i, a in enumerate(answers):
                completions[i, : len(a)], cmask[i, : len(a)] = a, True
            assert task.reward(prompts, completions, cmask).tolist() == [expected] * 6
        assert task.eval_prompts()[0].shape[0] == 2 and task.timeouts == 0
        with pytest.raises(ValueError, match="not one of this task's problems"):
            task.golds(np.full((1, 13), 3))
    finally:
        task.close()


def test_value_tokenizer_check_allows_renamed_special_tokens_only():
    from qsharp_jax.tasks.math_task import check_same_tokenizer

    def with_special(name):
        tok = tiny_chat_tokenizer()
        tok.add_special_tokens({"additional_special_tokens": [name]})
        return tok

    # one release names an added token otherwise (Llama 3 -> 3.1 / 3.2): the same ids, accepted
    check_same_tokenizer(with_special("<|reserved_special_token_2|>"), with_special("<|finetune_right_pad_id|>"))
    with pytest.raises(ValueError, match="differs from π_ref's"):
        check_same_tokenizer(tiny_chat_tokenizer(), tiny_chat_tokenizer(extra=["four"]))
