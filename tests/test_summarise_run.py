"""benchmarks/summarise_run.py: the README's generated results block (write, check) and the gate
that first-order methods beat SFT, on small fake ``results/`` trees."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from benchmarks import summarise_run as sr

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "summarise_run.py"
SFT = (0.393, 0.016)
PAIRED_SE = 0.010  # paired standard error of an iteration's gains unless its tuple gives a fourth value
# (gold_mean, gold_stderr, kl[, paired se]) of iterations 0, 1, 2: every iteration well above SFT
GOOD = {
    "dpo": [(0.479, 0.014, 0.21), (0.552, 0.015, 0.50), (0.557, 0.015, 0.78)],
    "rloo": [(0.469, 0.015, 0.40), (0.560, 0.014, 1.10), (0.592, 0.016, 2.05)],
}
README = """# Project

Prose before.

{begin}
old hand-written table
{end}

Prose after, kept as it is.
"""


def write_method(results: Path, method: str, iterations: list[tuple[float, ...]]) -> None:
    """``results/{method}/evaluation.csv`` as ``workflow.evaluation.loop_eval.evaluation_table`` writes it: the
    paired gains are the differences of the gold means (as for balanced paired samples) with the
    iteration's paired standard error (``PAIRED_SE`` or the tuple's fourth value)."""
    rows = [
        {
            "iteration": -1,
            "gold_mean": SFT[0],
            "gold_stderr": SFT[1],
            "reward_mean": 0.1,
            "reward_stderr": 0.02,
            "kl": 0.0,
            "wall_time_s": math.nan,
            "peak_mem_mb": math.nan,
            "gold_gain_vs_previous": math.nan,
            "gold_gain_vs_previous_stderr": math.nan,
            "gold_gain_vs_sft": 0.0,
            "gold_gain_vs_sft_stderr": 0.0,
            "gold_gain_vs_iter0": math.nan,
            "gold_gain_vs_iter0_stderr": math.nan,
        }
    ]
    previous = SFT[0]
    for i, (gold, se, kl, *paired_se) in enumerate(iterations):
        pse = paired_se[0] if paired_se else PAIRED_SE
        rows.append(
            {
                "iteration": i,
                "gold_mean": gold,
                "gold_stderr": se,
                "reward_mean": 0.2 + i,
                "reward_stderr": 0.03,
                "kl": kl,
                "wall_time_s": 123.4 + i,
                "peak_mem_mb": 987.6,
                "gold_gain_vs_previous": gold - previous,
                "gold_gain_vs_previous_stderr": pse,
                "gold_gain_vs_sft": gold - SFT[0],
                "gold_gain_vs_sft_stderr": pse,
                "gold_gain_vs_iter0": gold - iterations[0][0],
                "gold_gain_vs_iter0_stderr": pse if i else 0.0,
            }
        )
        previous = gold
    (results / method).mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(results / method / "evaluation.csv", index=False)


def make_run(root: Path, methods: dict[str, list[tuple[float, float, float]]] = GOOD) -> Path:
    """A fake finished run under ``root``: base and SFT summaries, reward model 0's metrics,
    one benchmark file and ``evaluation.csv`` of each method. Returns ``root``."""
    results = root / "results"
    for folder, (gold, se) in (("base_eval", (0.206, 0.017)), ("sft", SFT)):
        (results / folder).mkdir(parents=True)
        pd.DataFrame(
            [{"n": 600, "gold_mean": gold, "gold_stderr": se, "reward_mean": 0.0, "reward_stderr": 0.1}]
        ).to_csv(results / folder / "evaluation_summary.csv", index=False)
    (results / "reward" / "iter_0").mkdir(parents=True)
    pd.DataFrame(
        [
            {"step": 10, "loss": 0.6, "heldout_accuracy": math.nan, "heldout_rows": math.nan},
            {"step": 20, "loss": 0.4, "heldout_accuracy": 0.9333, "heldout_rows": 300},
        ]
    ).to_csv(results / "reward" / "iter_0" / "metrics.csv", index=False)
    (results / "benchmarks" / "sft").mkdir(parents=True)
    (results / "benchmarks" / "sft" / "sft.tsv").write_text("s\tmax_rss\n12.3\t580.1\n")
    for method, iterations in methods.items():
        write_method(results, method, iterations)
    return root


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "run")


@pytest.fixture
def readme(tmp_path: Path) -> Path:
    path = tmp_path / "README.md"
    path.write_text(README.format(begin=sr.BEGIN, end=sr.END))
    return path


def test_block_holds_the_deterministic_results_only(run):
    block = sr.results_block(run / "results")
    assert "- Untrained base model: gold **+0.206 ± 0.017**" in block
    assert "- SFT: gold **+0.393 ± 0.016**" in block
    assert "held-out pairwise accuracy **0.933** on 300 held-out pairs" in block
    assert "| dpo | +0.393 ± 0.016 | +0.479 ± 0.014 | +0.552 ± 0.015 | +0.557 ± 0.015 |" in block
    # paired gain over SFT and z = gain / paired se: 0.076 / 0.010 = 7.6, ...
    assert "| rloo | +0.076 ± 0.010 (7.6) | +0.167 ± 0.010 (16.7) | +0.199 ± 0.010 (19.9) |" in block
    # paired gain over the iteration before (iteration 0: over SFT)
    assert "| rloo | +0.076 ± 0.010 (7.6) | +0.091 ± 0.010 (9.1) | +0.032 ± 0.010 (3.2) |" in block
    assert "| dpo | +0.086 ± 0.010 (8.6) | +0.073 ± 0.010 (7.3) | +0.005 ± 0.010 (0.5) |" in block
    assert "| rloo | 0.40 | 1.10 | 2.05 |" in block
    assert "123" not in block and "987" not in block and "580" not in block  # no wall time or memory
    assert "reward_gold_accuracy" not in block  # runs from before the column have no agreement table


def test_block_shows_the_reward_gold_agreement_when_evaluated(run):
    path = run / "results" / "rloo" / "evaluation.csv"
    pd.read_csv(path).assign(reward_gold_accuracy=[0.81, 0.79, 0.7, 0.62]).to_csv(path, index=False)
    block = sr.results_block(run / "results")
    assert "| rloo | 0.810 | 0.790 | 0.700 | 0.620 |" in block
    assert "| dpo |  |  |  |  |" in block  # dpo's table has no such column


def test_write_then_check_passes(run, readme):
    assert sr.main([str(run), "--write-readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old hand-written table" not in text
    assert text.startswith("# Project\n\nProse before.\n\n" + sr.BEGIN + "\n\n- Untrained base model")
    assert text.endswith("\n\n" + sr.END + "\n\nProse after, kept as it is.\n")
    assert sr.results_block(run / "results") in text
    assert list(readme.parent.glob(".README.md.*")) == []  # the temp file was renamed into place
    done = run_cli(run, "--check-readme", readme)
    assert done.returncode == 0, done.stderr
    assert "results block matches" in done.stdout
    assert sr.write_readme(readme, sr.results_block(run / "results")) is False  # idempotent
    assert readme.read_text() == text


def test_check_fails_with_a_diff_when_a_number_changes(run, readme):
    sr.write_readme(readme, sr.results_block(run / "results"))
    table = pd.read_csv(run / "results" / "dpo" / "evaluation.csv")
    table.loc[table.iteration == 1, "gold_mean"] = 0.561
    table.to_csv(run / "results" / "dpo" / "evaluation.csv", index=False)
    done = run_cli(run, "--check-readme", readme)
    assert done.returncode == 1
    assert f"--- {readme} (results block)" in done.stderr
    assert "-| dpo | +0.393 ± 0.016 | +0.479 ± 0.014 | +0.552 ± 0.015 | +0.557 ± 0.015 |" in done.stderr
    assert "+| dpo | +0.393 ± 0.016 | +0.479 ± 0.014 | +0.561 ± 0.015 | +0.557 ± 0.015 |" in done.stderr
    assert "--write-readme" in done.stderr  # says how to regenerate


def test_missing_markers_name_the_file(run, tmp_path):
    path = tmp_path / "NOMARKERS.md"
    path.write_text("# Project\n\n" + sr.BEGIN + "\nno end marker\n")
    for option in ("--write-readme", "--check-readme"):
        done = run_cli(run, option, path)
        assert done.returncode == 1
        assert str(path) in done.stderr and sr.END in done.stderr
    assert path.read_text() == "# Project\n\n" + sr.BEGIN + "\nno end marker\n"  # untouched


@pytest.mark.parametrize(
    "damage, message",
    [
        ("empty evaluation", "damaged table"),
        ("no iteration column", "missing column"),
        ("cut benchmark", "damaged Snakemake benchmark"),
    ],
)
def test_an_unusable_file_is_named(run, damage, message):
    """A file of the run that cannot be read stops the script (exit 1) with its path, not a traceback."""
    if damage == "cut benchmark":
        path = run / "results" / "benchmarks" / "train_policy" / "rloo_0.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('s\th:m:s\tmax_rss\n"12.5')
    else:
        path = run / "results" / "rloo" / "evaluation.csv"
        path.write_text("" if damage == "empty evaluation" else "gold_mean\n0.5\n")
    done = run_cli(run)
    assert done.returncode == 1
    assert f"{path}: {message}" in done.stderr and "Traceback" not in done.stderr


def test_gate_passes_on_good_numbers(run, capsys):
    assert sr.main([str(run), "--gate"]) == 0
    out = capsys.readouterr().out
    assert "| dpo | 3 | 8.60 (iter 0) | 0.78 (iter 2) |" in out and "| pass |" in out
    assert "| rloo | 3 |" in out and "FAIL" not in out


def test_gate_fails_naming_method_and_iteration(tmp_path):
    # rloo iteration 1 gains 0.030 over SFT with a paired standard error of 0.022: z = 1.36
    bad = {**GOOD, "rloo": [GOOD["rloo"][0], (0.423, 0.015, 1.1, 0.022), GOOD["rloo"][2]]}
    run = make_run(tmp_path / "run", bad)
    done = run_cli(run, "--gate")
    assert done.returncode == 1
    assert (
        "rloo iteration 1: gold +0.423 ± 0.015 vs SFT +0.393 ± 0.016, paired gain +0.030 ± 0.022, z = 1.36, not above 2"
    ) in done.stderr
    assert "dpo" not in done.stderr
    assert "| rloo | 3 | 1.36 (iter 1) |" in done.stdout and "FAIL |" in done.stdout
    assert "| dpo | 3 |" in done.stdout
    assert sr.main([str(run), "--gate", "--gate-methods", "dpo"]) == 0  # rloo not gated
    assert sr.main([str(run), "--gate", "--min-z", "1"]) == 0


def test_gate_counts_each_iteration_not_only_the_last(tmp_path):
    # iteration 0 does not beat SFT, the last one does
    run = make_run(tmp_path / "run", {"ppo": [(0.40, 0.015, 0.1), (0.60, 0.015, 0.2)]})
    verdicts, failures = sr.gate(run / "results", sr.FIRST_ORDER, 2.0)
    assert [v.method for v in verdicts] == ["ppo"] and not verdicts[0].passed
    assert len(failures) == 1 and failures[0].startswith("ppo iteration 0:")


def test_gate_max_kl(run, capsys):
    assert sr.main([str(run), "--gate", "--max-kl", "3"]) == 0
    assert sr.main([str(run), "--gate", "--max-kl", "2"]) == 1
    err = capsys.readouterr().err
    assert "rloo iteration 2: KL to SFT 2.050, not below 2" in err
    assert "dpo" not in err and "rloo iteration 1" not in err


def test_gate_max_drop_z(tmp_path, capsys):
    # iteration 2 drops 0.070 below iteration 1 with a paired standard error of 0.020: 3.50 SEs
    run = make_run(
        tmp_path / "run", {**GOOD, "rloo": [(0.50, 0.015, 0.4), (0.60, 0.015, 1.0), (0.53, 0.015, 1.2, 0.02)]}
    )
    assert sr.main([str(run), "--gate"]) == 0  # off unless given
    assert sr.main([str(run), "--gate", "--max-drop-z", "4"]) == 0
    capsys.readouterr()
    assert sr.main([str(run), "--gate", "--max-drop-z", "2"]) == 1
    err = capsys.readouterr().err
    assert (
        "rloo iteration 2: gold +0.530 ± 0.015 vs iteration 1 +0.600 ± 0.015, a drop of 3.50 paired standard errors"
        in err
    )
    assert "dpo" not in err


def test_gate_uses_the_paired_standard_error(tmp_path):
    # a gain of 0.030 over SFT: z = 1.37 with the unpaired error sqrt(0.015^2 + 0.016^2), 3.0 with the
    # paired one (0.010): paired evaluation passes what the unpaired comparison could not resolve
    run = make_run(tmp_path / "run", {"rloo": [(0.423, 0.015, 0.5), (0.45, 0.015, 0.6)]})
    assert sr.z_score(0.423, 0.015, *SFT) == pytest.approx(1.37, abs=0.01)
    verdicts, failures = sr.gate(run / "results", sr.FIRST_ORDER, 2.0)
    assert failures == [] and verdicts[0].min_z == (pytest.approx(3.0), 0)


def test_gate_fails_on_a_table_without_paired_gains(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    path = run / "results" / "rloo" / "evaluation.csv"
    table = pd.read_csv(path)
    table.drop(columns=[c for c in table if c.startswith("gold_gain_")]).to_csv(path, index=False)
    assert sr.main([str(run), "--gate"]) == 1
    err = capsys.readouterr().err
    assert "rloo: evaluation.csv has no paired gains" in err and "dpo" not in err
    assert "| rloo |  |  |  |" in sr.results_block(run / "results")  # no paired cells, no error


def test_gate_zeroth_order_last_iteration_over_iteration_0(tmp_path, capsys):
    # zorloo: iteration 2 gains 0.050 over iteration 0 with a paired standard error of 0.020 (z 2.5);
    # zorloo_reference only 0.030 (z 1.5); only the last iteration counts (iteration 1 loses)
    run = make_run(
        tmp_path / "run",
        {
            **GOOD,
            "zorloo": [(0.50, 0.015, 0.4), (0.49, 0.015, 1.0, 0.02), (0.55, 0.015, 1.2, 0.02)],
            "zorloo_reference": [(0.50, 0.015, 0.4), (0.52, 0.015, 1.0, 0.02), (0.53, 0.015, 1.2, 0.02)],
        },
    )
    assert sr.main([str(run), "--gate"]) == 0  # off unless given
    assert sr.main([str(run), "--gate", "--zo-min-z", "2"]) == 0
    assert "zorloo: iteration 2 over iteration 0 +0.050 ± 0.020 (z 2.50)" in capsys.readouterr().out
    assert sr.main([str(run), "--gate", "--zo-min-z", "3"]) == 1
    assert "zorloo iteration 2: paired gain over iteration 0 +0.050 ± 0.020, z = 2.50, not above 3" in (
        capsys.readouterr().err
    )
    assert sr.main([str(run), "--gate", "--zo-min-z", "2", "--zo-methods", "zorloo", "zorloo_reference"]) == 1
    err = capsys.readouterr().err
    assert "zorloo_reference iteration 2" in err and "zorloo iteration" not in err
    assert sr.main([str(run), "--gate", "--zo-min-z", "2", "--zo-methods", "ppo_missing"]) == 1
    assert "none of ppo_missing" in capsys.readouterr().err


def test_gate_fails_without_any_gated_method(tmp_path, capsys):
    run = make_run(tmp_path / "run", {"zorloo": GOOD["rloo"]})
    assert sr.main([str(run), "--gate"]) == 1
    assert "none of ppo, dpo, rloo" in capsys.readouterr().err


def test_check_and_gate_combine(tmp_path, readme, capsys):
    run = make_run(tmp_path / "run", {**GOOD, "dpo": [(0.40, 0.014, 0.1)] + GOOD["dpo"][1:]})
    assert sr.main([str(run), "--write-readme", str(readme), "--check-readme", str(readme), "--gate"]) == 1
    captured = capsys.readouterr()
    assert "results block matches" in captured.out
    assert "dpo iteration 0:" in captured.err


def test_z_score():
    assert sr.z_score(0.6, 0.03, 0.2, 0.04) == pytest.approx(8.0)
    assert sr.z_score(0.6, 0.0, 0.2, 0.0) == math.inf
    assert math.isnan(sr.z_score(0.2, 0.0, 0.2, 0.0))
    assert math.isnan(sr.z_score(math.nan, 0.01, 0.2, 0.01))
