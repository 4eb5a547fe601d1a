"""The workflow as a user drives it: lint, dry runs, config validation, the SLURM profile."""

from __future__ import annotations

import re
import shutil

import pytest
import yaml
from smk import REPO, plan_resources, snakemake


def test_lint_is_clean(tmp_path):
    result = snakemake(tmp_path, "--lint")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr


@pytest.mark.parametrize("target", ["all", "results/zorloo/plots", "results/compare/plots"])
def test_dry_run_of_main_targets(tmp_path, target):
    result = snakemake(tmp_path, "-n", "--cores", "2", target)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Job stats" in result.stdout


def test_schema_violation_stops_before_any_job_and_names_the_key(tmp_path):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["loop"]["uncertain_fraction"] = 1.5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "results/data/embedded/train.parquet", "--cores", "1", "--configfile", str(bad))
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "uncertain_fraction" in out and "1.5" in out
    assert not (tmp_path / "results").exists()


def test_unknown_config_key_is_rejected(tmp_path):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["zopro"]["epsilon"] = 0.1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "-n", "--configfile", str(bad))
    assert result.returncode != 0
    assert "epsilon" in result.stdout + result.stderr


def test_example_real_model_config_validates_and_plans(tmp_path):
    example = REPO / "config" / "examples" / "llama-3.2-1b-hh-rlhf.yaml"
    result = snakemake(tmp_path, "results/zorloo/plots", "-n", "--configfile", str(example))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "base_model" not in re.findall(r"^rule (\w+):", out, flags=re.M), "a real model must not build the tiny base"
    assert "results/data/hh-rlhf/train.parquet" in out


def test_nested_override_with_a_configfile_overlay(tmp_path):
    """README "Nested overrides": an overlay of the nested keys only, merged over config.yaml."""
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("loop:\n  iterations: 2\npolicy:\n  kl_coef: 0.1\n")
    result = snakemake(tmp_path, "results/rloo/evaluation.csv", "-n", "--configfile", str(overlay))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    policies = re.findall(r"^rule train_policy:.*?wildcards: method=rloo, i=(\d+)", out, flags=re.M | re.S)
    assert sorted(policies) == ["0", "1"]


def test_the_dataset_section_applies_to_the_configured_dataset_only(tmp_path):
    """``dataset.files`` becomes the configured dataset's extraction input (a changed file reruns it);
    another dataset's extraction reads its own default source."""
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("")
    overlay = tmp_path / "overlay.yaml"
    files = {split: str(tmp_path / f"{split}.jsonl") for split in ("train", "test")}
    overlay.write_text(yaml.safe_dump({"dataset": {"name": "hh-rlhf", "files": files}, "loop": {"iterations": 1}}))
    targets = ["results/data/hh-rlhf/test.parquet", "results/data/shp/test.parquet"]
    result = snakemake(tmp_path, "-n", "--cores", "1", *targets, "--configfile", str(overlay))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    inputs = dict(re.findall(r"^\s+input: (\S+)\n\s+output: results/data/(\S+)/test\.parquet", out, flags=re.M))
    assert inputs == {files["test"]: "hh-rlhf"}, out


@pytest.mark.parametrize(
    "name, content",
    [
        ("fixed-kl.yaml", {"policy": {"kl_target": None, "kl_coef": 0.01}}),
        ("bf16.yaml", {"precision": "bf16"}),
        ("gpu-embedded.yaml", None),
    ],
)
def test_example_overlays_plan_the_study(tmp_path, name, content):
    """README: `--configfile config/examples/fixed-kl.yaml` (no KL budget), `bf16.yaml` (the GPU
    precision path on any device) and `gpu-embedded.yaml` (the embedded study at GPU size) are
    overlays over the default study that validate and plan it."""
    overlay = REPO / "config" / "examples" / name
    if content is not None:
        assert yaml.safe_load(overlay.read_text()) == content
    result = snakemake(tmp_path, "-n", "--cores", "all", "results/compare/plots", "--configfile", str(overlay))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "train_policy" in result.stdout


def test_zopro_methods_share_rloos_first_iteration(tmp_path):
    """zorloo and zorloo_reference start from rloo's iteration 0 and reward model 1 (one job each,
    not three); their own zeroth-order iterations are separate jobs."""
    from test_loop_workflow import ran_jobs

    targets = [f"results/{m}/evaluation.csv" for m in ("rloo", "zorloo", "zorloo_reference")]
    result = snakemake(tmp_path, "-n", "--cores", "2", *targets)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = ran_jobs(result.stdout + result.stderr)
    policies = {w for rule, w in jobs if rule == "train_policy"}
    assert policies == {
        f"method={m}, i={i}" for m in ("rloo", "zorloo", "zorloo_reference") for i in range(3) if m == "rloo" or i >= 1
    }
    refined = {w for rule, w in jobs if rule == "refine_reward"}
    assert "method=rloo, i=1" in refined and "method=zorloo, i=1" not in refined
    assert "method=zorloo, i=2" in refined and "method=zorloo_reference, i=2" in refined


def test_a_zopro_methods_own_iteration_0_is_refused_with_the_shared_folder(tmp_path):
    result = snakemake(tmp_path, "-n", "--cores", "2", "results/zorloo/iter_0/policy/adapter")
    assert result.returncode != 0
    assert "results/rloo/iter_0" in result.stdout + result.stderr


def test_readme_real_model_command_plans_with_the_slurm_profile(tmp_path):
    """README "From laptop to cluster" step 4 (and the example config's header), run as a dry run from
    a copy of the project: the target must not be swallowed by ``--configfile``."""
    from smk import readme_commands

    example = "config/examples/llama-3.2-1b-hh-rlhf.yaml"
    (command,) = readme_commands(example)
    header = readme_commands(example, REPO / example)
    assert header == [command], "the example config's header must show the README's command"
    assert command.index("results/compare/plots") < command.index("--configfile")
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    shutil.copytree(REPO / "config", tmp_path / "config")
    result = snakemake(tmp_path, *command, "-n")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    rules = {rule for rule, _ in plan_resources(out)}
    assert {"compare_methods", "train_policy", "collect_pairs"} <= rules and "base_model" not in rules


def test_readme_slurm_dry_run_command_plans(tmp_path):
    """README "From laptop to cluster" step 3, the dry run (``-n``), from a copy of the profiles."""
    from smk import readme_commands

    (command,) = [c for c in readme_commands("--profile profiles/slurm") if "-n" in c]
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    result = snakemake(tmp_path, *command)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "train_policy" in {rule for rule, _ in plan_resources(out)}
