"""Chat templates: the one place where prompts are turned into model text.

A tokenizer that brings a chat template of its own (an instruction-tuned model) keeps it, and its
EOS token becomes the template's end-of-turn token when that is a special token of its own (e.g.
``<|eot_id|>``), so that generation, which stops at EOS, stops where the template ends an answer.

A tokenizer without one (a base model, the tiny embedded model) gets the workflow's template for
the task: every message is rendered as ``<|im_start|>{header}\\n{content}{EOS}\\n`` after the BOS token,
where ``{EOS}`` is the tokenizer's own EOS token (``<|im_end|>`` for the tiny base tokenizer, whose
special tokens these are; ``</s>``, ``<|end_of_text|>``, ... elsewhere, so that no token has to be
added to the vocabulary or the embeddings: ``<|im_start|>`` is then plain text). The header of an
``assistant`` message depends on the task (``assistant`` for chat, ``Summary`` for summarization,
``Translation`` for machine translation); every other role is rendered as is.
``add_generation_prompt`` appends ``<|im_start|>{header}\\n``, so a generated answer ends with EOS.
A workflow template already set (a tokenizer saved with an adapter) is replaced by the task's.

Assistant content is wrapped in ``{% generation %}`` so that transformers'
``return_assistant_tokens_mask=True`` (trl's ``assistant_only_loss``) marks the answer tokens,
the end token included; the tag does not change the rendered text.
"""

from __future__ import annotations

from typing import Any

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

GENERATION_HEADERS = {
    "chat": "assistant",
    "summarization": "Summary",
    "mt": "Translation",
}
TASKS = tuple(GENERATION_HEADERS)


def generation_header(task: str) -> str:
    """The header an assistant message (and the generation prompt) gets in ``task``."""
    try:
        return GENERATION_HEADERS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}") from None


def chat_template(task: str, end: str = IM_END) -> str:
    """The workflow's Jinja chat template of ``task``, each message closed by ``end`` (the
    tokenizer's EOS token; see the module docstring for the format)."""
    header = generation_header(task)
    return (
        "{{ bos_token if bos_token else '' }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}"
        f"{IM_START}{header}\n"
        "{% generation %}{{ message['content'] }}" + end + "\n{% endgeneration %}"
        "{% else %}" + IM_START + "{{ message['role'] }}\n{{ message['content'] }}" + end + "\n"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        f"{IM_START}{header}\n"
        "{% endif %}"
    )


def render(
    messages: list[dict[str, str]], task: str, *, bos: str = "", add_generation_prompt: bool = False, end: str = IM_END
) -> str:
    """Pure-Python rendering identical to the Jinja template (for tests and tokenizer-free code)."""
    header = generation_header(task)
    parts = [bos]
    for message in messages:
        role = header if message["role"] == "assistant" else message["role"]
        parts.append(f"{IM_START}{role}\n{message['content']}{end}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}{header}\n")
    return "".join(parts)


def is_workflow_template(template: str | None, end: str) -> bool:
    """Whether ``template`` is one of the workflow's task templates closed by ``end`` or ``<|im_end|>``
    (set by :func:`prepare_tokenizer` and saved with an adapter), not the model's own."""
    return template in {chat_template(task, marker) for task in TASKS for marker in (IM_END, end)}


def template_end_ids(tokenizer: Any) -> list[int]:
    """Token ids the chat template renders after an assistant answer (e.g. ``<|im_end|>``, newline)."""
    marker = "\x00answer\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    return list(tokenizer(text.split(marker)[-1], add_special_tokens=False)["input_ids"])


def end_of_turn_token(tokenizer: Any) -> str | None:
    """The special token the tokenizer's chat template renders right after an assistant answer
    (``<|eot_id|>``, ``<|im_end|>``, ...; :func:`template_end_ids`), or None when it renders none there."""
    ids = template_end_ids(tokenizer)
    special = set(tokenizer.all_special_ids) | {
        i for i, token in tokenizer.added_tokens_decoder.items() if token.special
    }
    return tokenizer.convert_ids_to_tokens(ids[0]) if ids and ids[0] in special else None


def prepare_tokenizer(tokenizer: Any, task: str) -> Any:
    """Give ``tokenizer`` the chat template ``task`` runs with (the model's own, else the workflow's,
    see the module docstring), an EOS token that ends an answer and, when it has none, a pad token
    (EOS).

    Returns the same tokenizer, modified in place.
    """
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token: generation could not stop")
    if tokenizer.chat_template and not is_workflow_template(tokenizer.chat_template, tokenizer.eos_token):
        end = end_of_turn_token(tokenizer)
        if end is not None and end != tokenizer.eos_token:
            tokenizer.eos_token = end
    else:
        tokenizer.chat_template = chat_template(task, tokenizer.eos_token)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
