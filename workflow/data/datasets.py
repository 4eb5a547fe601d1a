"""The supported preference datasets: their registry (hub id, task, columns) and the builders that
turn one source record into a row of chat messages (``prompt``, ``chosen``, ``rejected``, and for
``wmt20`` a float ``score``). Reading files and the hub is :mod:`workflow.data.extract`'s job."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

COLUMNS = ["prompt", "chosen", "rejected"]


class ExtractionError(ValueError):
    """A dataset, file or row that cannot be turned into preference rows."""


class RowError(ValueError):
    """A malformed source row (raised by row builders; :func:`extract` adds the file and row)."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"key {key!r}: {problem}")
        self.key = key
        self.problem = problem


Message = dict[str, str]
Row = dict[str, Any]


# --------------------------------------------------------------------------------------------
# field helpers
# --------------------------------------------------------------------------------------------


def _msg(role: str, content: str) -> Message:
    return {"role": role, "content": content}


def _field(record: Mapping[str, Any], key: str) -> Any:
    if not isinstance(record, Mapping):
        raise RowError(key, f"expected an object, got {preview(record)}")
    if key not in record:
        raise RowError(key, "missing")
    return record[key]


def _text(record: Mapping[str, Any], key: str, *, allow_empty: bool = False, none_as_empty: bool = False) -> str:
    """A string field; empty (or whitespace-only) strings only when ``allow_empty``."""
    value = _field(record, key)
    if value is None and none_as_empty:
        return ""
    if not isinstance(value, str):
        raise RowError(key, f"expected a string, got {type(value).__name__} {preview(value)}")
    if not allow_empty and not value.strip():
        raise RowError(key, "empty string")
    return value


def _binary(record: Mapping[str, Any], key: str) -> int:
    """A 0/1 field (int, integral float or a string such as ``"1"``)."""
    value = _field(record, key)
    parsed: int | None = None
    if isinstance(value, (bool, np.bool_)):
        parsed = None
    elif isinstance(value, (int, np.integer)):
        parsed = int(value)
    elif isinstance(value, (float, np.floating)) and float(value).is_integer():
        parsed = int(value)
    elif isinstance(value, str) and value.strip() in {"0", "1"}:
        parsed = int(value.strip())
    if parsed not in (0, 1):
        raise RowError(key, f"expected 0 or 1, got {preview(value)}")
    return parsed


def _number(record: Mapping[str, Any], key: str) -> float:
    """A finite float field (numbers or numeric strings)."""
    value = _field(record, key)
    if isinstance(value, (bool, np.bool_)):
        raise RowError(key, f"expected a number, got {preview(value)}")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise RowError(key, f"expected a number, got {preview(value)}") from None
    if not math.isfinite(number):
        raise RowError(key, f"expected a finite number, got {preview(value)}")
    return number


def preview(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# HH-style dialogues
# --------------------------------------------------------------------------------------------

HUMAN = "\n\nHuman: "
ASSISTANT = "\n\nAssistant: "
_MARKER = re.compile(r"\n\n(Human|Assistant): ")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}
_HH_SPEAKER = {"user": "Human", "assistant": "Assistant"}


def split_turns(text: str, key: str = "dialogue") -> list[tuple[str, str]]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> ``[("Human", "a"), ("Assistant", "b")]`` (exact contents)."""
    parts = _MARKER.split(text)
    if parts[0] != "":
        raise RowError(key, f"dialogue does not start with {HUMAN!r}: {preview(text)}")
    return list(zip(parts[1::2], parts[2::2]))


def split_hh(chosen: str, rejected: str) -> tuple[list[Message], str, str]:
    """Split an HH pair into prompt messages and the two answers.

    The prompt is the common start of both dialogues cut back to its last ``"\\n\\nAssistant: "``;
    the remainder of each dialogue is its answer (kept verbatim, so it may be empty where the
    source's is). ``render_hh(prompt, answer)`` gives back the original dialogue exactly.
    """
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(ASSISTANT)
    if cut < 0:
        for key, text in (("chosen", chosen), ("rejected", rejected)):
            if ASSISTANT not in text:
                raise RowError(key, f"no {ASSISTANT!r} in the dialogue")
        raise RowError("chosen", f"chosen and rejected share no prompt ending in {ASSISTANT!r}")
    turns = split_turns(chosen[:cut], key="chosen")
    if not turns:
        raise RowError("chosen", f"no {HUMAN!r} turn before the answer")
    if turns[0][0] != "Human":
        raise RowError("chosen", f"dialogue does not start with {HUMAN!r}")
    prompt = [_msg(_HH_ROLE[speaker], content) for speaker, content in turns]
    start = cut + len(ASSISTANT)
    return prompt, chosen[start:], rejected[start:]


def render_hh(prompt: Sequence[Mapping[str, str]], answer: str) -> str:
    """Inverse of :func:`split_hh`: the HH dialogue string of ``prompt`` messages plus ``answer``."""
    turns = "".join(f"\n\n{_HH_SPEAKER[m['role']]}: {m['content']}" for m in prompt)
    return turns + ASSISTANT + answer


# --------------------------------------------------------------------------------------------
# row builders: one source record -> {prompt, chosen, rejected[, score]}
# --------------------------------------------------------------------------------------------


def build_hh(record: Mapping[str, Any], hub_config: str | None = None) -> Row:
    chosen = _text(record, "chosen")
    rejected = _text(record, "rejected")
    prompt, a, b = split_hh(chosen, rejected)
    return {"prompt": prompt, "chosen": [_msg("assistant", a)], "rejected": [_msg("assistant", b)]}


def build_trojan(record: Mapping[str, Any], hub_config: str | None = None) -> Row:
    dialogues = {}
    for key in ("chosen", "rejected"):
        turns = split_turns(_text(record, key), key=key)
        if not turns or turns[0][0] != "Human":
            raise RowError(key, f"dialogue does not start with {HUMAN!r}")
        if len(turns) < 2:
            raise RowError(key, "no turn after the first Human turn")
        dialogues[key] = turns
    first = dialogues["chosen"][0][1]
    if not first.strip():
        raise RowError("chosen", "empty first Human turn")
    if dialogues["rejected"][0][1] != first:
        raise RowError("rejected", "first Human turn differs from the one in 'chosen'")
    rest = {k: [_msg(_HH_ROLE[s], c) for s, c in turns[1:]] for k, turns in dialogues.items()}
    return {"prompt": [_msg("user", first)], "chosen": rest["chosen"], "rejected": rest["rejected"]}


def build_pku(record: Mapping[str, Any], hub_config: str | None = None) -> Row:
    prompt = _text(record, "prompt")
    responses = [_text(record, "response_0"), _text(record, "response_1")]
    better = _binary(record, "better_response_id")
    return {
        "prompt": [_msg("user", prompt)],
        "chosen": [_msg("assistant", responses[better])],
        "rejected": [_msg("assistant", responses[1 - better])],
    }


def build_shp(record: Mapping[str, Any], hub_config: str | None = None) -> Row:
    prompt = _text(record, "history")
    a, b = _text(record, "human_ref_A"), _text(record, "human_ref_B")
    a_wins = _binary(record, "labels") == 1
    chosen, rejected = (a, b) if a_wins else (b, a)
    return {
        "prompt": [_msg("user", prompt)],
        "chosen": [_msg("assistant", chosen)],
        "rejected": [_msg("assistant", rejected)],
    }


def build_cvalues(record: Mapping[str, Any], hub_config: str | None = None) -> Row:
    return {
        "prompt": [_msg("user", _text(record, "prompt"))],
        "chosen": [_msg("assistant", _text(record, "pos_resp"))],
        "rejected": [_msg("assistant", _text(record, "neg_resp"))],
    }


def build_summarize(record: Mapping[str, Any], hub_config: str | None = None) -> Row:
    info = _field(record, "info")
    if not isinstance(info, Mapping):
        raise RowError("info", f"expected an object with 'post', got {preview(info)}")
    try:
        post = _text(info, "post", allow_empty=True, none_as_empty=True) if "post" in info else ""
    except RowError as exc:
        raise RowError(f"info.{exc.key}", exc.problem) from None
    summaries = _field(record, "summaries")
    if isinstance(summaries, np.ndarray):
        summaries = summaries.tolist()
    if not isinstance(summaries, (list, tuple)) or len(summaries) != 2:
        raise RowError("summaries", f"expected a list of two summaries, got {preview(summaries)}")
    texts = []
    for i, summary in enumerate(summaries):
        try:
            texts.append(_text(summary, "text", allow_empty=True, none_as_empty=True))
        except RowError as exc:
            raise RowError(f"summaries[{i}].text", exc.problem) from None
    choice = _binary(record, "choice")
    return {
        "prompt": [_msg("user", post)],
        "chosen": [_msg("assistant", texts[choice])],
        "rejected": [_msg("assistant", texts[1 - choice])],
    }


WMT_MISSING_LABEL = -1000.0  # the hub marks unlabelled rows with z_mean = -10000


def _wmt_langs(hub_config: str | None) -> tuple[str, str]:
    src, _, tgt = (hub_config or "en-de").partition("-")
    return src, tgt or "de"


def build_wmt(record: Mapping[str, Any], hub_config: str | None = None) -> Row:
    translation = _field(record, "translation")
    if isinstance(translation, Mapping):  # hub rows: translation = {src: ..., tgt: ...}
        src_lang, tgt_lang = _wmt_langs(hub_config)
        try:
            source = _text(translation, src_lang)
            target = _text(translation, tgt_lang)
        except RowError as exc:
            raise RowError(f"translation.{exc.key}", exc.problem) from None
    else:  # the task's own TSV: original / translation
        source = _text(record, "original")
        target = _text(record, "translation")
    score = _number(record, "z_mean")
    if score <= WMT_MISSING_LABEL:
        raise RowError("z_mean", f"{score} marks a row without a quality label")
    return {
        "prompt": [_msg("user", source)],
        "chosen": [_msg("assistant", target)],
        "rejected": [_msg("assistant", source)],
        "score": score,
    }


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How one supported dataset is found and turned into rows."""

    name: str
    task: str  # chat | summarization | mt
    hub_id: str | None  # default hub id (None: generated locally)
    hub_config: str | None  # default hub configuration
    build: Callable[[Mapping[str, Any], str | None], Row] | None
    required: tuple[str, ...] = ()  # columns every source file must have
    hub_splits: Mapping[str, str] = dataclasses.field(default_factory=dict)
    config_is_data_dir: bool = False  # hub_config is a data_dir, not a config name
    has_score: bool = False

    def hub_split(self, split: str) -> str:
        return self.hub_splits.get(split, split)

    def required_columns(self, first: Mapping[str, Any]) -> tuple[str, ...]:
        if self.name == "wmt20" and not isinstance(first.get("translation"), Mapping):
            return ("original", "translation", "z_mean")
        return self.required


REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec("embedded", "chat", None, None, None),
        DatasetSpec(
            "hh-rlhf", "chat", "Anthropic/hh-rlhf", None, build_hh, ("chosen", "rejected"), config_is_data_dir=True
        ),
        DatasetSpec(
            "rlhf-trojan", "chat", "ethz-spylab/rlhf_trojan_dataset", None, build_trojan, ("chosen", "rejected")
        ),
        DatasetSpec(
            "pku-saferlhf",
            "chat",
            "PKU-Alignment/PKU-SafeRLHF-single-dimension",
            None,
            build_pku,
            ("prompt", "response_0", "response_1", "better_response_id"),
        ),
        DatasetSpec(
            "shp", "chat", "stanfordnlp/SHP", None, build_shp, ("history", "human_ref_A", "human_ref_B", "labels")
        ),
        DatasetSpec("cvalues", "chat", "Skepsun/cvalues_rlhf", None, build_cvalues, ("prompt", "pos_resp", "neg_resp")),
        DatasetSpec(
            "summarize",
            "summarization",
            "openai/summarize_from_feedback",
            "comparisons",
            build_summarize,
            ("info", "summaries", "choice"),
            hub_splits={"test": "validation"},
        ),
        DatasetSpec(
            "wmt20", "mt", "wmt/wmt20_mlqe_task1", "en-de", build_wmt, ("translation", "z_mean"), has_score=True
        ),
    ]
}


def spec_of(name: str) -> DatasetSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ExtractionError(f"unknown dataset {name!r}; supported: {', '.join(REGISTRY)}") from None


def task_of(name: str) -> str:
    """The task of dataset ``name``: ``chat``, ``summarization`` or ``mt``."""
    return spec_of(name).task
