"""benchmarks/seeds.py --summarise-only: per seed, method and iteration, the robustness criteria."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_summarise_run import make_run

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "seeds.py"


def test_summarise_only_tabulates_finished_seed_folders(tmp_path):
    make_run(tmp_path / "seed_0")
    # seed 1: rloo's iteration 2 drops 0.1 below iteration 1 (more than 2 standard errors)
    make_run(
        tmp_path / "seed_1",
        {
            "rloo": [(0.469, 0.015, 0.4), (0.560, 0.014, 1.1), (0.460, 0.016, 2.0)],
            "dpo": [(0.479, 0.014, 0.2), (0.552, 0.015, 0.5), (0.557, 0.015, 3.5)],
        },
    )
    out = tmp_path / "seeds.csv"
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--methods",
            "dpo",
            "rloo",
            "--seeds",
            "0",
            "1",
            "--dir",
            str(tmp_path),
            "--summarise-only",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(out)
    assert len(table) == 2 * 2 * 3
    verdicts = table.groupby(["method", "seed"])["passes"].all().to_dict()
    assert verdicts == {("dpo", 0): True, ("dpo", 1): False, ("rloo", 0): True, ("rloo", 1): False}  # KL 3.5, drop
    drop = table[(table.method == "rloo") & (table.seed == 1) & (table.iteration == 2)].iloc[0]
    assert drop["drop_z"] > 2
    assert drop["drop_z"] == pytest.approx(10.0) and drop["gain_se"] == 0.010  # paired: 0.100 / 0.010
    assert "| rloo | 1 | +0.076 (7.6) [0.40] | +0.167 (16.7) [1.10] | +0.067 (6.7) [2.00] | FAIL |" in done.stdout
