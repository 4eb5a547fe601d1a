"""Turn a preference dataset into rows of chat messages (``results/data/{dataset}/{split}.parquet``).

Every row has ``prompt``, ``chosen`` and ``rejected``, each a list of ``{"role", "content"}``
messages; ``chosen``/``rejected`` hold the answer only (role ``assistant``; for ``rlhf-trojan``
the remaining turns of each dialogue, ``user`` and ``assistant``). ``wmt20`` rows also carry a
float ``score`` (the direct-assessment ``z_mean``).

Where the rows come from, per split (first match wins):

1. ``files`` (``dataset.files.<split>``): a local json, json.gz, jsonl, jsonl.gz, tsv, tsv.gz or
   parquet file, chosen by suffix. JSON files hold a list of objects (or JSON lines);
   TSV files are read verbatim (no quote handling: WMT's files contain bare ``"``).
2. ``source`` as a local folder: ``<folder>/[<hub_config>/]<split>.<suffix>`` (the hub split name
   is tried too, e.g. ``validation``), which matches the layout of the hub repositories.
3. ``source`` as a hub id (default: the dataset's own id), loaded with ``datasets.load_dataset``.
   ``hub_config`` is the configuration name (for ``hh-rlhf`` the ``data_dir``, e.g.
   ``harmless-base``). Hub split names: ``summarize`` has no test split, so ``test`` reads
   ``validation``; every other dataset reads the split of the same name (for ``wmt20`` en-de the
   hub ``test`` split is the WMT20 test set with labels; its dev set is ``validation``, the same
   rows as ``dev.ende.df.short.tsv``).

A source row that cannot be turned into a valid row raises :class:`ExtractionError` naming the
file (or hub split), the row and the offending key; nothing is written then.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

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
        raise RowError(key, f"expected an object, got {_preview(record)}")
    if key not in record:
        raise RowError(key, "missing")
    return record[key]


def _text(record: Mapping[str, Any], key: str, *, allow_empty: bool = False, none_as_empty: bool = False) -> str:
    """A string field; empty (or whitespace-only) strings only when ``allow_empty``."""
    value = _field(record, key)
    if value is None and none_as_empty:
        return ""
    if not isinstance(value, str):
        raise RowError(key, f"expected a string, got {type(value).__name__} {_preview(value)}")
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
        raise RowError(key, f"expected 0 or 1, got {_preview(value)}")
    return parsed


def _number(record: Mapping[str, Any], key: str) -> float:
    """A finite float field (numbers or numeric strings)."""
    value = _field(record, key)
    if isinstance(value, (bool, np.bool_)):
        raise RowError(key, f"expected a number, got {_preview(value)}")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise RowError(key, f"expected a number, got {_preview(value)}") from None
    if not math.isfinite(number):
        raise RowError(key, f"expected a finite number, got {_preview(value)}")
    return number


def _preview(value: Any, limit: int = 60) -> str:
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
        raise RowError(key, f"dialogue does not start with {HUMAN!r}: {_preview(text)}")
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
        raise RowError("info", f"expected an object with 'post', got {_preview(info)}")
    post = _text(info, "post", allow_empty=True, none_as_empty=True) if "post" in info else ""
    summaries = _field(record, "summaries")
    if isinstance(summaries, np.ndarray):
        summaries = summaries.tolist()
    if not isinstance(summaries, (list, tuple)) or len(summaries) != 2:
        raise RowError("summaries", f"expected a list of two summaries, got {_preview(summaries)}")
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


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------

FORMATS = {  # suffix -> reader; longest suffix first when matching
    ".jsonl.gz": "jsonl",
    ".json.gz": "json",
    ".tsv.gz": "tsv",
    ".jsonl": "jsonl",
    ".json": "json",
    ".tsv": "tsv",
    ".parquet": "parquet",
}

Records = list[tuple[str, Any]]  # (location such as "line 3" or "row 2", source record)


def file_format(path: str | os.PathLike) -> str:
    name = str(path).lower()
    for suffix, kind in sorted(FORMATS.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(suffix):
            return kind
    raise ExtractionError(f"{path}: unsupported file type; expected one of {', '.join(FORMATS)}")


def _open_text(path: Path):
    if str(path).lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _json_lines(text: str, path: Path) -> Records:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ExtractionError(f"{path}: line {lineno}: not valid JSON ({exc.msg})") from None
    return records


def read_file(path: str | os.PathLike) -> Records:
    """Records of a local file with their locations (1-based rows; for line formats, line numbers)."""
    path = Path(path)
    kind = file_format(path)
    if not path.is_file():
        raise ExtractionError(f"{path}: file not found")
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
            return [(f"row {i}", r) for i, r in enumerate(rows, start=1)]
        if kind == "tsv":
            with _open_text(path) as handle:
                frame = pd.read_csv(
                    handle, sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False, na_filter=False
                )
            # one record per line (no quoting): data row i is on line i + 1
            return [(f"line {i}", r) for i, r in enumerate(frame.to_dict("records"), start=2)]
        with _open_text(path) as handle:
            text = handle.read()
    except ExtractionError:
        raise
    except pd.errors.EmptyDataError:
        raise ExtractionError(f"{path}: empty file (no header, no rows)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ParserError, ArrowInvalid are ValueErrors
        raise ExtractionError(f"{path}: cannot read {kind} file: {exc}") from None
    if kind == "jsonl":
        return _json_lines(text, path)
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON lines in a .json file (what `datasets` writes)
            return _json_lines(text, path)
        raise ExtractionError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, Mapping) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise ExtractionError(f"{path}: columns of a column-oriented JSON object differ in length")
        keys = list(data)
        data = [dict(zip(keys, values)) for values in zip(*data.values())]
    if not isinstance(data, list):
        raise ExtractionError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    return [(f"row {i}", r) for i, r in enumerate(data, start=1)]


def _looks_local(source: str) -> bool:
    """Paths (``./x``, ``/x``, ``~/x``, ``x.jsonl``...) rather than hub ids (``owner/name``)."""
    return (
        os.path.exists(source)
        or source.startswith((".", "/", "~"))
        or any(source.lower().endswith(suffix) for suffix in FORMATS)
    )


def find_split_file(folder: str | os.PathLike, spec: DatasetSpec, split: str, hub_config: str | None) -> Path:
    """``<folder>/[<hub_config>/]<split or hub split><suffix>``."""
    base = Path(folder) / hub_config if hub_config else Path(folder)
    names = dict.fromkeys([split, spec.hub_split(split)])
    tried = [base / f"{name}{suffix}" for name in names for suffix in FORMATS]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise ExtractionError(
        f"{folder}: no file for split {split!r}; looked for {', '.join(str(p) for p in tried[:3])}, ... "
        f"(or name the file in dataset.files.{split})"
    )


def resolve(
    spec: DatasetSpec, split: str, source: str | None, file: str | None, hub_config: str | None
) -> tuple[str, str]:
    """``("file", path)`` or ``("hub", hub_id)`` for one split."""
    if file:
        return "file", str(file)
    if source:
        source = os.path.expanduser(str(source))
        if os.path.isdir(source):
            return "file", str(find_split_file(source, spec, split, hub_config))
        if os.path.isfile(source):
            raise ExtractionError(
                f"{source}: dataset.source is a single file; name one file per split in "
                "dataset.files.train / dataset.files.test so train and test rows stay apart"
            )
        if _looks_local(source):
            raise ExtractionError(f"{source}: file or folder not found (dataset.source)")
        return "hub", source
    if spec.hub_id is None:
        raise ExtractionError(f"dataset {spec.name!r} has no hub id; set dataset.files.{split}")
    return "hub", spec.hub_id


def _sample(n: int, max_rows: int | None, seed: int) -> list[int] | None:
    """Indices of a seeded random subset of ``max_rows`` rows, in source order (None: keep all)."""
    if max_rows is None or max_rows >= n:
        return None
    if max_rows < 1:
        raise ExtractionError(f"max_rows must be at least 1, got {max_rows}")
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n, size=int(max_rows), replace=False))


def _read_hub(
    spec: DatasetSpec, hub_id: str, split: str, hub_config: str | None, max_rows: int | None, seed: int
) -> tuple[str, Records]:
    import datasets

    hub_split = spec.hub_split(split)
    kwargs: dict[str, Any] = {}
    if hub_config:
        kwargs["data_dir" if spec.config_is_data_dir else "name"] = hub_config
    where = f"hub dataset {hub_id}" + (f" [{hub_config}]" if hub_config else "") + f" split {hub_split!r}"
    try:
        ds = datasets.load_dataset(hub_id, split=hub_split, **kwargs)
    except Exception as exc:  # network, unknown config or split: say what was asked for
        raise ExtractionError(f"cannot load {where}: {type(exc).__name__}: {exc}") from exc
    keep = _sample(len(ds), max_rows, seed)
    indices = keep if keep is not None else range(len(ds))
    if keep is not None:
        ds = ds.select(keep)
    return where, [(f"row {i + 1}", r) for i, r in zip(indices, ds)]


# --------------------------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------------------------


def _check_messages(messages: Any, where: str, column: str, *, assistant_only: bool) -> list[Message]:
    if isinstance(messages, np.ndarray):
        messages = messages.tolist()
    if not isinstance(messages, list) or not messages:
        raise ExtractionError(f"{where}: key {column!r}: expected a non-empty list of messages")
    out = []
    for m in messages:
        if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ExtractionError(f"{where}: key {column!r}: malformed message {_preview(m)}")
        if assistant_only and m["role"] != "assistant":
            raise ExtractionError(f"{where}: key {column!r}: answer message with role {m['role']!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def build_rows(spec: DatasetSpec, records: Records, where: str, hub_config: str | None) -> pd.DataFrame:
    """Run ``spec``'s row builder over ``records``; errors name ``where`` and the row."""
    if not records:
        raise ExtractionError(f"{where}: no rows")
    first = records[0][1]
    if isinstance(first, Mapping):
        missing = [c for c in spec.required_columns(first) if c not in first]
        if missing:
            raise ExtractionError(
                f"{where}: missing required column(s) {', '.join(map(repr, missing))} for dataset "
                f"{spec.name!r} (found: {', '.join(map(repr, first)) or 'none'})"
            )
    rows = []
    assistant_only = spec.name != "rlhf-trojan"
    for location, record in records:
        if not isinstance(record, Mapping):
            raise ExtractionError(f"{where}: {location}: expected an object, got {_preview(record)}")
        try:
            row = spec.build(record, hub_config or spec.hub_config)
        except RowError as exc:
            raise ExtractionError(f"{where}: {location}: {exc}") from None
        for column in COLUMNS:
            row[column] = _check_messages(
                row[column], f"{where}: {location}", column, assistant_only=assistant_only and column != "prompt"
            )
        rows.append(row)
    columns = COLUMNS + (["score"] if spec.has_score else [])
    frame = pd.DataFrame(rows, columns=columns)
    if spec.has_score:
        frame["score"] = frame["score"].astype("float64")
    return frame


def _embedded(split: str, embedded_rows: int | None, max_rows: int | None, seed: int) -> pd.DataFrame:
    from workflow import embedded_task  # written alongside; imported lazily

    if embedded_rows is None:
        raise ExtractionError(f"embedded dataset: the number of {split} rows is not set (embedded.{split}_rows)")
    n_rows = int(embedded_rows) if max_rows is None else min(int(embedded_rows), int(max_rows))
    frame = embedded_task.generate_split(split, n_rows, seed)
    where = f"embedded dataset split {split!r}"
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ExtractionError(f"{where}: missing column(s) {missing}")
    out = {
        c: [
            _check_messages(v, f"{where}: row {i}", c, assistant_only=c != "prompt")
            for i, v in enumerate(frame[c], start=1)
        ]
        for c in COLUMNS
    }
    result = pd.DataFrame(out, columns=COLUMNS)
    if "score" in frame.columns:
        result["score"] = frame["score"].astype("float64").to_numpy()
    if result.empty:
        raise ExtractionError(f"{where}: no rows")
    return result


def extract(
    dataset_name: str,
    split: str,
    *,
    source: str | None = None,
    files: Mapping[str, str | None] | str | os.PathLike | None = None,
    hub_config: str | None = None,
    max_rows: int | None = None,
    seed: int = 0,
    embedded_rows: int | None = None,
) -> pd.DataFrame:
    """Preference rows of ``split`` of ``dataset_name`` (see the module docstring).

    ``files`` is either ``{split: path}`` (the ``dataset.files`` config) or the path for this
    split. ``max_rows`` keeps a seeded random subset (in source order). ``embedded_rows`` is the
    row count of the generated ``embedded`` split.
    """
    spec = spec_of(dataset_name)
    if spec.build is None:
        frame = _embedded(split, embedded_rows, max_rows, seed)
        log.info("generated %d %s rows of the embedded task (seed %d)", len(frame), split, seed)
        return frame
    file = files.get(split) if isinstance(files, Mapping) else files
    kind, location = resolve(spec, split, source, None if file is None else str(file), hub_config)
    if kind == "file":
        records = read_file(location)
        keep = _sample(len(records), max_rows, seed)
        if keep is not None:
            records = [records[i] for i in keep]
        where = location
    else:
        where, records = _read_hub(spec, location, split, hub_config or spec.hub_config, max_rows, seed)
    frame = build_rows(spec, records, where, hub_config)
    log.info("extracted %d %s rows of %s from %s", len(frame), split, dataset_name, where)
    return frame


# --------------------------------------------------------------------------------------------
# stage
# --------------------------------------------------------------------------------------------


def params_from_config(config: Mapping[str, Any], dataset: str, split: str) -> dict[str, Any]:
    """The extraction parameters of ``dataset``/``split`` from the workflow config.

    The ``dataset`` section applies only to the configured dataset; any other dataset is read
    from its default hub id with its default configuration.
    """
    section = config.get("dataset") or {}
    own = section.get("name") == dataset
    files = (section.get("files") or {}) if own else {}
    return {
        "source": section.get("source") if own else None,
        "file": files.get(split),
        "hub_config": section.get("hub_config") if own else None,
        "max_rows": section.get("max_rows") if own else None,
        "embedded_rows": (config.get("embedded") or {}).get(f"{split}_rows") if dataset == "embedded" else None,
    }


def run(job) -> None:
    """Stage function of rule ``extract_dataset``: write ``job.output["rows"]``."""
    from workflow.io import write_parquet

    dataset, split = job.wildcards["dataset"], job.wildcards["split"]
    params = {**params_from_config(job.config, dataset, split), **(job.params or {})}
    frame = extract(
        dataset,
        split,
        source=params.get("source"),
        files=params.get("file"),
        hub_config=params.get("hub_config"),
        max_rows=params.get("max_rows"),
        seed=job.seed,
        embedded_rows=params.get("embedded_rows"),
    )
    write_parquet(frame, job.output["rows"])
    log.info("wrote %d rows to %s", len(frame), job.output["rows"])
