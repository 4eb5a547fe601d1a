"""Chat messages: every prompt and answer is a list of ``{"role", "content"}`` dicts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

Messages = list[dict[str, str]]
ROLE_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}


def as_messages(value: Any, role: str = "user") -> Messages:
    """Plain ``{"role", "content"}`` dicts from a message list (a parquet cell: a numpy array of
    dicts), a plain string (one message of ``role``) or ``None`` (no message)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in list(value)]


def last_user_text(prompt: str | Iterable[dict[str, str]]) -> str:
    """Text of the last user message of a prompt (what gold functions and judges read); the last
    message's text when no message is the user's."""
    messages = as_messages(prompt)
    for message in reversed(messages):
        if message["role"] == "user":
            return message["content"]
    return messages[-1]["content"] if messages else ""


def conversation_text(prompt: str | Iterable[dict[str, str]]) -> str:
    """Plain-text rendering of a conversation (``Human: ...`` lines), for tokenizers without a chat
    template and for a judge's question."""
    return "\n".join(f"{ROLE_NAMES.get(m['role'], m['role'])}: {m['content']}" for m in as_messages(prompt))


def answer_text(answer: str | Iterable[dict[str, str]]) -> str:
    """Text of an answer: a string, or the concatenated contents of its messages (a trl completion,
    a row's ``chosen`` or ``rejected``)."""
    if isinstance(answer, str):
        return answer
    return "".join(str(m["content"]) for m in answer)
