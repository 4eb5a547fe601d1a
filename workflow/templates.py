"""Chat templates of the three tasks: the one place where prompts are turned into model text.

Every message is rendered as ``<|im_start|>{header}\\n{content}<|im_end|>\\n`` after the BOS token,
where the header of an ``assistant`` message depends on the task (``assistant`` for chat,
``Summary`` for summarization, ``Translation`` for machine translation) and every other role is
rendered as is. ``add_generation_prompt`` appends ``<|im_start|>{header}\\n``, so a generated
answer ends with ``<|im_end|>`` (the EOS token of the tiny base tokenizer).

Assistant content is wrapped in ``{% generation %}`` so that transformers'
``return_assistant_tokens_mask=True`` (trl's ``assistant_only_loss``) marks the answer tokens,
``<|im_end|>`` included; the tag does not change the rendered text.
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


def chat_template(task: str) -> str:
    """The Jinja chat template of ``task`` (see the module docstring for the format)."""
    header = generation_header(task)
    return (
        "{{ bos_token if bos_token else '' }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}"
        f"{IM_START}{header}\n"
        "{% generation %}{{ message['content'] }}" + IM_END + "\n{% endgeneration %}"
        "{% else %}"
        + IM_START + "{{ message['role'] }}\n{{ message['content'] }}" + IM_END + "\n"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        f"{IM_START}{header}\n"
        "{% endif %}"
    )


def render(messages: list[dict[str, str]], task: str, *, bos: str = "", add_generation_prompt: bool = False) -> str:
    """Pure-Python rendering identical to the Jinja template (for tests and tokenizer-free code)."""
    header = generation_header(task)
    parts = [bos]
    for message in messages:
        role = header if message["role"] == "assistant" else message["role"]
        parts.append(f"{IM_START}{role}\n{message['content']}{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}{header}\n")
    return "".join(parts)


def prepare_tokenizer(tokenizer: Any, task: str) -> Any:
    """Set ``task``'s chat template on ``tokenizer`` and, when it has none, a pad token (EOS).

    Returns the same tokenizer, modified in place.
    """
    tokenizer.chat_template = chat_template(task)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad token nor an EOS token to use as padding")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
