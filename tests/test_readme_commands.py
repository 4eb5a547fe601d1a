"""Every command the README shows runs somewhere: in `.ci/run` (verbatim), in a named test, or here
with `--dry-run` (the long benchmarks: arguments, inputs and plan checked, the measurement itself is
not repeated in CI). A command added to the README without a place in `WHERE` fails this test."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest
from smk import REPO

CI = (REPO / ".ci" / "run").read_text()

# README command (split at " && ", comments dropped) -> where it runs
WHERE = {
    "python3 -m venv .venv": ".ci/run",
    ".venv/bin/pip install -r requirements.txt": ".ci/run",
    ".venv/bin/snakemake --cores all results/zorloo/plots": ".ci/run",
    ".venv/bin/python -m pytest -n auto": ".ci/run",
    ".venv/bin/snakemake --cores all results/rloo/evaluation.csv --forcerun results/rloo/iter_1/reward/metrics.csv": (
        "tests/test_reruns.py::test_forcerun_of_an_output_reruns_it_and_downstream"
    ),
    "rm -r results/rloo/iter_1/reward": "tests/test_reruns.py::test_deleted_output_reruns_when_named",
    ".venv/bin/snakemake --cores all results/rloo/iter_1/reward/metrics.csv results/rloo/evaluation.csv": (
        "tests/test_reruns.py::test_deleted_output_reruns_when_named"
    ),
    ".venv/bin/snakemake --cores all results/zorloo/plots --unlock": ".ci/run",
    "cat > overlay.yaml": "tests/test_workflow_cli.py::test_nested_override_with_a_configfile_overlay",
    ".venv/bin/snakemake --cores all results/rloo/evaluation.csv --configfile overlay.yaml": (
        "tests/test_workflow_cli.py::test_nested_override_with_a_configfile_overlay"
    ),
    ".venv/bin/snakemake --cores all results/study/summary.csv": (
        "tests/test_study.py::test_readme_study_command_plans_the_other_seeds_beside_the_main_chain"
    ),
    "cat > study.yaml": "tests/test_study.py::test_tiny_two_seed_study_then_one_more_seed_runs_only_that_seed",
    ".venv/bin/snakemake --cores all results/study/summary.csv --configfile study.yaml": (
        "tests/test_study.py::test_tiny_two_seed_study_then_one_more_seed_runs_only_that_seed"
    ),
    ".venv/bin/snakemake --cores all results/compare/plots results/base_eval/evaluation_summary.csv": ".ci/run",
    ".venv/bin/python benchmarks/summarise_run.py . --write-readme README.md": ".ci/run",
    ".venv/bin/python benchmarks/summarise_run.py .": ".ci/run",
    ".venv/bin/snakemake --report report.html results/compare/plots results/base_eval/evaluation_summary.csv": ".ci/run",
    ".venv/bin/python .ci/check_report.py report.html": ".ci/run",
    ".venv/bin/python benchmarks/zopro_variants.py . --seeds 3 --cores 1 --iterations 1 2 --variants "
    "'guarded (default)' 'carried coefficient uncapped (kl_coef_max null)' "
    "'previous default (no carry, 8 updates of 1e-4)' \"reference (the paper's)\" "
    "--out results/benchmarks/zopro_seeds.csv": "dry-run",
    ".venv/bin/python benchmarks/zopro_update.py --reps 5 --out results/device/zopro_default.json": "dry-run",
    ".venv/bin/python benchmarks/zopro_update.py --size 1b --batch 16 --prompt-len 256 --completion-len 256 "
    "--reps 3 --out results/device/zopro_1b.json": "dry-run",
    ".venv/bin/snakemake --profile profiles/slurm -n results/zorloo/plots": (
        "tests/test_workflow_cli.py::test_readme_slurm_dry_run_command_plans"
    ),
    ".venv/bin/snakemake --profile profiles/slurm results/zorloo/plots": (
        "tests/test_slurm_profile.py::test_sbatch_calls_of_every_rule"
    ),
    ".venv/bin/snakemake --profile profiles/slurm results/compare/plots --configfile "
    "config/examples/llama-3.2-1b-hh-rlhf.yaml": (
        "tests/test_workflow_cli.py::test_readme_real_model_command_plans_with_the_slurm_profile"
    ),
    ".venv/bin/snakemake --cores all results/compare/plots --configfile config/examples/gpu-embedded.yaml": (
        "tests/test_workflow_cli.py::test_example_overlays_plan_the_study"
    ),
    ".venv/bin/snakemake --cores 2 --force results/zorloo/iter_1/policy/adapter": ".ci/run",
    ".venv/bin/ruff check .": ".ci/run",
    ".venv/bin/ruff format --check .": ".ci/run",
    ".venv/bin/snakefmt --check Snakefile rules/": ".ci/run",
    "TEST_WORKERS=14 PYTEST_ARGS=-v DEADLINE_S=560 bash benchmarks/device_check.sh tests": "device",
    "DEADLINE_S=300 bash benchmarks/device_check.sh precision": "device",
}


def readme_commands() -> list[str]:
    """The commands of the README's ``sh`` blocks: a here-document is its ``cat > FILE`` line,
    comments are dropped and ``a && b`` is two commands."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", (REPO / "README.md").read_text(), re.S):
        lines = iter(block.splitlines())
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "<<'" in line:
                end = line.split("<<'")[1].split("'")[0]
                while next(lines).strip() != end:
                    pass
                line = line.split("<<")[0]
            line = re.sub(r"\s+#.*$", "", line).strip()
            commands += [part.strip() for part in line.split(" && ")]
    return commands


def test_every_readme_command_has_a_place_that_runs_it():
    commands = readme_commands()
    assert len(commands) >= 30
    assert [c for c in commands if c not in WHERE] == [], "README commands that nothing runs: add them to WHERE"
    assert [c for c in WHERE if c not in commands] == [], "WHERE lists commands the README no longer shows"
    for command, where in WHERE.items():
        if where == ".ci/run":
            assert command in CI, f"{command!r} is not in .ci/run"
        elif where.startswith("tests/"):
            path, name = where.split("::")
            assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), f"{where} does not exist"


@pytest.mark.parametrize("command", [c for c, where in WHERE.items() if where == "dry-run"])
def test_benchmark_commands_check_their_arguments_and_plan(command, tmp_path):
    """The README's benchmark commands, with ``--dry-run`` added, from a folder holding the run prefix
    ``zopro_variants.py`` needs."""
    for part in ("data", "base", "sft", "reward", "rloo/iter_0", "rloo/iter_1/reward"):
        (tmp_path / "results" / part).mkdir(parents=True)
    program, script, *args = shlex.split(command)
    assert program == ".venv/bin/python"
    done = subprocess.run(
        [sys.executable, str(REPO / script), *args, "--dry-run"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    if "zopro_update" in script:
        plan = json.loads(done.stdout.strip().splitlines()[-1])
        expected = {"default": (105_788_160, 933_888), "1b": (1_498_482_688, 5_636_096)}
        assert (plan["params_base"], plan["params_lora"]) == expected["1b" if "--size 1b" in command else "default"]
    else:  # every variant the command names (all of them by default) is listed, its overlay validated
        named = (
            args[args.index("--variants") + 1 : args.index("--out")]
            if "--variants" in args
            else ["reference (the paper's)"]
        )
        assert all(f"{name}:" in done.stdout for name in named) and "sampling seeds" in done.stdout


def test_benchmark_dry_run_names_a_missing_run_prefix(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/zopro_variants.py"), ".", "--dry-run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "lacks results/data" in done.stderr


def test_device_script_parses_and_knows_the_parts_the_readme_asks_for():
    """The device command needs a GPU machine (README, "Tests"); here its script must parse and
    handle the parts the README names."""
    script = REPO / "benchmarks/device_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    for command, where in WHERE.items():
        if where == "device":
            parts = shlex.split(command)[shlex.split(command).index("benchmarks/device_check.sh") + 1 :]
            assert all(f"{part}) run_{part}" in script.read_text() for part in parts)
