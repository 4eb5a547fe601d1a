"""What reruns when (README, "Rerun semantics"): after a finished tiny run, a change to a stage's
settings or code plans exactly that stage and its downstream, a change nobody reads plans nothing.

The workflow runs from a copy of the repository, so that the test can edit a module of it. Every
change is an overlay file after the run's config (``--configfile tiny.yaml overlay.yaml``), the
documented way to override nested keys.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from smk import REPO, snakemake
from test_loop_workflow import ran_jobs, tiny_config

pytestmark = pytest.mark.slow  # end-to-end runs

TARGETS = ["results/zorloo/evaluation.csv", "results/zorloo/plots"]
COPIED = ["Snakefile", "config.yaml", "rules", "scripts", "workflow", "profiles", "envs", "report"]


def _job(rule: str, i: int | None = None, wildcards: str = "", method: str = "zorloo") -> tuple[str, str]:
    return rule, f"method={method}, i={i}" if i is not None else wildcards


SFT_EVAL = _job("evaluate_policy")
TABLE = _job("evaluation_table", wildcards="method=zorloo")
PLOTS = _job("plot_trajectories", wildcards="method=zorloo")
POLICY_1 = {_job("train_policy", 1), _job("evaluate_iteration", 1), TABLE, PLOTS}
# zorloo's iteration 0 (first-order RLOO) and reward model 1 are rloo's jobs (rules/common.smk, chain_owner)
SHARED_PAIRS = {_job("collect_pairs", 0, method="rloo"), _job("refine_reward", 1, method="rloo")}
LOOP = POLICY_1 | SHARED_PAIRS | {_job("train_policy", 0, method="rloo"), _job("evaluate_iteration", 0, method="rloo")}
# the judge also decides the win rates of every evaluation (evaluate_iteration)
PAIRS = SHARED_PAIRS | POLICY_1 | {_job("evaluate_iteration", 0, method="rloo")}

# overlay -> the jobs it must plan (the stage it configures and everything downstream of it)
CHANGES = {
    "sft.learning_rate": ({"sft": {"learning_rate": 2e-3}}, {_job("sft"), SFT_EVAL} | LOOP),
    "lora.r": ({"lora": {"r": 2}}, {_job("sft"), _job("reward_initial"), SFT_EVAL} | LOOP),
    "reward.learning_rate": ({"reward": {"learning_rate": 1e-3}}, {_job("reward_initial"), SFT_EVAL} | LOOP),
    "reward.refine_learning_rate": (
        {"reward": {"refine_learning_rate": 1e-4}},
        {_job("refine_reward", 1, method="rloo")} | POLICY_1,
    ),
    "policy.kl_coef": ({"policy": {"kl_coef": 0.07}}, LOOP),
    "zopro.eps": ({"zopro": {"eps": 1e-2}}, POLICY_1),
    "judge.max_drop_rate": ({"judge": {"max_drop_rate": 0.4}}, PAIRS),
    "evaluation.temperature": (
        {"evaluation": {"temperature": 0.5}},
        {SFT_EVAL, _job("evaluate_iteration", 0, method="rloo"), _job("evaluate_iteration", 1), TABLE},
    ),
    "plots.extrapolate": ({"plots": {"extrapolate": 3}}, {PLOTS}),
    "loop.iterations": (
        {"loop": {"iterations": 3}},
        {
            _job("train_policy", 2),
            _job("collect_pairs", 1),
            _job("refine_reward", 2),
            _job("evaluate_iteration", 2),
            TABLE,
            PLOTS,
        },
    ),
    "loop.methods": ({"loop": {"methods": ["zorloo", "rloo"]}}, set()),  # read by `all` and compare only
    "resources.train_mem_mb": ({"resources": {"train_mem_mb": 3000}}, set()),
    # each process trains on batches of its own: the count changes every training stage (TRAIN_PROCESSES)
    "resources.cpu_processes": (
        {"resources": {"cpu_processes": 2}},
        {_job("sft"), _job("reward_initial"), SFT_EVAL} | LOOP,
    ),
    "cache_dir": ({"cache_dir": ".cache/elsewhere"}, set()),
    "tracking.report_to": ({"tracking": {"report_to": "tensorboard"}}, set()),  # a runtime key (workflow/job.py)
}


@pytest.fixture(scope="module")
def finished_run(tiny_base, tmp_path_factory):
    """``(snakefile, workdir, config)`` of a finished tiny zorloo run (2 iterations) of a repository copy."""
    root = tmp_path_factory.mktemp("reruns")
    repo = root / "repo"
    for name in COPIED:
        src, dst = REPO / name, repo / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            repo.mkdir(exist_ok=True)
            shutil.copy2(src, dst)
    workdir = root / "run"
    workdir.mkdir()
    config = tiny_config(tiny_base, loop={"methods": ["zorloo"]}, plots={"projections": ["pca"]})
    cfg = workdir / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(config))
    result = snakemake(
        workdir, *TARGETS, "--cores", "2", "--max-threads", "1", "--configfile", str(cfg), snakefile=repo / "Snakefile"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return repo / "Snakefile", workdir, cfg


def plan(run, *args: str, overlay: dict | None = None) -> set[tuple[str, str]]:
    snakefile, workdir, cfg = run
    configs = [str(cfg)]
    if overlay is not None:
        path = workdir / "overlay.yaml"
        path.write_text(yaml.safe_dump(overlay))
        configs.append(str(path))
    result = snakemake(workdir, *TARGETS, "-n", *args, "--configfile", *configs, snakefile=snakefile)
    assert result.returncode == 0, result.stdout + result.stderr
    return ran_jobs(result.stdout + result.stderr)


def test_unchanged_config_plans_nothing(finished_run):
    assert plan(finished_run) == set()


@pytest.mark.parametrize("key", list(CHANGES))
def test_a_setting_reruns_its_stage_and_downstream_only(finished_run, key):
    overlay, expected = CHANGES[key]
    assert plan(finished_run, overlay=overlay) == expected


def test_summary_names_the_outputs_whose_settings_changed(finished_run):
    snakefile, workdir, cfg = finished_run
    overlay = workdir / "plots_overlay.yaml"
    overlay.write_text(yaml.safe_dump({"plots": {"extrapolate": 3}}))
    result = snakemake(workdir, *TARGETS, "--summary", "--configfile", str(cfg), str(overlay), snakefile=snakefile)
    assert result.returncode == 0, result.stdout + result.stderr
    changed = [line.split("\t")[0] for line in result.stdout.splitlines() if "params changed" in line]
    assert changed == ["results/zorloo/plots"], result.stdout


def test_a_code_change_reruns_the_stages_that_run_it(finished_run):
    module = finished_run[0].parent / "workflow" / "judges" / "pairwise.py"  # run by collect_pairs and refine_reward
    original = module.read_text()
    try:
        module.write_text(original + "\n_EDITED = True\n")
        assert plan(finished_run) == PAIRS
        module.write_text(original + "\n# a comment only\n")
        assert plan(finished_run) == set()
    finally:
        module.write_text(original)
    assert plan(finished_run) == set()


def test_forcerun_of_an_output_reruns_it_and_downstream(finished_run):
    assert (
        plan(finished_run, "--forcerun", "results/rloo/iter_1/reward/metrics.csv")
        == {_job("refine_reward", 1, method="rloo")} | POLICY_1
    )


def test_deleted_output_reruns_when_named(finished_run):
    snakefile, workdir, cfg = finished_run
    shutil.rmtree(workdir / "results/zorloo/iter_1/policy")
    assert plan(finished_run) == set()  # a missing intermediate whose consumers are up to date: not needed
    result = snakemake(
        workdir,
        "results/zorloo/iter_1/policy/metrics.csv",
        *TARGETS,
        "--cores",
        "2",
        "--max-threads",
        "1",
        "--configfile",
        str(cfg),
        snakefile=snakefile,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert ran_jobs(result.stdout + result.stderr) == POLICY_1
    assert plan(finished_run) == set()


def test_stale_lock_after_kill_9_then_unlock_and_the_same_command(tmp_path):
    """kill -9 leaves Snakemake's lock behind: the same command refuses to start until
    ``snakemake --unlock`` (same arguments); then it redoes the killed job."""
    cfg = tmp_path / "tiny.yaml"
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["embedded"] = {"train_rows": 64, "test_rows": 16}
    cfg.write_text(yaml.safe_dump(config))
    args = ["results/base", "--cores", "1", "--configfile", str(cfg)]
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    log = tmp_path / "logs/base_model/base_model.log"
    deadline = time.time() + 300
    while not log.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the workflow ended before the base model job started"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert list((tmp_path / ".snakemake/locks").iterdir()), "no stale lock to test"

    locked = snakemake(tmp_path, *args)
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    assert snakemake(tmp_path, *args, "--unlock").returncode == 0
    result = snakemake(tmp_path, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("base_model", "") in ran_jobs(result.stdout + result.stderr)
    assert (tmp_path / "results/base/config.json").exists()
