"""A real training rule's stage run through the job bridge with 2 CPU processes (gloo).

This is the launch path a rule takes with ``resources.gpu > 1`` on a cluster (one process per GPU)
or ``resources.cpu_processes > 1`` here. ZOPrO (zorloo, iteration 1) must keep the LoRA parameters
identical on every process after every step: each process sees different prompts, so the two
would drift apart unless the projected gradient is averaged across processes.
"""
from __future__ import annotations

import copy
import os

import pandas as pd
import torch
from safetensors.torch import load_file

from test_policy import CFG, adapters  # noqa: F401  (module fixture reused)
from workflow import job as jobmod
from workflow.snapshots import read_index


def _snapshots(folder):
    index = read_index(folder)
    return list(index["step"]), [load_file(str(os.path.join(folder, f))) for f in index["file"]]


def test_zorloo_stage_in_two_processes_keeps_parameters_identical(tiny_base, adapters, embedded_parquet,  # noqa: F811
                                                                    tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([os.getcwd(), str(os.path.dirname(__file__))]))
    scratch = tmp_path / "scratch"
    monkeypatch.setenv("ZOPRO_RANK_SCRATCH", str(scratch))
    config = copy.deepcopy(CFG)
    config["snapshots"] = {"every": 0.25}
    config["resources"] = {"cpu_processes": 2}
    out = tmp_path / "results" / "zorloo" / "iter_1" / "policy"
    outputs = {"adapter": str(out / "adapter"), "snapshots": str(out / "snapshots"),
               "metrics": str(out / "metrics.csv"), "samples": str(out / "samples.parquet")}
    job = jobmod.Job(
        input={"prev_policy": adapters["sft2"], "sft": adapters["sft"], "reward": adapters["reward1"],
               "policy_prev2": adapters["sft"], "reward_prev": adapters["reward"],
               "train": embedded_parquet["train"]},
        output=outputs, params={"base": tiny_base}, config=config,
        wildcards={"method": "zorloo", "i": "1"}, threads=1)
    jobmod.run_job(job, "workflow.policy:run")

    steps0, snaps0 = _snapshots(outputs["snapshots"])
    rank1 = jobmod.rank_outputs(outputs, 1, str(scratch))
    steps1, snaps1 = _snapshots(rank1["snapshots"])
    assert steps0 == steps1 and len(steps0) >= 3
    for a, b in zip(snaps0, snaps1):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)          # identical on both processes, every snapshot
    assert any(not torch.equal(snaps0[0][k], snaps0[-1][k]) for k in snaps0[0])   # and training moved them
    metrics = pd.read_csv(outputs["metrics"])
    assert "zo/g" in metrics.columns and metrics["zo/g"].notna().any()
