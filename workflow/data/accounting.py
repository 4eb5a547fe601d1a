"""Data accounting: which rows of a split a training stage can use, and why it drops the others.

Every training stage calls :func:`usable_rows` once on the rows it read; ``kind`` says what the
stage uses of a row:

* ``prompts`` (policy, evaluation): drops a prompt longer than ``model.max_length`` minus
  ``model.generation_length`` tokens, so that the answers sampled for it fit in the
  ``model.max_length`` tokens the reward model reads (it would score them cut, or not at all);
* ``sft``: drops a row whose prompt has ``model.max_length`` tokens or more (no answer token is
  left to learn after truncation; trl's SFTTrainer drops it too) and a row whose chosen answer is
  empty (nothing to imitate); counts the rows whose answer is cut at ``model.max_length``;
* ``pairs`` (reward model, Bradley-Terry or margin): drops a row whose prompt + chosen or prompt +
  rejected is longer than ``model.max_length`` (trl's RewardTrainer drops it too) and a row whose
  chosen and rejected answers are identical (no preference);
* ``scores`` (reward model, regression on a ``score`` column): drops too-long rows as ``pairs``
  does; chosen and rejected are not compared.

Pairs with an empty answer are kept (preferring an answer to an empty one, or the reverse, is a
preference; the loop's judged pairs hold some) and counted. Lengths are token counts of the chat
template, counted as the trainers count them, so the rows kept are the rows the trainers would
train on. Every drop and every kept empty answer gives one :class:`DataWarning` with the counts;
the counts go to the stage's metrics (:func:`usable_rows`'s second value). A split left without a
usable row raises :class:`DataError` naming ``model.max_length`` and the file.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd

from workflow.data.chat import answer_text

# the answer columns each kind of stage reads
ANSWERS = {"prompts": (), "sft": ("chosen",), "pairs": ("chosen", "rejected"), "scores": ("chosen", "rejected")}


class DataError(ValueError):
    """A split without a usable row."""


class DataWarning(UserWarning):
    """Rows dropped from a split, or pairs with an empty answer."""


def token_counts(tokenizer, conversations: list[list[dict[str, str]]], generation_prompt: bool = False) -> np.ndarray:
    """Tokens of each conversation rendered by the chat template (``apply_chat_template(tokenize=True)``)."""
    if not conversations:
        return np.zeros(0, dtype=int)
    texts = [
        tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=generation_prompt) for c in conversations
    ]
    return np.array([len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]])


def _too_long(
    rows: pd.DataFrame, tokenizer, max_length: int, kind: str, generation_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(dropped, truncated)`` masks: rows too long for the stage, and SFT rows whose answer is cut."""
    prompts = [list(p) for p in rows["prompt"]]
    if kind == "prompts":
        dropped = token_counts(tokenizer, prompts, generation_prompt=True) > max_length - generation_length
        return dropped, np.zeros(len(rows), dtype=bool)
    if kind == "sft":
        dropped = token_counts(tokenizer, prompts, generation_prompt=True) >= max_length
        full = token_counts(tokenizer, [p + list(a) for p, a in zip(prompts, rows["chosen"])])
        return dropped, (full > max_length) & ~dropped
    longest = np.max(
        [token_counts(tokenizer, [p + list(a) for p, a in zip(prompts, rows[c])]) for c in ANSWERS[kind]], axis=0
    )
    return longest > max_length, np.zeros(len(rows), dtype=bool)


def usable_rows(
    rows: pd.DataFrame, tokenizer, max_length: int, kind: str, source: str, generation_length: int | None = None
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The rows of ``source`` (the file they came from) that a ``kind`` stage can use, and their
    accounting: ``rows_read``, ``rows_used``, ``dropped_too_long``, ``dropped_empty``,
    ``dropped_identical``, ``kept_empty`` (pairs with an empty answer), ``truncated`` (SFT answers
    cut at ``max_length``). ``generation_length`` (``prompts`` only): the tokens of a sampled answer.
    With nothing to drop, ``rows`` itself is returned."""
    if kind not in ANSWERS:
        raise ValueError(f"unknown kind of stage {kind!r}; expected one of {', '.join(ANSWERS)}")
    if (kind == "prompts") != (generation_length is not None):
        raise ValueError("usable_rows: generation_length is given for kind prompts, and only for it")
    n = len(rows)
    if n == 0:
        raise DataError(f"{source}: no rows")
    texts = {c: np.array([answer_text(a).strip() for a in rows[c]], dtype=object) for c in ANSWERS[kind]}
    empty = np.zeros(n, dtype=bool)
    for column in texts.values():
        empty |= column == ""
    too_long, truncated = _too_long(rows, tokenizer, int(max_length), kind, int(generation_length or 0))
    drop_empty = empty & ~too_long if kind == "sft" else np.zeros(n, dtype=bool)
    identical = texts["chosen"] == texts["rejected"] if kind == "pairs" else np.zeros(n, dtype=bool)
    drop_identical = identical & ~too_long & ~drop_empty
    dropped = too_long | drop_empty | drop_identical
    counts = {
        "rows_read": n,
        "rows_used": int(n - dropped.sum()),
        "dropped_too_long": int(too_long.sum()),
        "dropped_empty": int(drop_empty.sum()),
        "dropped_identical": int(drop_identical.sum()),
        "kept_empty": int((empty & ~dropped).sum()),
        "truncated": int(truncated.sum()),
    }
    limit = f"model.max_length ({max_length} tokens)"
    if kind == "prompts":
        limit = f"model.max_length - model.generation_length ({max_length - generation_length} tokens)"
    _report(counts, limit, source)
    return (rows if not dropped.any() else rows[~dropped].reset_index(drop=True)), counts


def _report(counts: dict[str, int], limit: str, source: str) -> None:
    """Warn with the counts of dropped rows and kept empty answers; raise when no row is left."""
    reasons = {
        "dropped_too_long": f"dropped as longer than {limit}",
        "dropped_empty": "dropped for an empty chosen answer",
        "dropped_identical": "dropped for identical chosen and rejected answers",
        "kept_empty": "kept with an empty chosen or rejected answer",
    }
    found = [f"{counts[key]} {why}" for key, why in reasons.items() if counts[key]]
    if counts["rows_used"] == 0:
        raise DataError(
            f"{source}: none of its {counts['rows_read']} rows is usable ({', '.join(found)}); "
            "raise model.max_length or fix the file"
        )
    if found:
        warnings.warn(
            f"{source}: {counts['rows_read']} rows, {counts['rows_used']} used; {'; '.join(found)}",
            DataWarning,
            stacklevel=3,
        )
