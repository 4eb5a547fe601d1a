"""Supervised fine-tuning: a LoRA adapter on the base causal LM, trained on prompt + chosen.

Rows become trl's conversational prompt-completion format (``prompt`` = the prompt messages,
``completion`` = the chosen answer messages); with ``completion_only_loss`` the loss covers the
answer tokens only (the chat template's assistant header belongs to the prompt).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from datasets import Dataset
from transformers import set_seed

from workflow import runtime
from workflow.accounting import usable_rows
from workflow.io import atomic_dir, write_csv
from workflow.io import scratch_dir as io_scratch_dir
from workflow.lora import lora_config
from workflow.models import load_causal_lm, load_tokenizer, read_rows
from workflow.snapshots import SnapshotCallback


def trainer_kwargs(
    output_dir: str, epochs: float, learning_rate: float, batch_size: int, seed: int, **extra: Any
) -> dict[str, Any]:
    """Arguments every training stage gives its trl config: no checkpoints, reporting as config
    ``tracking`` says (``runtime.tracking_args()``; none by default), bf16 autocast when
    ``runtime.use_bf16()`` (config ``precision``; the CPU included), else fp32, CPU when no GPU,
    seeded, tqdm progress, frequent logging."""
    kwargs = dict(
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


def sft_dataset(rows: pd.DataFrame) -> Dataset:
    """Conversational prompt-completion dataset: prompt messages -> chosen answer messages."""
    return Dataset.from_dict({"prompt": list(rows["prompt"]), "completion": list(rows["chosen"])})


def build_sft_trainer(
    model,
    tokenizer,
    train_rows: pd.DataFrame,
    cfg: dict[str, Any],
    output_dir: str,
    epochs: float,
    learning_rate: float,
    batch_size: int,
    seed: int,
    callbacks: list | None = None,
    peft_config=None,
    **extra: Any,
):
    """The configured ``trl.SFTTrainer`` (completion-only loss, no packing, LoRA when ``peft_config``)."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        **trainer_kwargs(
            output_dir,
            epochs,
            learning_rate,
            batch_size,
            seed,
            max_length=int(cfg["model"]["max_length"]),
            completion_only_loss=True,
            packing=False,
            dataset_num_proc=None,
            **extra,
        )
    )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=sft_dataset(train_rows),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )


def write_metrics(log_history: list[dict[str, Any]], summary: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a stage's ``metrics.csv``: the Trainer's log history (one row per logged step) plus
    one final row holding ``summary`` at step ``summary["steps"]``."""
    rows = pd.DataFrame(log_history)
    if "step" in rows:
        rows.insert(0, "step", rows.pop("step"))
    rows = pd.concat([rows, pd.DataFrame([{"step": summary["steps"], **summary}])], ignore_index=True)
    write_csv(rows, path)


def train_sft(
    base_path: str,
    train_rows: pd.DataFrame,
    out_dir: str | os.PathLike,
    cfg: dict[str, Any],
    epochs: float,
    learning_rate: float,
    batch_size: int,
    seed: int,
    task: str,
    max_steps: int = -1,
    source: str = "the SFT rows",
) -> dict[str, Any]:
    """Train the SFT LoRA adapter; writes ``out_dir/{adapter,snapshots,metrics.csv}`` atomically.

    ``source``: the file ``train_rows`` came from, named in errors and warnings. Rows the stage
    cannot use are dropped first (``workflow.accounting``, kind ``sft``). Returns the summary
    (steps, final train loss, runtime, rows trained on, the accounting of ``train_rows``).
    """
    out = Path(out_dir)
    set_seed(int(seed))
    tokenizer = load_tokenizer(base_path, task)
    train_rows, data = usable_rows(train_rows, tokenizer, cfg["model"]["max_length"], "sft", source)
    model = load_causal_lm(base_path)
    start = time.time()
    with (
        scratch_dir(out / "adapter") as scratch,
        atomic_dir(out / "snapshots") as snaps,
        atomic_dir(out / "adapter") as adapter,
    ):
        trainer = build_sft_trainer(
            model,
            tokenizer,
            train_rows,
            cfg,
            scratch,
            epochs,
            learning_rate,
            batch_size,
            seed,
            callbacks=[SnapshotCallback(cfg["snapshots"]["every"], snaps)],
            peft_config=lora_config(cfg, "CAUSAL_LM"),
            max_steps=max_steps,
        )
        result = trainer.train()
        trainer.model.save_pretrained(adapter)
        tokenizer.save_pretrained(adapter)
        summary = {
            "stage": "sft",
            "rows": len(train_rows),
            "steps": int(trainer.state.global_step),
            "train_loss": float(result.training_loss),
            "runtime_s": time.time() - start,
            **data,
        }
        write_metrics(trainer.state.log_history, summary, out / "metrics.csv")
    return summary


def run(job) -> None:
    """Stage function of rule ``sft``."""
    from workflow.extract import task_of

    cfg = job.config
    out_dir = job.stage_dir
    rows = read_rows(job.input["train"])
    sft = cfg["sft"]
    summary = train_sft(
        job.params["base"],
        rows,
        out_dir,
        cfg,
        sft["epochs"],
        sft["learning_rate"],
        sft["batch_size"],
        job.seed,
        task_of(cfg["dataset"]["name"]),
        source=job.input["train"],
    )
    print(summary)
