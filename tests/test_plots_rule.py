"""The plot stage on a tiny synthetic 2-iteration run, its validation, the rules and compare."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from smk import pythonpath
from synthetic import write_stage

from workflow.analysis import plots
from workflow.analysis import trajectories as tj
from workflow.evaluation import compare
from workflow.io import DataFileError
from workflow.job import Job

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "layers.0.self_attn.q_proj.lora_A.weight": (2, 8),
    "layers.0.self_attn.q_proj.lora_B.weight": (8, 2),
    "layers.1.mlp.up_proj.lora_A.weight": (2, 8),
    "layers.1.mlp.up_proj.lora_B.weight": (12, 2),
}


def fake_run(root, method="ppo", iterations=2, n=6, seed=0):
    """results/ layout: results/reward/iter_0, results/{method}/iter_i/{policy,reward}."""
    rng = np.random.default_rng(seed)
    pol, rew = [], []
    p = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    r = dict(p)
    for i in range(iterations):
        ps, rs = [p], [dict(r, **{"score.weight": np.ones((1, 8))})]
        for _ in range(n - 1):
            ps.append({k: v + 0.1 * rng.normal(size=v.shape) for k, v in ps[-1].items()})
            rs.append({k: v + 0.1 * rng.normal(size=v.shape) for k, v in rs[-1].items()})
        p, r = ps[-1], {k: v for k, v in rs[-1].items() if k != "score.weight"}
        rdir = root / ("results/reward/iter_0" if i == 0 else f"results/{method}/iter_{i}/reward")
        pol.append(str(write_stage(root / f"results/{method}/iter_{i}/policy", ps, range(0, 4 * n, 4))))
        rew.append(str(write_stage(rdir, rs, range(0, 2 * n, 2))))
    return pol, rew


def job(pol, rew, out, **plots_cfg):
    cfg = {
        "seed": 0,
        "plots": {"projections": ["pca", "tsne"], "reduce_dim": 10, "extrapolate": 3, **plots_cfg},
        "loop": {"keep_rm_alpha": 0.5},
    }
    return Job(
        input={"policy": pol, "reward": rew},
        output={"plots": str(out)},
        params={},
        config=cfg,
        wildcards={"method": "ppo"},
    )


def test_plot_stage_writes_figures_html_and_metrics(tmp_path):
    pol, rew = fake_run(tmp_path)
    out = tmp_path / "results/ppo/plots"
    plots.run(job(pol, rew, out, projections=["tsne"], keep_rm=True, obi_wan=True))
    names = {p.name for p in out.iterdir()}
    for m in ("tsne",):
        assert {f"{m}_2d.png", f"{m}_3d.png", f"{m}_3d.html"} <= names
    assert {
        "interplay.png",
        "metrics.csv",
        "metrics.parquet",
        "metrics_iterations.csv",
        "metrics_iterations.parquet",
        "coordinates.parquet",
        "summary.json",
    } <= names
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "tsne_3d.html").read_text()
    assert not re.search(r"<script[^>]+src=[\"']?(https?:)?//", html, re.I)
    assert len(html) > 1_000_000 and "Plotly" in html  # plotly.js embedded
    assert "keep_rm replay" in html  # the reward trajectory shown is the keep_rm replay
    steps = pd.read_parquet(out / "metrics.parquet")
    assert list(steps["iteration"].unique()) == [0, 1] and len(steps) == 10
    assert steps["angle_deg"].between(0, 180).all()
    assert steps["obi_wan_cosine"].between(-1, 1).any()  # reward step t against policy step t + 1
    iters = pd.read_csv(out / "metrics_iterations.csv")
    assert {"distance_correlation", "procrustes_disparity", "pearson"} <= set(iters.columns)
    assert list(iters["scope"]) == ["iteration", "iteration", "trajectory"]


@pytest.mark.parametrize("damage", ["missing", "partial"])
def test_refuses_missing_or_partial_iteration(tmp_path, damage):
    pol, rew = fake_run(tmp_path)
    if damage == "missing":
        shutil.rmtree(Path(rew[1]))
        expected = r"reward iteration 1 .*snapshots folder is missing"
    else:
        (Path(pol[1]) / "step_0000008.safetensors").unlink()
        expected = r"policy iteration 1 .*partial snapshots, 1 of 6 .*step_0000008"
    out = tmp_path / "out"
    with pytest.raises(tj.IncompleteTrajectoryError, match=expected):
        plots.run(job(pol, rew, out))
    assert not out.exists()


def test_compare_methods_reads_defensively(tmp_path):
    pol, rew = fake_run(tmp_path)
    plots.run(job(pol, rew, tmp_path / "results/ppo/plots", projections=["pca"]))
    ev = pd.DataFrame(
        {
            "iteration": [-1, 0, 1],
            "gold_mean": [0.1, 0.2, 0.3],
            "gold_stderr": [0.01] * 3,
            "reward_mean": 0.0,
            "kl": 0.0,
            "wall_time_s": 1.0,
            "peak_mem_mb": 1.0,
        }
    )
    ev.to_csv(tmp_path / "results/ppo/evaluation.csv", index=False)
    out = tmp_path / "results/compare/plots"
    j = Job(
        input={
            "evaluation": [str(tmp_path / f"results/{m}/evaluation.csv") for m in ("ppo", "dpo")],
            "plots": [str(tmp_path / f"results/{m}/plots") for m in ("ppo", "dpo")],
        },
        output={"plots": str(out)},
        params={"methods": ["ppo", "dpo"]},
        config={"loop": {"methods": ["ppo", "dpo"]}},
        wildcards={},
    )
    compare.run(j)
    assert {"gold.png", "interplay.png", "summary.csv"} <= {p.name for p in out.iterdir()}
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["method"]) == {"ppo"} and {"gold_mean", "cosine"} <= set(summary.columns)
    # a method without results is shown as missing; one with a damaged table is an error naming it
    damaged = tmp_path / "results/dpo/evaluation.csv"
    for text, message in (("iteration,kl\n0,0.1\n", "missing column.*gold_mean"), ("", "damaged table")):
        damaged.parent.mkdir(parents=True, exist_ok=True)
        damaged.write_text(text)
        with pytest.raises(DataFileError, match=f"{damaged}: {message}"):
            compare.run(j)
        assert set(pd.read_csv(out / "summary.csv")["method"]) == {"ppo"}  # the last comparison is kept


@pytest.mark.slow
def test_snakemake_rules_run_upto_and_report(tmp_path):
    fake_run(tmp_path)
    (tmp_path / "config.yaml").write_text(
        "seed: 0\ndataset: {name: embedded}\nmodel: {name: null}\n"
        "loop: {methods: [ppo], iterations: 2, keep_rm_alpha: 0.5}\n"
        "plots: {projections: [pca], reduce_dim: 8, layer: 0, obi_wan: false, keep_rm: false,"
        " max_snapshots: null, extrapolate: 0}\n"
    )
    (tmp_path / "Snakefile").write_text(
        f'configfile: "{ROOT}/config.yaml"\nconfigfile: "config.yaml"\n'  # common.smk validates the whole config
        f'include: "{ROOT}/rules/common.smk"\ninclude: "{ROOT}/rules/plots.smk"\n'
    )
    env = dict(os.environ, PYTHONPATH=pythonpath(ROOT))
    smk = [sys.executable, "-m", "snakemake", "--cores", "2", "-d", str(tmp_path), "-s", str(tmp_path / "Snakefile")]
    dry = subprocess.run(
        smk + ["-n", "results/ppo/plots", "results/ppo/plots_upto_1"], env=env, capture_output=True, text=True
    )
    assert dry.returncode == 0, dry.stderr + dry.stdout
    assert "plot_trajectories_upto" in dry.stdout and "plot_trajectories " in dry.stdout + " "
    res = subprocess.run(smk + ["results/ppo/plots_upto_1"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr + res.stdout
    out = tmp_path / "results/ppo/plots_upto_1"
    assert (out / "pca_2d.png").exists() and (out / "metrics.csv").exists()
    assert (tmp_path / "logs/plot_trajectories_upto/ppo_1.log").exists()
    rep = subprocess.run(
        smk + ["--report", str(tmp_path / "report.html"), "results/ppo/plots_upto_1"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert rep.returncode == 0, rep.stderr + rep.stdout
    assert (tmp_path / "report.html").stat().st_size > 10_000
