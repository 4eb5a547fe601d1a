"""Stages ``evaluate_policy`` (the SFT adapter) and ``evaluate_base`` (the untrained base model):
one policy answers the evaluation prompts (:mod:`workflow.evaluation.generate`), scored by reward model 0."""

from __future__ import annotations

from typing import TYPE_CHECKING

from workflow.data.datasets import task_of
from workflow.evaluation.generate import evaluate, evaluation_prompts, require_finite_rewards, summarise
from workflow.io import write_csv, write_parquet
from workflow.models.loading import load_policy, load_reward_model, load_tokenizer, read_rows

if TYPE_CHECKING:
    from workflow.job import Job


def run(job: Job) -> None:
    """Stage function of ``evaluate_policy`` / ``evaluate_base``.

    Inputs: ``test`` rows, ``reward`` adapter, optional ``adapter`` (the policy; absent = the
    bare base model). Params: ``base`` path. Outputs: ``samples`` parquet, ``summary`` CSV.
    """
    cfg = job.config
    task = task_of(cfg["dataset"]["name"])
    base = job.params["base"]
    adapter = job.input.get("adapter") or None
    tokenizer = load_tokenizer(adapter or base, task)
    policy = load_policy(base, adapter, trainable=False)
    reward_tokenizer = load_tokenizer(job.input["reward"], task)
    reward = load_reward_model(base, job.input["reward"], pad_token_id=reward_tokenizer.pad_token_id)
    prompts = evaluation_prompts(
        read_rows(job.input["test"]), cfg["evaluation"]["n_prompts"], tokenizer, cfg["model"], job.input["test"]
    )
    rows = evaluate(policy, tokenizer, reward, prompts, cfg, job.seed, reward_tokenizer=reward_tokenizer)
    require_finite_rewards(rows, job.input["reward"], job.output["samples"])
    write_parquet(rows, job.output["samples"])
    summary = summarise(rows)
    write_csv(summary, job.output["summary"])
    print(summary.to_string(index=False))
