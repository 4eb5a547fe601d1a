"""Chat templates: the tokenizer renders exactly the documented string for every task."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from workflow import templates

SPECIALS = ["<s>", "<|im_end|>", "<pad>", "<|im_start|>", "<unk>"]
WORDS = ["user", "assistant", "Summary", "Translation", "system", "hello", "there", "hi", "a", "post",
         "short", "Hallo", "Welt", "Hello", "world", "be", "brief"]

MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "hi"},
    {"role": "user", "content": "a post"},
]


def tiny_tokenizer(*, pad: bool = True) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = dict(bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>",
                  additional_special_tokens=["<|im_start|>"])
    if pad:
        kwargs["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


EXPECTED = {
    task: (
        "<s>"
        "<|im_start|>system\nbe brief<|im_end|>\n"
        "<|im_start|>user\nhello there<|im_end|>\n"
        f"<|im_start|>{header}\nhi<|im_end|>\n"
        "<|im_start|>user\na post<|im_end|>\n"
    )
    for task, header in [("chat", "assistant"), ("summarization", "Summary"), ("mt", "Translation")]
}


@pytest.mark.parametrize("task", ["chat", "summarization", "mt"])
def test_apply_chat_template_renders_exactly(task):
    tokenizer = templates.prepare_tokenizer(tiny_tokenizer(), task)
    header = templates.generation_header(task)
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert text == EXPECTED[task]
    with_prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert with_prompt == EXPECTED[task] + f"<|im_start|>{header}\n"
    # the pure-Python renderer agrees with the Jinja template
    assert templates.render(MESSAGES, task, bos="<s>") == text
    assert templates.render(MESSAGES, task, bos="<s>", add_generation_prompt=True) == with_prompt


def test_generation_headers():
    assert templates.generation_header("chat") == "assistant"
    assert templates.generation_header("summarization") == "Summary"
    assert templates.generation_header("mt") == "Translation"
    with pytest.raises(ValueError, match="unknown task"):
        templates.generation_header("poetry")
    with pytest.raises(ValueError, match="unknown task"):
        templates.chat_template("poetry")


def test_prompt_plus_answer_is_the_full_conversation():
    """A prompt rendered with the generation prompt, plus answer + EOS, is the whole rendered dialogue."""
    tokenizer = templates.prepare_tokenizer(tiny_tokenizer(), "mt")
    prompt = [{"role": "user", "content": "Hello world"}]
    answer = "Hallo Welt"
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=False)
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert full == head + answer + tokenizer.eos_token + "\n"


def test_pad_token_set_only_when_missing():
    tokenizer = templates.prepare_tokenizer(tiny_tokenizer(pad=False), "chat")
    assert tokenizer.pad_token == "<|im_end|>"
    tokenizer = templates.prepare_tokenizer(tiny_tokenizer(pad=True), "chat")
    assert tokenizer.pad_token == "<pad>"


def test_no_bos_token_renders_without_bos():
    tokenizer = tiny_tokenizer()
    tokenizer.bos_token = None
    templates.prepare_tokenizer(tokenizer, "chat")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"


def test_assistant_tokens_mask_covers_the_answer():
    tokenizer = templates.prepare_tokenizer(tiny_tokenizer(), "summarization")
    out = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a post"}, {"role": "assistant", "content": "short"}],
        tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
    )
    tokens = tokenizer.convert_ids_to_tokens(out["input_ids"])
    masked = [t for t, m in zip(tokens, out["assistant_masks"]) if m]
    assert masked == ["short", "<|im_end|>"]
