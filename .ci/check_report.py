"""Check a Snakemake report of the default run: it holds the comparison, every method's evaluation
table and trajectory plots, the SFT and reward-model metrics, and stays under a size limit.

    .venv/bin/python .ci/check_report.py report.html [--config config.yaml] [--max-mb 15]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml


def expected_items(methods: list[str]) -> list[str]:
    """Result paths the report must hold for a run of ``methods``."""
    items = ["results/compare/plots/gold.png", "results/sft/metrics.csv", "results/reward/iter_0/metrics.csv"]
    for method in methods:
        items += [f"results/{method}/evaluation.csv", f"results/{method}/plots/pca_2d.png"]
    return items


def problems(html: str, size_bytes: int, methods: list[str], max_mb: float) -> list[str]:
    """What is wrong with the report (empty when nothing is)."""
    found = set(re.findall(r'"(results/[^"]+)": \{"name"', html))
    out = [f"missing from the report: {item}" for item in expected_items(methods) if item not in found]
    if size_bytes > max_mb * 1e6:
        out.append(f"the report is {size_bytes / 1e6:.1f} MB, over {max_mb} MB")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path)
    parser.add_argument("--config", type=Path, default=Path("config.yaml"), help="the run's config (loop.methods)")
    parser.add_argument("--max-mb", type=float, default=15.0)
    args = parser.parse_args(argv)
    methods = list(yaml.safe_load(args.config.read_text())["loop"]["methods"])
    found = problems(args.report.read_text(), args.report.stat().st_size, methods, args.max_mb)
    for line in found:
        print(f"{args.report}: {line}", file=sys.stderr)
    if not found:
        print(f"{args.report}: {args.report.stat().st_size / 1e6:.1f} MB, every expected item present")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
