"""Chat templates: the tokenizer renders exactly the documented string for every task."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from workflow.data import templates

SPECIALS = ["<s>", "<|im_end|>", "<pad>", "<|im_start|>", "<unk>"]
WORDS = [
    "user",
    "assistant",
    "Summary",
    "Translation",
    "system",
    "hello",
    "there",
    "hi",
    "a",
    "post",
    "short",
    "Hallo",
    "Welt",
    "Hello",
    "world",
    "be",
    "brief",
]

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
    kwargs = dict(
        bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>", additional_special_tokens=["<|im_start|>"]
    )
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
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    tokens = tokenizer.convert_ids_to_tokens(out["input_ids"])
    masked = [t for t, m in zip(tokens, out["assistant_masks"]) if m]
    assert masked == ["short", "<|im_end|>"]


LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def plain_tokenizer(*, specials: list[str], eos: str, template: str | None = None) -> PreTrainedTokenizerFast:
    """A tokenizer without the ChatML tokens: ``<s>``, ``eos`` and ``specials`` are its special tokens."""
    vocab = {tok: i for i, tok in enumerate(["<s>", "<unk>", eos, *specials] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token=eos, unk_token="<unk>", additional_special_tokens=specials
    )
    tokenizer.chat_template = template
    return tokenizer


def test_a_tokenizer_without_chatml_tokens_ends_every_message_with_its_eos():
    """A base model's tokenizer (no template, no <|im_end|> token): the workflow's layout closed by the
    tokenizer's own EOS, a real special token, so that generation stops where an answer ends."""
    from workflow.data.templates import template_end_ids

    tokenizer = templates.prepare_tokenizer(plain_tokenizer(specials=[], eos="</s>"), "chat")
    assert "<|im_end|>" not in tokenizer.get_vocab() and tokenizer.eos_token == "</s>"
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == templates.render(MESSAGES, "chat", bos="<s>", add_generation_prompt=True, end="</s>")
    assert "<|im_end|>" not in text and text.count("</s>") == len(MESSAGES)
    assert template_end_ids(tokenizer)[0] == tokenizer.eos_token_id
    assert tokenizer.pad_token == "</s>"
    out = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a post"}, {"role": "assistant", "content": "short"}],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    tokens = tokenizer.convert_ids_to_tokens(out["input_ids"])
    assert [t for t, m in zip(tokens, out["assistant_masks"]) if m] == ["short", "</s>"]


def test_a_models_own_template_is_kept_and_generation_stops_at_its_end_of_turn():
    """An instruction model's template stays; EOS becomes its end-of-turn token (Llama-3: <|eot_id|>)."""
    specials = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer = templates.prepare_tokenizer(
        plain_tokenizer(specials=specials, eos="<|end_of_text|>", template=LLAMA3_TEMPLATE), "summarization"
    )
    assert tokenizer.chat_template == LLAMA3_TEMPLATE
    assert tokenizer.eos_token == "<|eot_id|>" and tokenizer.pad_token == "<|eot_id|>"
    text = tokenizer.apply_chat_template(MESSAGES[1:3], tokenize=False)
    assert text == (
        "<s><|start_header_id|>user<|end_header_id|>\n\nhello there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nhi<|eot_id|>"
    )
    again = templates.prepare_tokenizer(tokenizer, "summarization")  # as when loaded from an adapter
    assert again.chat_template == LLAMA3_TEMPLATE and again.eos_token == "<|eot_id|>"


def test_a_saved_workflow_template_is_replaced_by_the_tasks():
    """The tiny base model is saved with the chat template; a stage of another task re-sets its own."""
    tokenizer = templates.prepare_tokenizer(tiny_tokenizer(), "chat")
    assert templates.is_workflow_template(tokenizer.chat_template, tokenizer.eos_token)
    templates.prepare_tokenizer(tokenizer, "mt")
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False) == EXPECTED["mt"]
    assert tokenizer.eos_token == "<|im_end|>"


def test_a_tokenizer_without_eos_is_refused():
    tokenizer = plain_tokenizer(specials=[], eos="</s>")
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="no EOS token"):
        templates.prepare_tokenizer(tokenizer, "chat")
