"""Reward models: a LoRA sequence-classification head (1 label) on the base model.

Objectives:
- pairs (default): Bradley-Terry, ``-log sigmoid(r(chosen) - r(rejected))`` (trl ``RewardTrainer``);
- rows with a ``score`` column (MT direct-assessment z-scores), ``reward.score_objective``:
  - ``regression``: mean squared error between ``r(prompt + chosen)`` and the row's score; the
    rejected answer is not used (the score replaces the pair, as in the reference system);
  - ``margin``: Bradley-Terry with the score as the required margin (trl's ``margin`` column).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from datasets import Dataset
from torch import nn
from transformers import set_seed

from workflow.data.accounting import usable_rows
from workflow.io import atomic_dir
from workflow.models.loading import has_scores, load_reward_model, load_sequence_classifier, load_tokenizer, read_rows
from workflow.models.lora import lora_config
from workflow.models.snapshots import SnapshotCallback
from workflow.schema import section
from workflow.train.kit import adapter_stage_dirs, save_adapter_stage, stage_summary, trainer_kwargs
from workflow.train.scoring import reward_scores

if TYPE_CHECKING:
    from workflow.job import Job


def _trl():
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    return RewardConfig, RewardTrainer, DataCollatorForPreference


def make_trainer_class():
    """``RewardTrainer`` with the ``regression`` objective (a ``score`` column, MSE on chosen)."""
    _, RewardTrainer, DataCollatorForPreference = _trl()

    class ScoreCollator(DataCollatorForPreference):
        def torch_call(self, examples):
            batch = super().torch_call(examples)
            if "score" in examples[0]:
                batch["score"] = torch.tensor([float(e["score"]) for e in examples], dtype=torch.float)
            return batch

    class ScoreRewardTrainer(RewardTrainer):
        """Bradley-Terry as in trl; with a ``score`` in the batch, MSE of r(chosen) on the score."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.data_collator = ScoreCollator(
                pad_token_id=self.processing_class.pad_token_id, pad_to_multiple_of=self.args.pad_to_multiple_of
            )

        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:
                self._signature_columns = ["chosen_ids", "rejected_ids", "margin", "score"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if "score" not in inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            score = inputs.pop("score")
            mode = "train" if self.model.training else "eval"
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            chosen, rejected = torch.chunk(outputs.logits.squeeze(-1).float(), chunks=2)
            loss = nn.functional.mse_loss(chosen, score.to(chosen.device))
            with torch.no_grad():
                self._metrics[mode]["mse"].append(loss.item())
                self._metrics[mode]["accuracy"].append((chosen > rejected).float().mean().item())
                self._metrics[mode]["mean_reward"].append(chosen.mean().item())
            return (loss, outputs) if return_outputs else loss

    return ScoreRewardTrainer


def reward_dataset(rows: pd.DataFrame, objective: str | None = None) -> Dataset:
    """Conversational preference dataset (explicit prompt); adds ``score`` (regression) or
    ``margin`` (margin objective) when the rows carry scores."""
    data = {"prompt": list(rows["prompt"]), "chosen": list(rows["chosen"]), "rejected": list(rows["rejected"])}
    if objective and has_scores(rows):
        scores = rows["score"].astype(float).fillna(0.0).tolist()
        data["score" if objective == "regression" else "margin"] = scores
    return Dataset.from_dict(data)


def pairwise_accuracy(model, tokenizer, rows: pd.DataFrame, batch_size: int = 32) -> float:
    """Fraction of rows whose chosen answer gets a higher reward than the rejected one (ties: 1/2)."""
    chosen = reward_scores(model, tokenizer, list(rows["prompt"]), list(rows["chosen"]), batch_size)
    rejected = reward_scores(model, tokenizer, list(rows["prompt"]), list(rows["rejected"]), batch_size)
    return float(np.mean((chosen > rejected) + 0.5 * (chosen == rejected)))


def train_reward(
    base_path: str,
    init_adapter: str | None,
    train_rows: pd.DataFrame,
    eval_rows: pd.DataFrame | None,
    out_dir: str | os.PathLike,
    cfg: dict[str, Any],
    epochs: float,
    learning_rate: float,
    seed: int,
    task: str,
    batch_size: int | None = None,
    max_steps: int = -1,
    source: str = "the reward rows",
) -> dict[str, Any]:
    """Train a reward model and write ``out_dir/{adapter,snapshots,metrics.csv}`` atomically.

    ``init_adapter``: continue from that reward adapter (LoRA and ``score`` head), e.g. to refine
    reward model i into i+1 on judged pairs; ``None`` starts a fresh LoRA + head on the base.
    ``train_rows``/``eval_rows``: preference rows (``prompt``, ``chosen``, ``rejected`` message
    lists; optional ``score``). The objective is Bradley-Terry, or ``reward.score_objective`` when
    the training rows carry scores. Training rows the stage cannot use are dropped first
    (``workflow.data.accounting``; ``source``: their file, named in errors and warnings). Returns the
    summary, with ``heldout_accuracy`` (pairwise accuracy on ``eval_rows``, NaN without them),
    ``initial_heldout_accuracy`` and the accounting of ``train_rows``.
    """
    out = Path(out_dir)
    rcfg = section(cfg, "reward")
    batch_size = int(batch_size or rcfg["batch_size"])
    objective = rcfg["score_objective"] if has_scores(train_rows) else None
    set_seed(int(seed))
    tokenizer = load_tokenizer(init_adapter or base_path, task)
    train_rows, data = usable_rows(
        train_rows, tokenizer, cfg["model"]["max_length"], "scores" if objective == "regression" else "pairs", source
    )
    if init_adapter:
        model, peft_config = (
            load_reward_model(base_path, init_adapter, trainable=True, pad_token_id=tokenizer.pad_token_id),
            None,
        )
    else:
        model = load_sequence_classifier(base_path, tokenizer.pad_token_id)
        peft_config = lora_config(cfg, "SEQ_CLS")
    RewardConfig, _, _ = _trl()
    trainer_cls = make_trainer_class()
    start = time.time()
    with adapter_stage_dirs(out) as (scratch, snaps, adapter):
        args = RewardConfig(
            **trainer_kwargs(
                scratch,
                epochs,
                learning_rate,
                batch_size,
                seed,
                config=cfg,
                max_length=int(cfg["model"]["max_length"]),
                dataset_num_proc=None,
                max_steps=max_steps,
                disable_dropout=True,
            )
        )
        trainer = trainer_cls(
            model=model,
            args=args,
            train_dataset=reward_dataset(train_rows, objective),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[SnapshotCallback(cfg["snapshots"]["every"], snaps)],
        )
        initial = pairwise_accuracy(trainer.model, tokenizer, eval_rows) if eval_rows is not None else float("nan")
        result = trainer.train()
        final = pairwise_accuracy(trainer.model, tokenizer, eval_rows) if eval_rows is not None else float("nan")
        summary = stage_summary(
            "reward",
            trainer,
            result,
            start,
            data,
            objective=objective or "bradley_terry",
            init_adapter=init_adapter or "",
            rows=len(train_rows),
            heldout_rows=0 if eval_rows is None else len(eval_rows),
            initial_heldout_accuracy=initial,
            heldout_accuracy=final,
        )
        save_adapter_stage(trainer, tokenizer, adapter, summary, out)
    return summary


def run(job: Job) -> None:
    """Stage function of rule ``reward_initial`` (reward model of iteration 0)."""
    from workflow.data.datasets import task_of

    cfg, rcfg = job.config, job.config["reward"]
    summary = train_reward(
        job.params["base"],
        None,
        read_rows(job.input["train"]),
        read_rows(job.input["test"]),
        job.stage_dir,
        cfg,
        rcfg["epochs"],
        rcfg["learning_rate"],
        job.seed,
        task_of(cfg["dataset"]["name"]),
        batch_size=rcfg["batch_size"],
        source=job.input["train"],
    )
    print(summary)


# --------------------------------------------------------------------------------------------
# refinement (rule refine_reward): reward model i + pairs i -> reward model i+1
# --------------------------------------------------------------------------------------------
HELDOUT_ROWS = 256


class RefineError(ValueError):
    """The pairs cannot refine the reward model (none left)."""


def average_adapters(previous: str, new: str, alpha: float, out_file: str) -> None:
    """``alpha * previous + (1 - alpha) * new`` on every tensor of two saved adapters (same keys)."""
    from safetensors.torch import save_file

    from workflow.io import atomic_path
    from workflow.models.snapshots import load_tensors

    prev = load_tensors(f"{previous}/adapter_model.safetensors")
    cur = load_tensors(f"{new}/adapter_model.safetensors")
    if set(prev) != set(cur):
        raise ValueError(f"keep_rm_close: adapters {previous} and {new} have different tensors")
    mixed = {
        k: (float(alpha) * prev[k].float() + (1.0 - float(alpha)) * cur[k].float()).to(cur[k].dtype).contiguous()
        for k in cur
    }
    with atomic_path(out_file) as tmp:
        save_file(mixed, str(tmp), metadata={"format": "pt"})


def refine_reward(
    base: str,
    reward_adapter: str,
    pairs_path: str,
    test_path: str | None,
    out_dir: str,
    cfg: dict[str, Any],
    seed: int,
    task: str,
    where: str,
) -> dict[str, Any]:
    """Continue reward model ``i`` on pairs ``i`` (:func:`train_reward`); with
    ``loop.keep_rm_close`` the saved adapter is ``alpha * previous + (1 - alpha) * refined``
    (``loop.keep_rm_alpha``). Snapshots and metrics are those of the refinement itself."""
    import shutil

    from workflow.io import write_csv

    pairs = read_rows(pairs_path)
    if pairs.empty:
        raise RefineError(f"{where}: {pairs_path} holds no pairs to refine the reward model on")
    rows = pairs[["prompt", "chosen", "rejected"]].reset_index(drop=True)
    heldout = read_rows(test_path).head(HELDOUT_ROWS) if test_path else None
    rcfg, loop = section(cfg, "reward"), section(cfg, "loop")
    out = Path(out_dir)
    keep_close = bool(loop["keep_rm_close"])
    target = out.parent / f".{out.name}.refine" if keep_close else out  # mixed before it is moved in place
    if keep_close:
        shutil.rmtree(target, ignore_errors=True)
    try:
        summary = train_reward(
            base,
            reward_adapter,
            rows,
            heldout,
            target,
            cfg,
            rcfg["refine_epochs"],
            rcfg["refine_learning_rate"],
            seed,
            task,
            batch_size=rcfg["batch_size"],
            source=pairs_path,
        )
        if not keep_close:
            return summary
        alpha = float(loop["keep_rm_alpha"])
        average_adapters(
            reward_adapter, str(target / "adapter"), alpha, str(target / "adapter" / "adapter_model.safetensors")
        )
        out.mkdir(parents=True, exist_ok=True)
        for name in ("snapshots", "adapter"):
            with atomic_dir(out / name) as tmp:
                os.rmdir(tmp)
                os.replace(target / name, tmp)
        summary["keep_rm_alpha"] = alpha
        metrics = pd.read_csv(target / "metrics.csv")
        metrics["keep_rm_alpha"] = alpha
        write_csv(metrics, out / "metrics.csv")
        return summary
    finally:
        if keep_close:
            shutil.rmtree(target, ignore_errors=True)


def run_refine(job: Job) -> None:
    """Stage function of rule ``refine_reward``."""
    from workflow.data.datasets import task_of

    cfg = job.config
    method, iteration = job.wildcards["method"], int(job.wildcards["i"])
    out_dir = job.stage_dir
    where = f"{out_dir} ({method} reward model {iteration})"
    summary = refine_reward(
        job.params["base"],
        job.input["reward"],
        job.input["pairs"],
        job.input.get("test"),
        str(out_dir),
        cfg,
        job.stage_seed("refine"),
        task_of(cfg["dataset"]["name"]),
        where,
    )
    print(summary)
