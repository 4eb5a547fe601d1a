"""Summarise a finished run as the Markdown tables quoted in README.md.

    .venv/bin/python benchmarks/summarise_run.py [RUN_DIR]

Reads ``RUN_DIR/results`` (default: the current folder): the base and SFT evaluation summaries,
reward model 0's held-out accuracy, every ``results/{method}/evaluation.csv`` and the wall time and
peak memory of every job (``results/benchmarks/<rule>/<wildcards>.tsv``, written by Snakemake's
``benchmark:`` directive).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def _fmt(mean: float, stderr: float) -> str:
    return f"{mean:+.3f} ± {stderr:.3f}"


def gold_table(results: Path) -> str:
    """Gold score (mean ± standard error) per iteration of every method, beside base and SFT."""
    rows = []
    base = results / "base_eval" / "evaluation_summary.csv"
    if base.exists():
        b = pd.read_csv(base).iloc[0]
        rows.append(("untrained base", {"": _fmt(b.gold_mean, b.gold_stderr)}))
    tables = {m.parent.name: pd.read_csv(m) for m in sorted(results.glob("*/evaluation.csv"))}
    iterations = sorted({int(i) for t in tables.values() for i in t["iteration"] if i >= 0})
    header = "| method | SFT | " + " | ".join(f"iter {i}" for i in iterations) + " | KL to SFT (last) | policy train s / iter |"
    lines = [header, "|" + " --- |" * (len(iterations) + 4)]
    for method, t in tables.items():
        t = t.set_index("iteration")
        cells = [_fmt(t.loc[i, "gold_mean"], t.loc[i, "gold_stderr"]) if i in t.index else "" for i in [-1, *iterations]]
        last = t.loc[max(iterations)] if iterations and max(iterations) in t.index else None
        kl = f"{last.kl:.2f}" if last is not None else ""
        secs = "/".join(f"{t.loc[i, 'wall_time_s']:.0f}" for i in iterations if i in t.index)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {kl} | {secs} |")
    if rows:
        lines.append("")
        lines += [f"Untrained base model: gold {cell}" for _, d in rows for cell in d.values()]
    return "\n".join(lines)


def reward_accuracy(results: Path) -> str:
    """Held-out pairwise accuracy of reward model 0 (last row of its metrics)."""
    metrics = results / "reward" / "iter_0" / "metrics.csv"
    if not metrics.exists():
        return "reward model 0: not run"
    m = pd.read_csv(metrics)
    acc = m["heldout_accuracy"].dropna()
    return f"Reward model 0 held-out pairwise accuracy: {acc.iloc[-1]:.3f}" if len(acc) else "no accuracy logged"


def job_table(results: Path) -> str:
    """Wall time and peak memory of every job, from Snakemake's benchmark files."""
    lines = ["| rule | job | wall s | peak RSS MB |", "| --- | --- | --- | --- |"]
    total = 0.0
    for tsv in sorted(results.glob("benchmarks/*/*.tsv")):
        b = pd.read_csv(tsv, sep="\t").iloc[0]
        total += float(b["s"])
        lines.append(f"| {tsv.parent.name} | {tsv.stem} | {b['s']:.0f} | {b['max_rss']:.0f} |")
    lines.append(f"| **all jobs** | | **{total:.0f}** | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default=".", type=Path)
    results = parser.parse_args().run_dir / "results"
    print(gold_table(results), "", reward_accuracy(results), "", job_table(results), sep="\n")


if __name__ == "__main__":
    main()
