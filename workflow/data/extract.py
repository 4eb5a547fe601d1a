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
import gzip
import json
import logging
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from workflow.data.datasets import (
    COLUMNS,
    DatasetSpec,
    ExtractionError,
    Message,
    RowError,
    preview,
    spec_of,
)

if TYPE_CHECKING:
    from workflow.job import Job

log = logging.getLogger(__name__)

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


def _tsv_records(handle, path: Path) -> Records:
    """One record per line of a tab-separated file with a header line; no quoting and no NA
    guessing (every value is text); a line with another number of fields than the header is an error."""
    lines = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(lines, None)
    if header is None:
        raise ExtractionError(f"{path}: empty file (no header, no rows)")
    records = []
    for fields in lines:
        if not fields:  # a blank line
            continue
        if len(fields) != len(header):
            raise ExtractionError(
                f"{path}: line {lines.line_num}: {len(fields)} tab-separated fields, the header has {len(header)}"
            )
        records.append((f"line {lines.line_num}", dict(zip(header, fields))))
    return records


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
    if path.is_dir():
        raise ExtractionError(f"{path}: a folder, not a file (dataset.files names one file per split)")
    if not path.is_file():
        raise ExtractionError(f"{path}: file not found")
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
            return [(f"row {i}", r) for i, r in enumerate(rows, start=1)]
        if kind == "tsv":
            with _open_text(path) as handle:
                return _tsv_records(handle, path)
        with _open_text(path) as handle:
            text = handle.read()
    except ExtractionError:
        raise
    # a damaged file: ArrowInvalid is a ValueError; EOFError and zlib.error come from a cut gzip stream
    except (OSError, UnicodeDecodeError, ValueError, EOFError, zlib.error, csv.Error) as exc:
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
        or any(source.lower().endswith(suffix) for suffix in (*FORMATS, ".csv"))  # .csv: named as unsupported
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
        source = str(source)  # a leading ~ is expanded in the Snakefile (config_checks.expand_home)
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
            raise ExtractionError(f"{where}: key {column!r}: malformed message {preview(m)}")
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
            raise ExtractionError(f"{where}: {location}: expected an object, got {preview(record)}")
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
    from workflow.data import embedded_task  # written alongside; imported lazily

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


def run(job: Job) -> None:
    """Stage function of rule ``extract_dataset``: write ``job.output["rows"]``. The configured
    dataset's settings come as input ``file`` and params (``rules/data.smk``); another dataset's
    extraction gets none and reads its default source."""
    from workflow.io import write_parquet

    dataset, split = job.wildcards["dataset"], job.wildcards["split"]
    params = job.params
    frame = extract(
        dataset,
        split,
        source=params.get("source"),
        files=job.input.get("file"),
        hub_config=params.get("hub_config"),
        max_rows=params.get("max_rows"),
        seed=job.seed,
        embedded_rows=params.get("embedded_rows"),
    )
    write_parquet(frame, job.output["rows"])
    log.info("wrote %d rows to %s", len(frame), job.output["rows"])
