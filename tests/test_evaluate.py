"""Policy evaluation: sampled answers scored by gold and reward, summary with standard errors."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from peft import get_peft_model

from workflow.evaluate import evaluate, evaluation_prompts, gold_scorer, reward_gold_accuracy, run, summarise
from workflow.job import Job
from workflow.lora import lora_config
from workflow.models import load_policy, load_sequence_classifier, load_tokenizer, read_rows

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfg():
    config = copy.deepcopy(yaml.safe_load((REPO / "config.yaml").read_text()))
    config["evaluation"].update(n_prompts=6, samples_per_prompt=2)
    config["model"]["generation_length"] = 12
    return config


@pytest.fixture(scope="module")
def reward_adapter(tiny_base, cfg, tmp_path_factory):
    """An untrained reward adapter (fresh LoRA + score head) saved with its tokenizer."""
    out = tmp_path_factory.mktemp("reward_adapter")
    tokenizer = load_tokenizer(tiny_base, "chat")
    model = get_peft_model(load_sequence_classifier(tiny_base, tokenizer.pad_token_id), lora_config(cfg, "SEQ_CLS"))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def test_summary_stderr():
    rows = pd.DataFrame({"gold": [1.0, 2.0, 3.0, 4.0], "reward": [0.5, np.nan, 0.5, 0.5]})
    summary = summarise(rows).iloc[0]
    assert summary["n"] == 4 and summary["gold_mean"] == 2.5
    assert summary["gold_stderr"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert summary["reward_mean"] == 0.5 and summary["reward_stderr"] == 0.0  # NaNs are left out
    assert math.isnan(summarise(pd.DataFrame({"gold": [np.nan], "reward": [1.0]})).iloc[0]["gold_mean"])
    # two samples per prompt: the error is that of the 2 prompt means (1.5, 3.5), not of 4 samples
    rows["prompt_index"] = [0, 0, 1, 1]
    summary = summarise(rows).iloc[0]
    assert summary["gold_mean"] == 2.5 and summary["n"] == 4
    assert summary["gold_stderr"] == pytest.approx(np.std([1.5, 3.5], ddof=1) / np.sqrt(2))


def test_gold_scorer_hook():
    assert gold_scorer({"dataset": {"name": "embedded"}}) is not None
    assert gold_scorer({"dataset": {"name": "hh-rlhf"}}) is None


def test_evaluate_rows_seeded(tiny_base, embedded_parquet, reward_adapter, cfg):
    from workflow.models import load_reward_model

    tokenizer = load_tokenizer(tiny_base, "chat")
    policy = load_policy(tiny_base, None)
    reward = load_reward_model(tiny_base, reward_adapter)
    prompts = evaluation_prompts(read_rows(embedded_parquet["test"]), cfg["evaluation"]["n_prompts"])
    rows = evaluate(policy, tokenizer, reward, prompts, cfg, seed=0)
    assert len(rows) == 12 and rows["prompt_index"].tolist() == [i // 2 for i in range(12)]
    assert {"prompt", "prompt_text", "answer", "gold", "reward"} <= set(rows.columns)
    assert rows["gold"].notna().all() and rows["reward"].notna().all()
    assert all(isinstance(a, str) and "<|im_end|>" not in a for a in rows["answer"])
    again = evaluate(policy, tokenizer, reward, prompts, cfg, seed=0)
    assert again["answer"].tolist() == rows["answer"].tolist()
    assert np.allclose(again["reward"], rows["reward"])


def test_run_writes_samples_and_summary(tiny_base, embedded_parquet, reward_adapter, cfg, tmp_path):
    job = Job(input={"test": embedded_parquet["test"], "reward": reward_adapter},
              output={"samples": str(tmp_path / "evaluation.parquet"),
                      "summary": str(tmp_path / "evaluation_summary.csv")},
              params={"base": tiny_base}, config=cfg, wildcards={})
    run(job)
    rows = pd.read_parquet(job.output["samples"])
    summary = pd.read_csv(job.output["summary"])
    assert len(rows) == 12 and list(summary.columns) == ["n", "gold_mean", "gold_stderr", "reward_mean", "reward_stderr",
                                                          "reward_gold_accuracy"]
    assert summary["gold_mean"][0] == pytest.approx(rows["gold"].mean())
    per_prompt = rows.groupby("prompt_index")["gold"].mean()  # several samples per prompt: cluster them
    assert summary["gold_stderr"][0] == pytest.approx(per_prompt.std(ddof=1) / math.sqrt(len(per_prompt)))


def test_run_fails_on_nan_rewards(tiny_base, embedded_parquet, cfg, tmp_path):
    """The SFT/base evaluation fails, as the loop's does, when the reward model scores NaN (a NaN
    reward would drop out of ``reward_mean`` and the job would exit 0)."""
    import torch

    reward = tmp_path / "nan_reward"
    tokenizer = load_tokenizer(tiny_base, "chat")
    model = get_peft_model(load_sequence_classifier(tiny_base, tokenizer.pad_token_id), lora_config(cfg, "SEQ_CLS"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "score" in name:
                param.fill_(float("nan"))
    model.save_pretrained(reward)
    tokenizer.save_pretrained(reward)
    job = Job(input={"test": embedded_parquet["test"], "reward": str(reward)},
              output={"samples": str(tmp_path / "evaluation.parquet"),
                      "summary": str(tmp_path / "evaluation_summary.csv")},
              params={"base": tiny_base}, config=cfg, wildcards={})
    with pytest.raises(FloatingPointError, match=f"{tmp_path / 'evaluation.parquet'}: reward model {reward} "
                                                 "produced non-finite scores for 12 of 12"):
        run(job)
    assert not (tmp_path / "evaluation.parquet").exists() and not (tmp_path / "evaluation_summary.csv").exists()


def test_reward_gold_accuracy_counts_pairs_within_prompts():
    rows = pd.DataFrame({
        "prompt_index": [0, 0, 1, 1, 2, 2, 3, 3],
        "gold": [0.1, 0.5, 0.2, 0.9, 0.3, 0.3, 0.0, 1.0],
        "reward": [1.0, 2.0, 5.0, -1.0, 0.0, 9.0, 4.0, 4.0],
    })
    # prompt 0 agrees, 1 disagrees, 2 has a gold tie (left out), 3 a reward tie (half)
    assert reward_gold_accuracy(rows) == pytest.approx(1.5 / 3)
    assert summarise(rows).iloc[0]["reward_gold_accuracy"] == pytest.approx(0.5)
    # pairs never cross prompts: one sample per prompt gives no pair
    assert math.isnan(reward_gold_accuracy(rows.drop_duplicates("prompt_index")))
    assert math.isnan(reward_gold_accuracy(rows.assign(gold=np.nan)))
