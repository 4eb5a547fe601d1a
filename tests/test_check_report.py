"""``.ci/check_report.py``: the CI check of the default run's Snakemake report."""

from __future__ import annotations

import importlib.util

from smk import REPO

spec = importlib.util.spec_from_file_location("check_report", REPO / ".ci" / "check_report.py")
check_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_report)


def _html(paths: list[str]) -> str:
    return "var results = {" + ", ".join(f'"{p}": {{"name": "{p.rsplit("/", 1)[-1]}"}}' for p in paths) + "};"


def test_a_complete_report_passes_and_missing_items_are_named():
    items = check_report.expected_items(["rloo", "zorloo"])
    assert "results/zorloo/evaluation.csv" in items and "results/rloo/plots/pca_2d.png" in items
    assert check_report.problems(_html(items), 1000, ["rloo", "zorloo"], 15) == []
    partial = [i for i in items if i != "results/zorloo/evaluation.csv"]
    assert check_report.problems(_html(partial), 1000, ["rloo", "zorloo"], 15) == [
        "missing from the report: results/zorloo/evaluation.csv"
    ]


def test_an_oversized_report_fails(tmp_path):
    items = check_report.expected_items(["rloo"])
    path = tmp_path / "report.html"
    path.write_text(_html(items) + " " * 2_000_000)
    (tmp_path / "config.yaml").write_text("loop: {methods: [rloo]}\n")
    assert check_report.main([str(path), "--config", str(tmp_path / "config.yaml"), "--max-mb", "1"]) == 1
    assert check_report.main([str(path), "--config", str(tmp_path / "config.yaml"), "--max-mb", "3"]) == 0
