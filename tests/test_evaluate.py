"""Policy evaluation: sampled answers scored by gold and reward, summary with standard errors, and
the paired gains of ``evaluation.csv`` (same prompts and sampling seeds for every policy)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from peft import get_peft_model

from workflow.evaluation.evaluate_policy import run
from workflow.evaluation.generate import (
    evaluate,
    evaluation_prompts,
    paired_difference,
    reward_gold_accuracy,
    sampling_seed,
    summarise,
)
from workflow.job import Job
from workflow.models.loading import load_policy, load_sequence_classifier, load_tokenizer, read_rows
from workflow.models.lora import lora_config
from workflow.train.sampling import sample_completions
from workflow.train.scoring import gold_scorer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfg():
    config = copy.deepcopy(yaml.safe_load((REPO / "config.yaml").read_text()))
    config["evaluation"].update(n_prompts=6, n_seeds=2, samples_per_prompt=2)
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
    # two sampling seeds of one sample each: a unit is a (prompt, seed) pair, 4 units of one sample
    rows["seed"] = [0, 1, 0, 1]
    summary = summarise(rows).iloc[0]
    assert summary["gold_stderr"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert summary["reward_stderr"] == 0.0


def test_paired_difference_by_hand():
    # 2 prompts x 2 sampling seeds x 2 samples; policy b = policy a + a per-unit shift
    units = [(p, s) for p in range(2) for s in range(2)]
    a = pd.DataFrame(
        {
            "prompt_index": [p for p, s in units for _ in range(2)],
            "seed": [s for p, s in units for _ in range(2)],
            "sample": [0, 1] * 4,
            "prompt_text": [f"prompt {p}" for p, s in units for _ in range(2)],
            "gold": [0.0, 1.0, 0.5, 0.5, 1.0, 1.0, 0.0, 0.0],
            "reward": 0.0,
        }
    )
    shift = {(0, 0): 0.3, (0, 1): 0.1, (1, 0): 0.2, (1, 1): 0.25}
    b = a.assign(gold=[g + shift[(p, s)] for p, s, g in zip(a.prompt_index, a.seed, a.gold)])
    gain, se = paired_difference(b, a)
    d = np.array(list(shift.values()))
    assert gain == pytest.approx(d.mean()) and se == pytest.approx(d.std(ddof=1) / 2)
    # the unpaired error of the same difference is far larger (the prompts' spread does not cancel)
    sb, sa = summarise(b).iloc[0], summarise(a).iloc[0]
    assert np.hypot(sb.gold_stderr, sa.gold_stderr) > 2 * se
    assert paired_difference(a, a) == (0.0, 0.0)  # identical policies
    # rows in another order pair by (prompt, seed), not by position
    assert paired_difference(b.sample(frac=1, random_state=0), a) == pytest.approx((gain, se))
    no_gold = paired_difference(a.assign(gold=np.nan), a.assign(gold=np.nan))
    assert all(math.isnan(x) for x in no_gold)  # no gold judge: NaN
    with pytest.raises(ValueError, match="not paired"):
        paired_difference(a[a.seed == 0], a)  # other sampling seeds
    with pytest.raises(ValueError, match="prompt 1 differs"):
        paired_difference(a.assign(prompt_text=a.prompt_text.replace("prompt 1", "other")), a)


def test_sampling_seed_depends_on_the_config_seed_and_index_only():
    seeds = [sampling_seed(0, s) for s in range(3)]
    assert len(set(seeds)) == 3 and seeds == [sampling_seed(0, s) for s in range(3)]
    assert sampling_seed(1, 0) not in seeds and 0 <= min(seeds) and max(seeds) < 2**32


def test_gold_scorer_hook():
    from workflow.data.embedded_task import gold_score

    assert gold_scorer({"dataset": {"name": "embedded"}}) is gold_score
    assert gold_scorer({"dataset": {"name": "hh-rlhf"}}) is None


def test_evaluate_rows_seeded(tiny_base, embedded_parquet, reward_adapter, cfg):
    from workflow.models.loading import load_reward_model

    tokenizer = load_tokenizer(tiny_base, "chat")
    policy = load_policy(tiny_base, None)
    reward = load_reward_model(tiny_base, reward_adapter)
    test = embedded_parquet["test"]
    prompts = evaluation_prompts(read_rows(test), cfg["evaluation"]["n_prompts"], tokenizer, cfg["model"], test)
    rows = evaluate(policy, tokenizer, reward, prompts, cfg, seed=0)
    assert len(rows) == 24 and rows["prompt_index"].tolist() == [i // 2 for i in range(12)] * 2
    assert rows["seed"].tolist() == [0] * 12 + [1] * 12 and rows["sample"].tolist() == [0, 1] * 12
    assert rows["prompt_text"].iloc[:12].tolist() == rows["prompt_text"].iloc[12:].tolist()
    assert rows["answer"].iloc[:12].tolist() != rows["answer"].iloc[12:].tolist()  # two seeds, other draws
    assert {"prompt", "prompt_text", "answer", "gold", "reward"} <= set(rows.columns)
    assert rows["gold"].notna().all() and rows["reward"].notna().all()
    assert all(isinstance(a, str) and "<|im_end|>" not in a for a in rows["answer"])
    again = evaluate(policy, tokenizer, reward, prompts, cfg, seed=0)
    assert again["answer"].tolist() == rows["answer"].tolist()
    assert np.allclose(again["reward"], rows["reward"])


def test_sampling_is_seeded_and_leaves_the_callers_rng_and_mode_as_they_were(tiny_base, embedded_parquet):
    """On the model's device: on a GPU generation draws from the GPU's random state, not the CPU's."""
    tokenizer = load_tokenizer(tiny_base, "chat")
    policy = load_policy(tiny_base, None)
    device = next(policy.parameters()).device
    test = embedded_parquet["test"]
    prompts = evaluation_prompts(read_rows(test), 5, tokenizer, {"max_length": 128, "generation_length": 24}, test)
    state = torch.cuda.get_rng_state if device.type == "cuda" else torch.get_rng_state
    policy.train()
    before = state()
    answers = sample_completions(policy, tokenizer, prompts, 10, 1.0, seed=3, batch_size=2)
    assert torch.equal(state(), before) and policy.training
    assert len(answers) == 5 and len(set(answers)) > 1
    assert sample_completions(policy, tokenizer, prompts, 10, 1.0, seed=3, batch_size=2) == answers
    assert sample_completions(policy, tokenizer, prompts, 10, 1.0, seed=4, batch_size=2) != answers


def test_run_writes_samples_and_summary(tiny_base, embedded_parquet, reward_adapter, cfg, tmp_path):
    job = Job(
        input={"test": embedded_parquet["test"], "reward": reward_adapter},
        output={"samples": str(tmp_path / "evaluation.parquet"), "summary": str(tmp_path / "evaluation_summary.csv")},
        params={"base": tiny_base},
        config=cfg,
        wildcards={},
    )
    run(job)
    rows = pd.read_parquet(job.output["samples"])
    summary = pd.read_csv(job.output["summary"])
    assert len(rows) == 24 and list(summary.columns) == [
        "n",
        "gold_mean",
        "gold_stderr",
        "reward_mean",
        "reward_stderr",
        "reward_gold_accuracy",
    ]
    assert summary["gold_mean"][0] == pytest.approx(rows["gold"].mean())
    per_unit = rows.groupby(["prompt_index", "seed"])["gold"].mean()  # several samples per unit: cluster them
    assert len(per_unit) == 12
    assert summary["gold_stderr"][0] == pytest.approx(per_unit.std(ddof=1) / math.sqrt(len(per_unit)))


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
    job = Job(
        input={"test": embedded_parquet["test"], "reward": str(reward)},
        output={"samples": str(tmp_path / "evaluation.parquet"), "summary": str(tmp_path / "evaluation_summary.csv")},
        params={"base": tiny_base},
        config=cfg,
        wildcards={},
    )
    ecfg = cfg["evaluation"]
    answers = int(ecfg["n_prompts"]) * int(ecfg.get("n_seeds", 1)) * int(ecfg["samples_per_prompt"])
    with pytest.raises(
        FloatingPointError,
        match=f"{tmp_path / 'evaluation.parquet'}: reward model {reward} "
        f"produced non-finite scores for {answers} of {answers}",
    ):
        run(job)
    assert not (tmp_path / "evaluation.parquet").exists() and not (tmp_path / "evaluation_summary.csv").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "damaged table"),
        ("n,kl\n3,0.1\n", "missing column.*gold_mean"),
        ("gold_mean,kl\n", "an evaluation summary without a row"),
    ],
)
def test_a_damaged_summary_is_an_error_naming_it(tmp_path, text, message):
    from workflow.evaluation.loop_eval import evaluation_table
    from workflow.io import DataFileError

    good, bad = tmp_path / "sft.csv", tmp_path / "iter_0.csv"
    good.write_text("gold_mean,kl,iteration\n0.5,0.0,-1\n")
    bad.write_text(text)
    with pytest.raises(DataFileError, match=f"{bad}: {message}"):
        evaluation_table(str(good), [str(bad)], [])


def test_reward_gold_accuracy_counts_pairs_within_prompts():
    rows = pd.DataFrame(
        {
            "prompt_index": [0, 0, 1, 1, 2, 2, 3, 3],
            "gold": [0.1, 0.5, 0.2, 0.9, 0.3, 0.3, 0.0, 1.0],
            "reward": [1.0, 2.0, 5.0, -1.0, 0.0, 9.0, 4.0, 4.0],
        }
    )
    # prompt 0 agrees, 1 disagrees, 2 has a gold tie (left out), 3 a reward tie (half)
    assert reward_gold_accuracy(rows) == pytest.approx(1.5 / 3)
    assert summarise(rows).iloc[0]["reward_gold_accuracy"] == pytest.approx(0.5)
    # pairs never cross prompts: one sample per prompt gives no pair
    assert math.isnan(reward_gold_accuracy(rows.drop_duplicates("prompt_index")))
    assert math.isnan(reward_gold_accuracy(rows.assign(gold=np.nan)))


def test_every_policy_is_evaluated_with_the_same_sampling_seeds(tiny_base, adapters, embedded_parquet, cfg, tmp_path):
    """SFT (rule evaluate_policy) and two loop iterations of different methods (rule
    evaluate_iteration): the iteration whose policy is the SFT adapter gives SFT's answers exactly,
    so its paired gain over SFT is 0 with standard error 0, and the table's paired columns are the
    by-hand differences of the samples."""
    from workflow.evaluation import loop_eval

    def job(name, inputs, wildcards=None, **params):
        out = tmp_path / name
        return Job(
            input={"test": embedded_parquet["test"], **inputs},
            output={"samples": str(out / "evaluation.parquet"), "summary": str(out / "evaluation_summary.csv")},
            params={"base": tiny_base, **params},
            config=cfg,
            wildcards=wildcards or {},
        )

    sft = job("sft", {"adapter": adapters["sft"], "reward": adapters["reward"]})
    run(sft)
    iterations = [  # iteration 0 of rloo (another policy), iteration 1 of zorloo (the SFT adapter itself)
        job(
            "rloo_0",
            {"policy": adapters["sft2"], "sft": adapters["sft"], "reward": adapters["reward"]},
            wildcards={"method": "rloo", "i": "0"},
        ),
        job(
            "zorloo_1",
            {"policy": adapters["sft"], "sft": adapters["sft"], "reward": adapters["reward1"]},
            wildcards={"method": "zorloo", "i": "1"},
        ),
    ]
    previous = sft.output["samples"]
    for j in iterations:  # each judged against SFT and the policy before it (SFT, then rloo_0 here)
        j.input.update(sft_samples=sft.output["samples"], previous_samples=previous)
        loop_eval.run(j)
        previous = j.output["samples"]
    sft_rows, rows0, rows1 = (pd.read_parquet(j.output["samples"]) for j in (sft, *iterations))
    assert rows1["answer"].tolist() == sft_rows["answer"].tolist()  # same seeds whatever method and iteration
    assert rows0["answer"].tolist() != sft_rows["answer"].tolist()
    assert rows1["gold"].tolist() == sft_rows["gold"].tolist() and (rows1["kl"] == 0).all()

    table = loop_eval.evaluation_table(
        sft.output["summary"],
        [j.output["summary"] for j in reversed(iterations)],
        [],
        {-1: sft.output["samples"], 0: iterations[0].output["samples"], 1: iterations[1].output["samples"]},
    )
    assert list(table.columns) == loop_eval.TABLE_COLUMNS and list(table["iteration"]) == [-1, 0, 1]
    t = table.set_index("iteration")
    d = (
        rows0.groupby(["prompt_index", "seed"])["gold"].mean()
        - sft_rows.groupby(["prompt_index", "seed"])["gold"].mean()
    )
    assert t.loc[0, "gold_gain_vs_sft"] == pytest.approx(d.mean())
    assert t.loc[0, "gold_gain_vs_sft_stderr"] == pytest.approx(d.std(ddof=1) / math.sqrt(12))
    assert t.loc[0, "gold_gain_vs_previous"] == t.loc[0, "gold_gain_vs_sft"]  # SFT precedes iteration 0
    assert (t.loc[1, "gold_gain_vs_sft"], t.loc[1, "gold_gain_vs_sft_stderr"]) == (0.0, 0.0)
    assert t.loc[1, "gold_gain_vs_previous"] == pytest.approx(-d.mean())
    assert t.loc[1, "gold_gain_vs_previous_stderr"] == pytest.approx(t.loc[0, "gold_gain_vs_sft_stderr"])
    assert t.loc[1, "gold_gain_vs_iter0"] == pytest.approx(-d.mean())
    assert (t.loc[0, "gold_gain_vs_iter0"], t.loc[0, "gold_gain_vs_iter0_stderr"]) == (0.0, 0.0)
    assert (t.loc[-1, "gold_gain_vs_sft"], t.loc[-1, "gold_gain_vs_sft_stderr"]) == (0.0, 0.0)
    # win rates by the rule judge (gold, in both orders): by hand, and the SFT adapter ties with SFT
    from workflow.data.chat import last_user_text
    from workflow.data.embedded_task import gold_prefers

    def by_hand(prompt, a, b):
        verdicts = (gold_prefers(last_user_text(prompt), a, b), gold_prefers(last_user_text(prompt), b, a))
        return 0.5 if a == b else {(0, 1): 1.0, (1, 0): 0.0}.get(verdicts, 0.5)

    wins = [by_hand(p, a, b) for p, a, b in zip(rows0["prompt"], rows0["answer"], sft_rows["answer"])]
    assert rows0["win_vs_sft"].tolist() == wins and 0 < t.loc[0, "win_rate_vs_sft"] < 1
    assert t.loc[0, "win_rate_vs_sft"] == pytest.approx(sum(wins) / len(wins))
    assert t.loc[0, "win_rate_vs_previous"] == t.loc[0, "win_rate_vs_sft"]  # SFT precedes iteration 0
    assert (t.loc[1, "win_rate_vs_sft"], t.loc[1, "win_rate_vs_sft_stderr"], t.loc[1, "ties_vs_sft"]) == (0.5, 0, 1)
    assert t.loc[1, "win_rate_vs_previous"] == pytest.approx(1 - t.loc[0, "win_rate_vs_sft"])  # the same pairs
    assert t.loc[-1, "win_rate_vs_sft"] == 0.5 and (t["judge_drops"].iloc[1:] == 0).all()
    assert t.loc[[-1], ["gold_gain_vs_previous", "gold_gain_vs_iter0", "gold_gain_vs_iter0_stderr"]].isna().all().all()
    # without samples (a table from summaries only) the paired columns are NaN
    bare = loop_eval.evaluation_table(sft.output["summary"], [iterations[0].output["summary"]], [])
    assert bare[loop_eval.PAIRED_COLUMNS].isna().all().all()


def test_benchmark_numbers_read_snakemakes_benchmark_and_name_a_damaged_one(tmp_path):
    from workflow.evaluation.loop_eval import benchmark_numbers
    from workflow.io import DataFileError

    path = tmp_path / "rloo_0.tsv"
    assert all(math.isnan(x) for x in benchmark_numbers(str(path)))  # not benchmarked (yet)
    path.write_text("s\th:m:s\tmax_rss\n12.5\t0:00:12\t812.3\n")
    assert benchmark_numbers(str(path)) == (12.5, 812.3)
    for text, message in (
        ('s\th:m:s\tmax_rss\n"12.5', "damaged Snakemake benchmark"),
        ("x\n1\n", "not a Snakemake benchmark"),
    ):
        path.write_text(text)
        with pytest.raises(DataFileError, match=f"{path}: {message}"):
            benchmark_numbers(str(path))
