"""Resume a killed training stage where it stopped, from the Trainer's own checkpoints.

A policy stage keeps its work in progress in one folder (``<stage>/checkpoints`` in the
workflow), which is not a Snakemake output, so it survives a killed or failed job::

    checkpoints/
      fingerprint.json       what this state belongs to: config, code and the stage's input files
      trainer/checkpoint-N/  the HF Trainer's latest checkpoint: adapter, optimizer (ZOPrO's ZO
                             state included), scheduler, RNG states, trainer state and log history
      snapshots/             the snapshot folder being written (workflow.models.snapshots format)
      samples.parquet        rollouts scored so far, written just before each checkpoint
      rank{r}/               snapshots and samples of data-parallel process r > 0

On start the state is kept only when the fingerprint matches (otherwise it is discarded and the
stage starts afresh); the newest *complete* checkpoint (one with a readable ``trainer_state.json``,
which the Trainer writes last) is resumed, incomplete ones are deleted, and snapshots and samples are
cut back to that checkpoint's step. The folder is removed once the stage's outputs are written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd
from transformers import TrainerCallback

from workflow.io import atomic_path, write_csv, write_parquet
from workflow.models.snapshots import INDEX, read_index

FINGERPRINT = "fingerprint.json"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# config sections that cannot change what a training stage computes
_IGNORED_SECTIONS = ("plots", "evaluation", "tracking")


def fingerprint(config: dict[str, Any], inputs: Iterable[str | os.PathLike], **extra: Any) -> str:
    """Hash of a stage's identity: its config (without plots/evaluation), ``extra``, the source of
    this package (a fixed bug must not resume from the buggy run), and the path, size and
    modification time of every file of its ``inputs`` (files or folders)."""
    code = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(Path(__file__).parents[1].rglob("*.py"))))
    files = []
    for item in inputs:
        path = Path(item)
        found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for p in found:
            stat = p.stat()
            files.append([str(p), stat.st_size, stat.st_mtime_ns])
    payload = {
        "config": {k: v for k, v in config.items() if k not in _IGNORED_SECTIONS},
        "extra": extra,
        "code": code.hexdigest(),
        "files": files,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _readable_json(path: Path) -> Any:
    """The JSON of ``path``, or None when it is missing or cut short (the Trainer writes its
    checkpoint files in place, so a kill or a full disk can leave half of one)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def complete_checkpoints(trainer_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the complete Trainer checkpoints in ``trainer_dir`` (a readable
    ``trainer_state.json``), oldest first."""
    found = []
    root = Path(trainer_dir)
    if root.is_dir():
        for child in root.iterdir():
            match = _CHECKPOINT.match(child.name)
            if match and isinstance(_readable_json(child / TRAINER_STATE), dict):
                found.append((int(match.group(1)), child))
    return sorted(found)


class StageCheckpoints:
    """The resumable state of one training stage (see the module docstring).

    Every data-parallel process makes one with the same ``root``; rank 0 alone validates and
    cleans it, behind a barrier.
    """

    def __init__(self, root: str | os.PathLike, stage_fingerprint: str):
        from workflow.runtime import processes

        self.root = Path(root)
        self.processes = processes()
        self.rank = int(self.processes.process_index)
        self.trainer_dir = self.root / "trainer"
        own = self.root if self.rank == 0 else self.root / f"rank{self.rank}"
        self.snapshots = own / "snapshots"
        self.samples_path = own / "samples.parquet"
        if self.rank == 0:
            self._validate(stage_fingerprint)
        self.processes.wait_for_everyone()
        checkpoints = complete_checkpoints(self.trainer_dir)
        self.checkpoint: Path | None = checkpoints[-1][1] if checkpoints else None
        self.step = checkpoints[-1][0] if checkpoints else 0
        self._cut_back()

    def _validate(self, stage_fingerprint: str) -> None:
        marker = self.root / FINGERPRINT
        saved = _readable_json(marker) if marker.is_file() else {"fingerprint": stage_fingerprint}
        if not isinstance(saved, dict) or saved.get("fingerprint") != stage_fingerprint:
            print(
                f"{self.root}: config or inputs changed since this state was saved, or {marker} is damaged; "
                "starting afresh"
            )
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(marker) as tmp:
            tmp.write_text(json.dumps({"fingerprint": stage_fingerprint}))
        complete = {path for _, path in complete_checkpoints(self.trainer_dir)}
        if self.trainer_dir.is_dir():
            for child in self.trainer_dir.iterdir():
                if _CHECKPOINT.match(child.name) and child not in complete:
                    print(f"removing incomplete checkpoint {child}")
                    shutil.rmtree(child)

    def _cut_back(self) -> None:
        """Drop this process's snapshots after the resumed step and samples from it on."""
        if self.checkpoint is None:
            shutil.rmtree(self.snapshots, ignore_errors=True)
            self.samples_path.unlink(missing_ok=True)
            return
        index = read_index(self.snapshots)
        stale = index["step"] > self.step
        if stale.any():
            for name in index.loc[stale, "file"]:
                (self.snapshots / name).unlink(missing_ok=True)
            kept = index[~stale]
            write_csv(kept.assign(snapshot=range(len(kept))), self.snapshots / INDEX)

    def resumed_samples(self) -> list[dict[str, Any]]:
        """Rollout records saved before the resumed checkpoint (empty when starting afresh)."""
        if self.checkpoint is None or not self.samples_path.exists():
            return []
        rows = pd.read_parquet(self.samples_path)
        rows = rows[rows["step"] < self.step]
        return [{**row, "prompt": [dict(m) for m in row["prompt"]]} for row in rows.to_dict("records")]

    def callback(self, records: Callable[[], pd.DataFrame]) -> TrainerCallback:
        """A callback that writes ``records()`` to ``samples.parquet`` right before each checkpoint."""
        path = self.samples_path

        class _SaveSamples(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if control.should_save:
                    write_parquet(records(), path)

        return _SaveSamples()

    def describe(self) -> str:
        """One line for the log: where this stage starts."""
        if self.checkpoint is None:
            return f"no checkpoint in {self.trainer_dir}: training from the start"
        return f"resuming from {self.checkpoint} (step {self.step})"

    def finish(self) -> None:
        """Remove the state once every process is done with it (call after writing the outputs)."""
        self.processes.wait_for_everyone()
        if self.rank == 0:
            shutil.rmtree(self.root, ignore_errors=True)
