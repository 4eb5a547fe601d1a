"""The multi-seed study target ``results/study/summary.csv`` (rules/study.smk, workflow/evaluation/study.py):
the summary's numbers on hand-made tables, the nested runs' configs, and a tiny two-seed study run
by Snakemake, after which one more seed plans only that seed."""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest
import yaml
from smk import REPO, snakemake
from test_loop_workflow import planned_jobs, ran_jobs, tiny_config, write_config

from workflow.evaluation.study import nested_run_settings, seed_config, study_table

TARGET = "results/study/summary.csv"


def evaluation(gold: list[float], gain_se: float, kl: list[float]) -> pd.DataFrame:
    """An ``evaluation.csv`` of SFT (gold[0]) and iterations 0.. (gold[1:]), paired errors ``gain_se``."""
    rows = []
    for k, g in enumerate(gold):
        i = k - 1
        rows.append(
            {
                "iteration": i,
                "gold_mean": g,
                "gold_stderr": 0.02,
                "kl": kl[k],
                "gold_gain_vs_sft": g - gold[0],
                "gold_gain_vs_sft_stderr": gain_se if i >= 0 else 0.0,
                "gold_gain_vs_iter0": g - gold[1] if i >= 0 else math.nan,
                "gold_gain_vs_iter0_stderr": (gain_se if i >= 1 else 0.0) if i >= 0 else math.nan,
            }
        )
    return pd.DataFrame(rows)


def test_study_table_per_seed_rows_and_the_line_across_seeds():
    table = study_table(
        [
            (0, "rloo", evaluation([0.40, 0.50, 0.56], 0.02, [0.0, 0.5, 0.9])),
            (1, "rloo", evaluation([0.45, 0.52, 0.54], 0.02, [0.0, 0.7, 1.1])),
        ]
    )
    assert list(table["seed"]) == ["0"] * 3 + ["1"] * 3 + ["all"] * 3
    seed1 = table[table.seed == "1"].set_index("iteration")
    assert seed1.loc[1, "gold_gain_vs_sft"] == pytest.approx(0.09) and seed1.loc[
        1, "gold_gain_vs_iter0"
    ] == pytest.approx(0.02)
    # beats a reference: gain > 2 paired standard errors (0.09 > 0.04; 0.02 is not > 0.04)
    assert seed1.loc[1, "beats_sft"] == 1 and seed1.loc[1, "beats_iter0"] == 0
    assert math.isnan(seed1.loc[0, "beats_iter0"]) and math.isnan(seed1.loc[-1, "beats_sft"])
    both = table[table.seed == "all"].set_index("iteration")
    assert both.loc[1, "gold_mean"] == pytest.approx(0.55)
    assert both.loc[1, "gold_stderr"] == pytest.approx(0.01)  # sd(0.56, 0.54) / sqrt(2)
    assert both.loc[1, "gold_gain_vs_sft"] == pytest.approx((0.16 + 0.09) / 2)
    assert both.loc[1, "gold_gain_vs_sft_stderr"] == pytest.approx(0.035)  # sd(0.16, 0.09) / sqrt(2)
    assert both.loc[1, "gold_gain_vs_iter0"] == pytest.approx(0.04)
    assert both.loc[1, "kl"] == pytest.approx(1.0)
    assert both.loc[1, "beats_sft"] == 2 and both.loc[1, "beats_iter0"] == 1 and both.loc[1, "n_seeds"] == 2
    assert both.loc[0, "gold_gain_vs_iter0"] == 0 and both.loc[0, "gold_gain_vs_iter0_stderr"] == 0


def test_seed_config_sets_the_seed_and_makes_local_paths_absolute(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    config = {
        "seed": 0,
        "cache_dir": ".cache/hf",
        "model": {"name": "models/tiny"},
        "judge": {"kind": "llm", "model": "Qwen/Qwen2.5-0.5B-Instruct"},
        "dataset": {"name": "hh-rlhf", "source": None, "files": {"train": "data/train.jsonl", "test": None}},
    }
    out = seed_config(config, 2, tmp_path)
    assert out["seed"] == 2 and config["seed"] == 0  # a copy
    assert out["cache_dir"] == str(tmp_path.resolve() / ".cache/hf")
    assert out["model"]["name"] == str(tmp_path.resolve() / "models/tiny")
    assert out["dataset"]["files"] == {"train": str(tmp_path.resolve() / "data/train.jsonl"), "test": None}
    assert out["judge"]["model"] == "Qwen/Qwen2.5-0.5B-Instruct"  # a hub id stays


def test_a_seeds_nested_run_reruns_on_settings_not_on_the_seed_list_caches_resources_or_tracking():
    """``study_seed``'s ``settings`` param: every section that changes the nested run's results, not
    the seeds, the seed, nor the runtime keys (tracking too, as on the main chain: README, "Tracking")."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config.update(seed=0, study={"seeds": [0, 1]}, tracking={"report_to": "wandb"}, cache_dir=".cache/hf")
    settings = nested_run_settings(config)
    assert set(settings) == set(config) - {"seed", "study", "cache_dir", "resources", "tracking"}
    assert settings["zopro"] == config["zopro"] and "loop" in settings
    assert nested_run_settings({**config, "tracking": {"report_to": "none"}, "study": {"seeds": [0]}}) == settings


def test_readme_study_command_plans_the_other_seeds_beside_the_main_chain(tmp_path):
    """README, "Multi-seed study": `snakemake --cores all results/study/summary.csv` on the default
    config: seed 0 is the main chain (results/), seeds 1 and 2 one nested run each."""
    result = snakemake(tmp_path, "-n", "--cores", "all", TARGET)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    jobs = ran_jobs(out)
    assert {j for j in jobs if j[0] == "study_seed"} == {("study_seed", "seed=1"), ("study_seed", "seed=2")}
    assert {("evaluation_table", f"method={m}") for m in ("ppo", "dpo", "rloo", "zorloo")} <= jobs
    assert ("study_summary", "") in jobs
    assert not re.search(r"results/study/seed_0/", out)
    # README: one more seed with an overlay of study.seeds
    overlay = tmp_path / "study.yaml"
    overlay.write_text("study:\n  seeds: [0, 1, 2, 3]\n")
    result = snakemake(tmp_path, "-n", "--cores", "all", TARGET, "--configfile", str(overlay))
    assert result.returncode == 0, result.stdout + result.stderr
    assert {j for j in ran_jobs(result.stdout) if j[0] == "study_seed"} == {
        ("study_seed", f"seed={s}") for s in (1, 2, 3)
    }


@pytest.mark.slow
def test_tiny_two_seed_study_then_one_more_seed_runs_only_that_seed(tmp_path, tiny_base):
    """Two whole tiny chains (about 4 minutes on one core)."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    config = tiny_config(tiny_base, study={"seeds": [0, 1]})
    cfg = write_config(workdir, config)
    result = snakemake(workdir, TARGET, "--cores", "1", "--configfile", cfg, timeout=1500)
    assert result.returncode == 0, result.stdout + result.stderr
    ran = ran_jobs(result.stdout + result.stderr)
    assert {j for j in ran if j[0] == "study_seed"} == {("study_seed", "seed=1")}  # seed 0 is the main chain
    assert ("evaluation_table", "method=rloo") in ran
    assert not (workdir / "results/study/seed_0").exists()

    seed1 = workdir / "results/study/seed_1"
    nested = yaml.safe_load((seed1 / "config.yaml").read_text())
    assert nested["seed"] == 1 and nested["model"]["name"] == tiny_base and "study" not in nested
    assert nested["cache_dir"] == str(workdir.resolve() / ".cache/hf")
    # seed 1 ran its own chain: other data, its own SFT and loop
    assert not pd.read_parquet(seed1 / "results/data/embedded/train.parquet").equals(
        pd.read_parquet(workdir / "results/data/embedded/train.parquet")
    )
    assert (seed1 / "results/rloo/iter_1/policy/adapter").is_dir()
    assert "seed 1: " in (workdir / "logs/study_seed/1.log").read_text()

    summary = pd.read_csv(workdir / TARGET, dtype={"seed": str})
    assert list(zip(summary.seed, summary.method, summary.iteration)) == [
        (s, "rloo", i) for s in ("0", "1", "all") for i in (-1, 0, 1)
    ]
    tables = {
        "0": pd.read_csv(workdir / "results/rloo/evaluation.csv"),
        "1": pd.read_csv(seed1 / "results/rloo/evaluation.csv"),
    }
    for seed, table in tables.items():
        rows = summary[summary.seed == seed].set_index("iteration")
        t = table.set_index("iteration")
        for column in ("gold_mean", "gold_stderr", "gold_gain_vs_sft", "gold_gain_vs_sft_stderr", "kl"):
            assert rows[column].to_numpy() == pytest.approx(t[column].to_numpy(), nan_ok=True)
        assert rows.loc[1, "gold_gain_vs_iter0"] == pytest.approx(t.loc[1, "gold_mean"] - t.loc[0, "gold_mean"])
        assert rows.loc[1, "gold_gain_vs_iter0_stderr"] == t.loc[1, "gold_gain_vs_iter0_stderr"]
        assert (rows.loc[0, "gold_gain_vs_iter0"], rows.loc[0, "gold_gain_vs_iter0_stderr"]) == (0, 0)
    both = summary[summary.seed == "all"].set_index("iteration")
    assert both.loc[1, "gold_mean"] == pytest.approx((tables["0"].gold_mean[2] + tables["1"].gold_mean[2]) / 2)
    assert (both["n_seeds"] == 2).all()
    assert (workdir / "results/study/summary.png").stat().st_size > 0

    # finished seeds are reused: nothing to do, and one more seed plans that seed and the summary only
    assert planned_jobs(workdir, TARGET, "--configfile", cfg) == set()
    config["study"]["seeds"] = [0, 1, 2]
    more = write_config(workdir, config)
    assert planned_jobs(workdir, TARGET, "--configfile", more) == {("study_seed", "seed=2"), ("study_summary", "")}

    # a setting that no job of the study reads reruns seed 1's nested run, which redoes only the table
    # whose file the rerun replaced (the main chain plans nothing)
    config["study"]["seeds"] = [0, 1]
    config["plots"]["extrapolate"] = 3
    changed = write_config(workdir, config)
    assert planned_jobs(workdir, TARGET, "--configfile", changed) == {("study_seed", "seed=1"), ("study_summary", "")}
    result = snakemake(workdir, TARGET, "--cores", "1", "--configfile", changed)
    assert result.returncode == 0, result.stdout + result.stderr
    nested_log = (workdir / "logs/study_seed/1.log").read_text()
    assert ran_jobs(nested_log[nested_log.rindex("seed 1: ") :]) == {("evaluation_table", "method=rloo")}
