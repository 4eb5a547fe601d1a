"""The SLURM profile (profiles/slurm) against the rules, and the sbatch calls it makes.

The sbatch test drives snakemake-executor-plugin-slurm against stub SLURM commands on PATH: ``sbatch``
records its arguments and answers a new job id, ``sacct``/``squeue`` report every submitted job
COMPLETED, ``sinfo`` offers a default partition ``cpu``, and the account lookups find nothing. The
stub ``sbatch`` also puts back the (empty) outputs that Snakemake removes before a forced job, so the
whole study plans, submits and "completes" in a few seconds without running any stage.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from smk import REPO, plan_resources, snakemake

PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
STUDY = {"loop": {"iterations": 2}, "resources": {"gpus": 1}}  # every rule of the loop, GPU jobs on


def profile() -> dict:
    return yaml.safe_load(PROFILE.read_text())


def rule_threads() -> dict[str, int]:
    """``threads:`` of every rule of ``rules/*.smk`` (1 when a rule declares none)."""
    threads = {}
    for path in sorted((REPO / "rules").glob("*.smk")):
        for block in re.split(r"\n(?=rule \w+:)", path.read_text()):
            head = re.match(r"rule (\w+):", block)
            if head:
                found = re.search(r"^\s+threads: (\d+)", block, flags=re.M)
                threads[head.group(1)] = int(found.group(1)) if found else 1
    return threads


def local_rules() -> set[str]:
    """The rules of the Snakefile's ``localrules:`` directive (run in the Snakemake process)."""
    block = re.search(r"^localrules:\n((?:\s+\w+,?\n)+)", (REPO / "Snakefile").read_text(), flags=re.M)
    return set(re.findall(r"\w+", block.group(1)))


def submitted_rules(tmp_path) -> set[str]:
    """Every rule of the workflow (``--list-rules``) that is submitted as a cluster job."""
    result = snakemake(tmp_path, "--list-rules")
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split()) - local_rules() - {"all"}


def test_every_submitted_rule_has_an_entry_and_nothing_is_left_to_edit(tmp_path):
    rules = submitted_rules(tmp_path)
    assert rules >= {"train_policy", "plot_trajectories_upto"}
    assert set(rule_threads()) >= rules | local_rules()
    entries = profile()["set-resources"]
    assert set(entries) == rules, "profiles/slurm/config.yaml set-resources must name every submitted rule"
    assert set(profile()["set-threads"]) <= rules, "set-threads names a rule that is not submitted"
    for rule, resources in entries.items():
        assert {"mem_mb", "runtime"} <= set(resources), rule
        # cpus follow the rule's threads, the GPU count is the config's resources.gpus (one place)
        assert not {"cpus_per_task", "cpus_per_gpu", "gpu", "gpus"} & set(resources), rule
    defaults = profile()["default-resources"]
    assert not {"slurm_account", "slurm_partition"} & set(defaults) and "EDIT_ME" not in PROFILE.read_text()


def test_dry_run_gives_each_method_its_resources_and_the_configs_gpu_count(tmp_path):
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    overlay = tmp_path / "study.yaml"
    overlay.write_text(yaml.safe_dump(STUDY))
    result = snakemake(
        tmp_path, "-n", "--profile", "profiles/slurm", "results/compare/plots", "--configfile", str(overlay)
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    jobs = plan_resources(out)
    assert jobs[("train_policy", "method=ppo, i=0")]["mem_mb"] == "96000"
    assert jobs[("train_policy", "method=rloo, i=0")]["mem_mb"] == "64000"
    assert jobs[("train_policy", "method=ppo, i=1")]["runtime"] == "1440"
    entries = profile()["set-resources"]
    for (rule, _), resources in jobs.items():
        if rule in entries and rule != "train_policy":
            assert resources["mem_mb"] == str(entries[rule]["mem_mb"]), rule
        if rule in {"sft", "reward_initial", "train_policy", "collect_pairs", "refine_reward", "evaluate_iteration"}:
            assert resources["gpu"] == "1", rule  # config resources.gpus


@pytest.mark.parametrize("gpus", [0, 2])
def test_only_training_rules_run_data_parallel(tmp_path, gpus):
    """``resources.gpus`` (or ``cpu_processes`` without GPUs) above 1: the training rules run in that
    many processes (workflow.job); a job that runs in one process gets at most one GPU; a study
    seed's job is one process whose nested run's jobs share its GPUs."""
    overlay = tmp_path / "parallel.yaml"
    overlay.write_text(yaml.safe_dump({"loop": {"iterations": 2}, "resources": {"gpus": gpus, "cpu_processes": 2}}))
    targets = ("results/compare/plots", "results/base_eval/evaluation_summary.csv", "results/study/summary.csv")
    result = snakemake(tmp_path, "-n", *targets, "--configfile", str(overlay))
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = plan_resources(result.stdout + result.stderr)
    expected = {
        **dict.fromkeys(("sft", "reward_initial", "train_policy", "refine_reward"), (gpus, 2)),
        **dict.fromkeys(
            ("base_model", "evaluate_policy", "evaluate_base", "collect_pairs", "evaluate_iteration"), (min(gpus, 1), 1)
        ),
        "study_seed": (gpus, 1),
    }
    assert set(expected) <= {rule for rule, _ in jobs}
    for (rule, wildcards), resources in jobs.items():
        if rule in expected:
            assert (int(resources["gpu"]), int(resources["processes"])) == expected[rule], (rule, wildcards)


SBATCH = """#!/bin/sh
cat > /dev/null
echo "$*" >> "$STUB_DIR/sbatch.log"
cp -rn "$STUB_DIR/seed/." .
wc -l < "$STUB_DIR/sbatch.log" | tr -d ' '
"""
STATUS = """#!/bin/sh
case "$*" in *JobIdRaw,State*|*%i\\|%T*) [ -f "$STUB_DIR/sbatch.log" ] && awk '{print NR "|COMPLETED"}' "$STUB_DIR/sbatch.log";; esac
exit 0
"""
STUBS = {
    "sbatch": SBATCH,
    "sacct": STATUS,
    "squeue": STATUS,
    "sinfo": "#!/bin/sh\necho PARTITION\necho 'cpu*'\necho gpu\n",
    "scontrol": "#!/bin/sh\nexit 0\n",
    "sacctmgr": "#!/bin/sh\nexit 0\n",
    "sshare": "#!/bin/sh\nexit 0\n",
}


def _stub_cluster(root: Path) -> dict[str, str]:
    """Stub SLURM commands in ``root/bin``; the environment that puts them first on PATH."""
    (root / "bin").mkdir()
    for name, text in STUBS.items():
        (root / "bin" / name).write_text(text)
        (root / "bin" / name).chmod(0o755)
    return {"PATH": f"{root / 'bin'}{os.pathsep}{os.environ['PATH']}", "STUB_DIR": str(root)}


def _seed_outputs(out: str, seed: Path) -> None:
    """Empty stand-ins of every output and benchmark of a dry run's jobs under ``seed`` (folders
    for names without a suffix: adapter/, snapshots/, plots/, results/base)."""
    for line in re.findall(r"^\s+(?:output|benchmark): (.+)$", out, flags=re.M):
        for name in line.split(", "):
            path = seed / name
            if "." in path.name:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            else:
                path.mkdir(parents=True, exist_ok=True)


def _calls(log: Path) -> list[tuple[str, str]]:
    """``(rule, sbatch arguments)`` of every recorded call (the rule is in ``--comment rule_<name>``)."""
    rules = sorted(rule_threads(), key=len, reverse=True)
    calls = []
    for line in log.read_text().splitlines():
        comment = re.search(r"--comment (\S+)", line).group(1)
        calls.append((next(r for r in rules if comment.startswith(f"rule_{r}")), line))
    return calls


@pytest.mark.slow
def test_sbatch_calls_of_every_rule(tmp_path):
    """The whole study submitted to a stub cluster: one call per job, cpus = the rule's threads or the profile's set-threads,
    the profile's memory and wall time (per method for train_policy, with the profile's commented
    gpu_model / constraint examples switched on), the config's GPU count, requeue, and the
    partition and account left to the plugin (the default partition, no account found)."""
    work = tmp_path / "wd"
    work.mkdir()
    shutil.copytree(REPO / "profiles", work / "profiles")
    config = work / "profiles" / "slurm" / "config.yaml"
    config.write_text(re.sub(r"# (gpu_model|constraint): ", r"\1: ", config.read_text()))
    overlay = work / "study.yaml"
    overlay.write_text(yaml.safe_dump(STUDY))
    targets = [f"results/{m}/plots" for m in ("ppo", "rloo", "zorloo")] + [
        "results/rloo/plots_upto_1",
        "results/base_eval/evaluation_summary.csv",
        "results/sft/evaluation_summary.csv",
        *(f"results/{m}/iter_{i}/evaluation_summary.csv" for m in ("ppo", "rloo") for i in (0, 1)),
        "results/zorloo/iter_1/evaluation_summary.csv",
        "results/study/seed_1/results/rloo/evaluation.csv",
    ]  # a study seed: one nested run in one job
    plan = snakemake(work, "-n", "--forceall", *targets, "--configfile", str(overlay))
    assert plan.returncode == 0, plan.stdout + plan.stderr
    _seed_outputs(plan.stdout, tmp_path / "seed")
    shutil.copytree(tmp_path / "seed" / "results", work / "results")
    rules = submitted_rules(tmp_path)
    result = snakemake(
        work,
        "--profile",
        "profiles/slurm",
        "--latency-wait",
        "0",
        "--slurm-init-seconds-before-status-checks",
        "1",
        "--seconds-between-status-checks",
        "1",
        *targets,
        "--configfile",
        str(overlay),
        "--forcerun",
        *sorted(rules),
        env=_stub_cluster(tmp_path),
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    calls = _calls(tmp_path / "sbatch.log")
    planned = re.findall(r"^(?:local)?rule (\w+):", plan.stdout, flags=re.M)
    assert sorted(rule for rule, _ in calls) == sorted(r for r in planned if r in rules)
    assert {rule for rule, _ in calls} == rules, "every submitted rule ran through sbatch"
    threads, entries = {**rule_threads(), **profile()["set-threads"]}, profile()["set-resources"]
    for rule, call in calls:
        assert f"--cpus-per-task={threads[rule]}" in call, (rule, call)
        assert " --requeue" in call and " -p cpu " in call and " -A " not in call, call
        ppo = "wildcards_ppo" in call
        mem, runtime = (
            (96000, 1440)
            if rule == "train_policy" and ppo
            else (64000, 720)
            if rule == "train_policy"
            else (entries[rule]["mem_mb"], entries[rule]["runtime"])
        )
        assert f"--mem {mem} " in call and f"-t {runtime} " in call, (rule, call)
        gpus = re.findall(r"--gpus=(\S+)", call)
        if rule.startswith("plot_"):
            assert gpus == [], call
        elif rule == "train_policy":
            assert gpus == (["a100_80gb:1"] if ppo else ["1"]), call
        elif rule == "collect_pairs":
            assert gpus == ["a100:1"] and " -C a100|h100 " in call, call  # the stub records unquoted arguments
        else:
            assert gpus == ["1"], (rule, call)
