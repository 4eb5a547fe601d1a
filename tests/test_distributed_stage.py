"""A real training rule's stage run through the job bridge with 2 CPU processes (gloo).

This is the launch path a rule takes with ``resources.gpu > 1`` on a cluster (one process per GPU)
or ``resources.cpu_processes > 1`` here. ZOPrO (zorloo, iteration 1) must keep the LoRA parameters
identical on every process after every step: each process sees different prompts, so the two
would drift apart unless the projected gradient is averaged across processes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from smk import pythonpath
from test_policy import CFG

from workflow import job as jobmod
from workflow.models.snapshots import read_index
from workflow.train.resume import complete_checkpoints


def _snapshots(folder):
    index = read_index(folder)
    return list(index["step"]), [load_file(str(os.path.join(folder, f))) for f in index["file"]]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def _policy_job(tmp_path, tiny_base, adapters, embedded_parquet, method="zorloo", **loop) -> jobmod.Job:
    """The iteration-1 policy job of ``method`` (rule ``train_policy``) with 2 CPU processes."""
    config = copy.deepcopy(CFG)
    config["snapshots"] = {"every": 0.25}
    config["policy"]["checkpoint_every"] = 0.25  # both processes checkpoint into one shared folder
    config["loop"].update(loop)
    out = tmp_path / "results" / method / "iter_1" / "policy"
    outputs = {
        "adapter": str(out / "adapter"),
        "snapshots": str(out / "snapshots"),
        "metrics": str(out / "metrics.csv"),
        "samples": str(out / "samples.parquet"),
    }
    return jobmod.Job(
        input={
            "policy_prev": adapters["sft2"],
            "sft": adapters["sft"],
            "reward": adapters["reward1"],
            "policy_prev2": adapters["sft"],
            "reward_prev": adapters["reward"],
            "train": embedded_parquet["train"],
        },
        output=outputs,
        params={"base": tiny_base, "checkpoints": str(out / "checkpoints")},
        config=config,
        wildcards={"method": method, "i": "1"},
        threads=1,
        resources={"processes": 2},  # as rules/common.smk gives a training rule (cpu_processes 2)
    )


def _assert_ranks_identical(outputs, scratch) -> list[dict]:
    """Rank 0's and rank 1's snapshots hold the same steps and tensors; returns rank 0's."""
    steps0, snaps0 = _snapshots(outputs["snapshots"])
    steps1, snaps1 = _snapshots(jobmod.rank_outputs(outputs, 1, str(scratch))["snapshots"])
    assert steps0 == steps1 and len(steps0) >= 3
    for a, b in zip(snaps0, snaps1):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)  # identical on both processes, every snapshot
    return snaps0


def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", pythonpath(os.getcwd(), os.path.dirname(__file__)))
    scratch = tmp_path / "scratch"
    monkeypatch.setenv("ZOPRO_RANK_SCRATCH", str(scratch))
    return scratch


def _assert_every_process_rollouts(job) -> None:
    """``samples.parquet`` holds the rollouts of both processes: each scored its own share of every
    batch, so rank 0's alone would be half of them (``policy.rloo_k`` answers per prompt)."""
    samples = pd.read_parquet(job.output["samples"])
    summary = pd.read_csv(job.output["metrics"]).iloc[-1]
    per_prompt = samples.groupby(samples["prompt"].map(lambda p: p[-1]["content"])).size()
    assert len(per_prompt) == summary["prompts"]  # every prompt, both processes' shares
    assert len(samples) % (summary["prompts"] * job.config["policy"]["rloo_k"]) == 0
    assert summary["sample_reward_mean"] == pytest.approx(samples["score"].mean())


@pytest.mark.slow
@pytest.mark.parametrize("method, metric", [("zorloo", "zo/g_abs"), ("zorloo_reference", "zo/g")])
def test_zorloo_stage_in_two_processes_keeps_parameters_identical(
    method, metric, tiny_base, adapters, embedded_parquet, tmp_path, monkeypatch
):
    """Both ZOPrO variants (guarded: the momentum step and the guard's decisions too) keep the two
    processes' parameters identical."""
    scratch = _env(monkeypatch, tmp_path)
    job = _policy_job(tmp_path, tiny_base, adapters, embedded_parquet, method=method)
    jobmod.run_job(job, "workflow.train.policy:run")

    snaps0 = _assert_ranks_identical(job.output, scratch)
    assert any(not torch.equal(snaps0[0][k], snaps0[-1][k]) for k in snaps0[0])  # and training moved them
    assert not os.path.exists(job.params["checkpoints"])  # removed by rank 0 once every process was done
    metrics = pd.read_csv(job.output["metrics"])
    assert metric in metrics.columns and metrics[metric].notna().any()
    _assert_every_process_rollouts(job)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rloo", "dpo", "ppo"])
def test_first_order_stage_in_two_processes_stays_in_sync_and_keeps_every_rollout(
    method, tiny_base, adapters, embedded_parquet, tmp_path, monkeypatch
):
    """The first-order methods train in 2 processes and keep them in sync (trl 1.12's PPO reads the
    policy through the DistributedDataParallel wrapper: policy_trainers.build_ppo); PPO, whose trl
    trainer keeps no rollouts, samples each process's share of the prompts after training."""
    scratch = _env(monkeypatch, tmp_path)
    job = _policy_job(tmp_path, tiny_base, adapters, embedded_parquet, method=method)
    jobmod.run_job(job, "workflow.train.policy:run")
    snaps0 = _assert_ranks_identical(job.output, scratch)
    assert any(not torch.equal(snaps0[0][k], snaps0[-1][k]) for k in snaps0[0])
    _assert_every_process_rollouts(job)
    if method == "ppo":
        samples = pd.read_parquet(job.output["samples"])
        assert len(samples) == pd.read_csv(job.output["metrics"]).iloc[-1]["prompts"] * CFG["policy"]["rloo_k"]


@pytest.mark.slow
def test_killed_two_process_stage_resumes_on_both_processes(
    tiny_base, adapters, embedded_parquet, tmp_path, monkeypatch
):
    """SIGKILL the launcher and its workers after a checkpoint (a preempted cluster job), then rerun."""
    scratch = _env(monkeypatch, tmp_path)
    job = _policy_job(tmp_path, tiny_base, adapters, embedded_parquet, iteration_fraction=1.0)  # 16 steps
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps(dataclasses.asdict(job)))
    code = (
        "import json, sys; from workflow import job; "
        "job.run_job(job.Job(**json.load(open(sys.argv[1]))), 'workflow.train.policy:run')"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(spec)],
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    trainer_dir = os.path.join(job.params["checkpoints"], "trainer")
    deadline = time.time() + 300
    # a complete checkpoint: its trainer_state.json written whole (a kill while the Trainer writes it
    # leaves an incomplete one, which the rerun deletes and does not resume from)
    while not complete_checkpoints(trainer_dir) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the stage ended before its first checkpoint"
    # a hard kill, as of a preempted job: no process gets to clean up
    tree = _process_tree(proc.pid)
    assert len(tree) >= 4  # job, launcher, 2 workers
    os.killpg(proc.pid, signal.SIGKILL)  # job and launcher; the workers live in sessions of their own
    proc.wait()
    deadline = time.time() + 30
    while any(_alive(pid) for pid in tree) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in tree), "a worker outlived its killed launcher"
    assert not os.path.exists(job.output["adapter"])
    # each process kept its own snapshots (rank 0 at the top, rank 1 under rank1/)
    for own in ("", "rank1"):
        assert os.path.exists(os.path.join(job.params["checkpoints"], own, "snapshots", "index.csv"))

    jobmod.run_job(job, "workflow.train.policy:run")
    summary = pd.read_csv(job.output["metrics"]).iloc[-1]
    assert summary["resumed_from_step"] >= 4 and summary["steps"] == 16
    _assert_ranks_identical(job.output, scratch)
