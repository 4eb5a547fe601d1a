"""The loop as Snakemake runs it, on tiny sizes: run-through, interruption and resume, targeted reruns,
and one iteration on a real HH-RLHF slice.

The tiny base of the ``tiny_base`` fixture is passed as ``model.name`` (a local path), so no base
model is built by the workflow. The HH-RLHF test uses ``judge.kind: reward_model`` with a tiny
sequence-classification model saved from that base (the ``rule`` judge only knows the embedded task).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from smk import REPO, SHARED_DATA, snakemake

from workflow.train.resume import complete_checkpoints

HH_SAMPLE = SHARED_DATA / "hh-rlhf" / "harmless-base-sample.jsonl.gz"


def tiny_config(base: str, **sections) -> dict:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config.update(
        cache_dir=".cache/hf",
        embedded={"train_rows": 64, "test_rows": 16},
        model={"name": base, "max_length": 128, "generation_length": 8},
        lora={"r": 4, "alpha": None, "dropout": 0.0, "target_modules": "all-linear"},
        snapshots={"every": 0.5},
    )
    config["sft"].update(epochs=1, batch_size=16)
    config["reward"].update(epochs=1, batch_size=16, refine_epochs=1)
    config["loop"].update(
        methods=["rloo"], iterations=2, intraepoch=True, iteration_fraction=0.25, uncertain_fraction=0.5
    )
    config["policy"].update(batch_size=8, rloo_k=2, epochs=1)
    config["evaluation"].update(n_prompts=8, samples_per_prompt=1)
    config["judge"].update(kind="rule", max_drop_rate=0.5, batch_size=8)
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


def write_config(workdir: Path, config: dict) -> str:
    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def ran_jobs(output: str) -> set[tuple[str, str]]:
    """``(rule, wildcards)`` of every job Snakemake started, parsed from its output."""
    jobs = set()
    for block in re.split(r"\n(?=\[[^\]]+\]\n)|\n(?=(?:local)?rule \w+:)", output):
        match = re.search(r"^(?:local)?rule (\w+):", block, flags=re.M)
        if not match:
            continue
        wildcards = re.search(r"^\s+wildcards: (.*)$", block, flags=re.M)
        jobs.add((match.group(1), wildcards.group(1).strip() if wildcards else ""))
    return jobs


def planned_jobs(workdir: Path, *args: str) -> set[tuple[str, str]]:
    result = snakemake(workdir, "-n", "--cores", "2", *args)  # args end with --configfile
    assert result.returncode == 0, result.stdout + result.stderr
    return ran_jobs(result.stdout + result.stderr)


LOOP_RULES = {"train_policy", "collect_pairs", "refine_reward", "evaluate_iteration", "evaluation_table"}


@pytest.mark.slow
def test_loop_runs_resumes_after_interrupt_and_reruns_only_downstream(tmp_path, tiny_base):
    workdir = tmp_path / "run"
    workdir.mkdir()
    # 8 epochs: 32 steps per policy stage (about 2 s on a quiet machine), so that the interrupt lands
    # well inside policy 1 however fast the machine is (a checkpoint every 4 steps)
    cfg = write_config(workdir, tiny_config(tiny_base, policy={"epochs": 8}))
    target = "results/rloo/evaluation.csv"
    args = [
        target,
        "--cores",
        "2",
        "--max-threads",
        "1",
        "--configfile",
        cfg,
    ]  # --configfile takes several values: last
    full_plan = planned_jobs(workdir, target, "--configfile", cfg)
    loop_plan = {j for j in full_plan if j[0] in LOOP_RULES}
    assert ("train_policy", "method=rloo, i=1") in loop_plan
    assert ("refine_reward", "method=rloo, i=1") in loop_plan
    assert ("collect_pairs", "method=rloo, i=0") in loop_plan

    # (b) interrupt while policy 1 trains, right after its first trainer checkpoint
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # SIGINT must act as Ctrl-C even when this test runs in the background, where the shell starts
    # it with SIGINT ignored and Python would keep ignoring it
    proc = subprocess.Popen(
        cmd,
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    policy1 = workdir / "results/rloo/iter_1/policy"
    deadline = time.time() + 300
    # a complete checkpoint (its trainer_state.json written whole): a kill while the Trainer writes it
    # leaves an incomplete one, which the rerun deletes and does not resume from
    while not complete_checkpoints(policy1 / "checkpoints/trainer") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the workflow ended before policy 1 saved a checkpoint:\n" + proc.communicate()[0]
    os.killpg(proc.pid, signal.SIGINT)
    first_out = proc.communicate(timeout=120)[0]
    first = ran_jobs(first_out)
    assert ("train_policy", "method=rloo, i=1") in first
    assert not (policy1 / "adapter").exists() and not (policy1 / "metrics.csv").exists(), "partial output left"
    finished = {j for j in full_plan if j not in planned_jobs(workdir, target, "--configfile", cfg)}
    assert ("refine_reward", "method=rloo, i=1") in finished  # done before the interrupt: not redone

    # rerun: exactly the unfinished jobs run, and the loop runs through (a)
    result = snakemake(workdir, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    second = ran_jobs(result.stdout + result.stderr)
    assert second == full_plan - finished
    assert ("train_policy", "method=rloo, i=1") in second and not second & finished
    # policy 1 went on from its checkpoint instead of starting again, and cleaned up after itself
    assert re.search(
        r"resuming from \S+checkpoint-\d+ \(step [1-9]", (workdir / "logs/train_policy/rloo_1.log").read_text()
    )
    assert pd.read_csv(policy1 / "metrics.csv")["resumed_from_step"].iloc[-1] >= 1
    assert not (policy1 / "checkpoints").exists()
    table = pd.read_csv(workdir / target)
    assert list(table["iteration"]) == [-1, 0, 1]
    assert table[["gold_mean", "reward_mean", "kl"]].notna().all().all()
    assert table["wall_time_s"].iloc[1:].notna().all() and table["peak_mem_mb"].iloc[1:].gt(0).all()
    pairs = pd.read_parquet(workdir / "results/rloo/iter_0/pairs.parquet")
    assert len(pairs) >= 1 and {"prompt", "chosen", "rejected", "judge_drop_rate"} <= set(pairs.columns)
    assert planned_jobs(workdir, target, "--configfile", cfg) == set()  # nothing left to do

    # (c) delete reward model 1 and ask for it again: exactly it and what depends on it rerun.
    # (Snakemake treats a deleted intermediate whose consumers are up to date like a temp() file:
    # plain `snakemake target` does nothing until the deleted file itself is requested.)
    deleted = "results/rloo/iter_1/reward/adapter"
    shutil.rmtree(workdir / deleted)
    expected = {
        ("refine_reward", "method=rloo, i=1"),
        ("train_policy", "method=rloo, i=1"),
        ("evaluate_iteration", "method=rloo, i=1"),
        ("evaluation_table", "method=rloo"),
    }
    assert planned_jobs(workdir, deleted, target, "--configfile", cfg) == expected
    untouched = (workdir / "results/rloo/iter_0/policy/adapter/adapter_model.safetensors").stat().st_mtime_ns
    result = snakemake(workdir, deleted, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ran_jobs(result.stdout + result.stderr) == expected
    assert (workdir / deleted / "adapter_model.safetensors").exists()
    assert (workdir / "results/rloo/iter_0/policy/adapter/adapter_model.safetensors").stat().st_mtime_ns == untouched


@pytest.fixture(scope="module")
def tiny_judge_model(tiny_base, tmp_path_factory):
    """A tiny 1-label sequence classifier (random head on the tiny base) to act as the gold judge."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("judge") / "rm"
    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.mark.slow
@pytest.mark.skipif(not HH_SAMPLE.exists(), reason=f"HH-RLHF sample not found at {HH_SAMPLE}")
def test_one_iteration_on_a_real_hh_rlhf_slice(tmp_path, tiny_base, tiny_judge_model):
    config = tiny_config(
        tiny_base,
        dataset={
            "name": "hh-rlhf",
            "source": None,
            "files": {"train": str(HH_SAMPLE), "test": str(HH_SAMPLE)},
            "hub_config": None,
            "max_rows": 48,  # 25 of them leave room for an answer in 256 tokens of the tiny tokenizer
        },
        model={"name": tiny_base, "max_length": 256, "generation_length": 8},
        judge={"kind": "reward_model", "model": tiny_judge_model, "max_drop_rate": 0.5, "batch_size": 8},
    )
    config["loop"]["iteration_fraction"] = 0.5
    cfg = write_config(tmp_path, config)
    result = snakemake(tmp_path, "results/compare/plots", "--cores", "2", "--max-threads", "1", "--configfile", cfg)
    assert result.returncode == 0, result.stdout + result.stderr
    # no gold function on HH-RLHF: the judge's win rates against SFT, with their errors, measure the methods
    table = pd.read_csv(tmp_path / "results/rloo/evaluation.csv").set_index("iteration")
    assert table["gold_mean"].isna().all()
    for i in (0, 1):
        assert 0 <= table.loc[i, "win_rate_vs_sft"] <= 1 and table.loc[i, "win_rate_vs_sft_stderr"] > 0
        assert 0 <= table.loc[i, "win_rate_vs_previous"] <= 1 and table.loc[i, "judge_drops"] == 0
    summary = pd.read_csv(tmp_path / "results/compare/plots/summary.csv")
    assert summary["win_rate_vs_sft"].notna().sum() == 3  # SFT and both iterations
    assert (tmp_path / "results/compare/plots/win_rate.png").stat().st_size > 10_000
    pairs = pd.read_parquet(tmp_path / "results/rloo/iter_0/pairs.parquet")
    assert len(pairs) >= 1 and set(pairs["judge"]) == {"reward_model"}
    assert (pairs["judge_drop_rate"] == 0).all()
    assert (tmp_path / "results/rloo/iter_1/reward/adapter/adapter_model.safetensors").exists()
    samples = pd.read_parquet(tmp_path / "results/rloo/iter_0/policy/samples.parquet")
    assert samples["score"].notna().all() and samples["prompt"].map(len).ge(1).all()
