"""Supervised fine-tuning: a LoRA adapter on the base causal LM, trained on prompt + chosen.

Rows become trl's conversational prompt-completion format (``prompt`` = the prompt messages,
``completion`` = the chosen answer messages); with ``completion_only_loss`` the loss covers the
answer tokens only (the chat template's assistant header belongs to the prompt).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from datasets import Dataset
from transformers import set_seed

from workflow.data.accounting import usable_rows
from workflow.models.loading import load_causal_lm, load_tokenizer, read_rows
from workflow.models.lora import lora_config
from workflow.models.snapshots import SnapshotCallback
from workflow.train.kit import adapter_stage_dirs, save_adapter_stage, stage_summary, trainer_kwargs

if TYPE_CHECKING:
    from workflow.job import Job


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
            config=cfg,
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
    cannot use are dropped first (``workflow.data.accounting``, kind ``sft``). Returns the summary
    (steps, final train loss, runtime, rows trained on, the accounting of ``train_rows``).
    """
    out = Path(out_dir)
    set_seed(int(seed))
    tokenizer = load_tokenizer(base_path, task)
    train_rows, data = usable_rows(train_rows, tokenizer, cfg["model"]["max_length"], "sft", source)
    model = load_causal_lm(base_path)
    start = time.time()
    with adapter_stage_dirs(out) as (scratch, snaps, adapter):
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
        summary = stage_summary("sft", trainer, result, start, data, rows=len(train_rows))
        save_adapter_stage(trainer, tokenizer, adapter, summary, out)
    return summary


def run(job: Job) -> None:
    """Stage function of rule ``sft``."""
    from workflow.data.datasets import task_of

    cfg, sft = job.config, job.config["sft"]
    summary = train_sft(
        job.params["base"],
        read_rows(job.input["train"]),
        job.stage_dir,
        cfg,
        sft["epochs"],
        sft["learning_rate"],
        sft["batch_size"],
        job.seed,
        task_of(cfg["dataset"]["name"]),
        source=job.input["train"],
    )
    print(summary)
