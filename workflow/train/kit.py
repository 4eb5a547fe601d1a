"""The training kit every training stage (SFT, reward model, policy) shares: the trl arguments they
all give, the Trainer's scratch folder, the folders and outputs of an adapter stage and the
``metrics.csv`` writer."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from workflow import runtime
from workflow.io import atomic_dir, write_csv
from workflow.io import scratch_dir as io_scratch_dir
from workflow.schema import setting


def trainer_kwargs(
    output_dir: str,
    epochs: float,
    learning_rate: float,
    batch_size: int,
    seed: int,
    *,
    config: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """Arguments every training stage gives its trl config: no checkpoints, reporting as config
    ``tracking`` says (``runtime.tracking_args()``; none by default), bf16 autocast when
    ``runtime.use_bf16()`` (config ``precision``; the CPU included), else fp32, CPU when no GPU,
    seeded, tqdm progress, frequent logging, and activation recomputation only when ``config``'s
    ``activation_checkpointing`` says so (gradient checkpointing; trl's configs default to on)."""
    kwargs = dict(
        activation_checkpointing=bool(setting(config, "activation_checkpointing")),
        output_dir=output_dir,
        num_train_epochs=float(epochs),
        learning_rate=float(learning_rate),
        per_device_train_batch_size=int(batch_size),
        per_device_eval_batch_size=int(batch_size),
        lr_scheduler_type="linear",
        warmup_steps=0,
        seed=int(seed),
        data_seed=int(seed),
        save_strategy="no",
        eval_strategy="no",
        **runtime.tracking_args(),
        logging_strategy="steps",
        logging_steps=0.02,  # a ratio: about 50 log rows per run
        logging_first_step=True,
        disable_tqdm=False,
        bf16=runtime.use_bf16(),
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=True,
    )
    kwargs.update(extra)
    return kwargs


@contextlib.contextmanager
def scratch_dir(near: str | os.PathLike) -> Iterator[str]:
    """The Trainer's ``output_dir``: ``.trainer.tmp`` beside ``near`` (``workflow.io.scratch_dir``:
    a fixed name, so a killed run's folder is removed by the next run), always removed."""
    with io_scratch_dir(Path(near).with_name("trainer")) as path:
        yield str(path)


@contextlib.contextmanager
def adapter_stage_dirs(out: Path) -> Iterator[tuple[str, str, str]]:
    """The folders of a stage that trains an adapter into ``out`` (SFT, reward model): the Trainer's
    scratch folder, and ``snapshots/`` and ``adapter/``, which appear whole when the block ends
    without an error and not at all otherwise."""
    with (
        scratch_dir(out / "adapter") as scratch,
        atomic_dir(out / "snapshots") as snaps,
        atomic_dir(out / "adapter") as adapter,
    ):
        yield scratch, snaps, adapter


def stage_summary(stage: str, trainer: Any, result: Any, start: float, data: dict[str, Any], **fields: Any) -> dict:
    """The summary row of a training stage: its name, ``fields``, steps, training loss, wall time
    since ``start`` (``time.time()``) and the data accounting ``data``."""
    return {
        "stage": stage,
        **fields,
        "steps": int(trainer.state.global_step),
        "train_loss": float(result.training_loss),
        "runtime_s": time.time() - start,
        **data,
    }


def save_adapter_stage(trainer: Any, tokenizer: Any, adapter: str, summary: dict[str, Any], out: Path) -> None:
    """Save the trained adapter and its tokenizer into ``adapter`` and write ``out/metrics.csv``."""
    trainer.model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    write_metrics(trainer.state.log_history, summary, out / "metrics.csv")


def write_metrics(log_history: list[dict[str, Any]], summary: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a stage's ``metrics.csv``: the Trainer's log history (one row per logged step) plus
    one final row holding ``summary`` at step ``summary["steps"]``."""
    rows = pd.DataFrame(log_history)
    if "step" in rows:
        rows.insert(0, "step", rows.pop("step"))
    rows = pd.concat([rows, pd.DataFrame([{"step": summary["steps"], **summary}])], ignore_index=True)
    write_csv(rows, path)
