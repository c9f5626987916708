"""The Llama 3 tokenizer built from the ranks file inside llama-models equals Meta's own tiktoken
tokenizer, and its chat template gives the token ids of Meta's own chat format (llama_models'
ChatFormat) for the paper's math prompt."""

import pytest

pytest.importorskip("llama_models")

from llama_models.datatypes import RawMessage  # noqa: E402
from llama_models.llama3.chat_format import ChatFormat  # noqa: E402
from llama_models.llama3.tokenizer import Tokenizer  # noqa: E402

from qsharp_jax.models.tokenizers import llama3_tokenizer  # noqa: E402
from qsharp_jax.tasks.math_data import PROMPT, Problem, chat_prompt, encode_prompts  # noqa: E402

TEXTS = ["Hello world", "Josh buys a house for $80,000 and puts in $50,000 in repairs: 1234567 ÷ 3 ≈ 411522.33",
         "  indented\n\n\tline with 'quotes' and ünïcödé, 日本語, emoji 🙂", "\\boxed{\\frac{14}{3}}"]


@pytest.fixture(scope="module")
def tokenizers():
    return llama3_tokenizer(), Tokenizer.get_instance()


def test_encoding_equals_metas_tokenizer(tokenizers):
    ours, meta = tokenizers
    assert len(ours) == meta.n_words == 128256
    for text in TEXTS:
        ids = ours(text, add_special_tokens=False)["input_ids"]
        assert ids == meta.encode(text, bos=False, eos=False), text
        assert ours.decode(ids) == text
    assert ours.convert_tokens_to_ids(["<|begin_of_text|>", "<|eot_id|>", "<|reserved_special_token_0|>"]) == \
        [128000, 128009, 128002]
    assert (ours.eos_token_id, ours.pad_token_id, ours.bos_token_id) == (128009, 128002, 128000)


def test_chat_prompt_equals_metas_chat_format(tokenizers):
    ours, meta = tokenizers
    problem = "Janet has 3 ducks; each lays 16 eggs. How many eggs?"
    text = chat_prompt(ours, problem)
    ids = ours(text, add_special_tokens=False)["input_ids"]
    golden = ChatFormat(meta).encode_dialog_prompt([RawMessage(role="user", content=PROMPT.format(problem=problem))])
    assert ids == golden.tokens
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + PROMPT.format(problem=problem)
                    + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    encoded, mask, kept = encode_prompts(ours, [Problem(problem, "48"), Problem("1+1?", "2")], max_prompt_len=256)
    assert kept == [0, 1] and encoded[0].tolist() == golden.tokens and (encoded[1][~mask[1]] == 128002).all()
