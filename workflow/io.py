"""Atomic file and folder writes (every output appears whole or not at all), scratch folders with
fixed names, and reading tables with the columns a stage needs.

Temporary files and folders have fixed names beside their target (``.metrics.csv.tmp``,
``.adapter.tmp``, ``.trainer.tmp``; ``.adapter.rank1.tmp`` in data-parallel process 1), so a run
killed with SIGKILL leaves at most one of each, and the next run of the stage overwrites or removes
it before starting.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd


class DataFileError(ValueError):
    """A file a stage reads is unreadable or lacks what the stage needs (the message names it)."""


def hidden_sibling(path: str | os.PathLike, suffix: str) -> Path:
    """``.{name}.{suffix}`` beside ``path``; in data-parallel process ``r > 0`` (``RANK``, set by
    torchrun) ``.{name}.rank{r}.{suffix}``, so that processes never share a scratch name."""
    target = Path(path)
    rank = int(os.environ.get("RANK") or 0)
    return target.with_name(f".{target.name}{f'.rank{rank}' if rank else ''}.{suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; rename it onto ``path`` on success.

    On error the temporary file is removed and an existing ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = hidden_sibling(target, "tmp")  # a fixed name: a killed run's file is overwritten
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def scratch_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the empty folder ``.{name}.tmp`` beside ``path`` (:func:`hidden_sibling`), always
    removed at the end; one left by a killed run is removed first."""
    tmp = hidden_sibling(path, "tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` (:func:`scratch_dir`); move it onto ``path`` on success.

    An existing folder at ``path`` is replaced only once the new one is complete (a run killed
    between the two renames leaves it as ``.{name}.old``, put back here first).
    """
    target = Path(path)
    old = hidden_sibling(target, "old")
    if old.is_dir() and not target.exists():
        os.replace(old, target)
    with scratch_dir(target) as tmp:
        yield tmp
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)


def link_tree(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Give the folder ``target`` the files of ``source`` as hard links (copies where the two are on
    different file systems): no data is copied, and ``source`` stays whole until its owner deletes it."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link, dirs_exist_ok=True)


def write_parquet(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write ``df`` to parquet atomically."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_csv(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write ``df`` to CSV atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def read_table(path: str | os.PathLike, columns: Sequence[str] = ()) -> pd.DataFrame:
    """The table of ``path``, CSV (``.csv``) or parquet (pyarrow names the file when it is damaged);
    :class:`DataFileError` naming the file when it is damaged or lacks one of ``columns``."""
    if str(path).endswith(".csv"):
        with reading(path, "table"):
            table = pd.read_csv(path)
    else:
        table = pd.read_parquet(path)
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataFileError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))} (it has "
            f"{', '.join(map(repr, table.columns)) or 'none'}; expected {', '.join(columns)})"
        )
    return table


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Re-raise the errors of a damaged file that do not name it (a truncated safetensors header,
    broken JSON or CSV) as :class:`DataFileError` naming ``path`` and ``what`` it is."""
    from safetensors import SafetensorError

    try:
        yield
    except (
        SafetensorError,
        json.JSONDecodeError,
        UnicodeDecodeError,
        pd.errors.EmptyDataError,
        pd.errors.ParserError,
    ) as err:
        raise DataFileError(
            f"{path}: damaged {what} ({type(err).__name__}: {err}); a killed job or a full disk leaves "
            'such files: delete it and rerun the stage that wrote it (README, "Rerun semantics")'
        ) from err


SNAPSHOT_INDEX = "index.csv"  # the snapshot index of a snapshots folder (workflow/models/snapshots.py)


def read_snapshot_index(directory: str | os.PathLike) -> pd.DataFrame:
    """The snapshot index of ``directory`` (empty when there is none yet); an error naming the
    file when it is damaged or lacks a column."""
    path = Path(directory) / SNAPSHOT_INDEX
    if not path.exists():
        return pd.DataFrame(
            {"snapshot": pd.Series(dtype=int), "step": pd.Series(dtype=int), "file": pd.Series(dtype=str)}
        )
    with reading(path, "snapshot index"):
        index = pd.read_csv(path)
    missing = [c for c in ("snapshot", "step", "file") if c not in index.columns]
    if missing:
        raise DataFileError(f"{path}: damaged snapshot index, missing column(s) {', '.join(missing)}")
    return index


def as_paths(value: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """A rule input that is one path or a list of paths, as a list of strings."""
    return [str(value)] if isinstance(value, (str, os.PathLike)) else [str(v) for v in value]


def subprocess_stream(stream: Any) -> Any:
    """``stream`` as a subprocess's stdout or stderr when it is backed by a file descriptor (a job's
    log file), else None: the child inherits the parent's (pytest's captured streams have none)."""
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return stream
