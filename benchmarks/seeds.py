"""Benchmark: is a method's gain over SFT robust across seeds, or one lucky run?

For every seed the workflow runs in a folder of its own (``--dir``/seed_<s>: data, base model, SFT,
reward model 0 and the loop all depend on the seed) with the repository's ``config.yaml``, any
``--configfile`` overlays, and ``seed=<s>``. Then, per method and seed, the table gives SFT's gold
score, the last iteration's gold score (mean ± standard error over prompts), their difference and
``z = difference / sqrt(se_SFT^2 + se_last^2)``. Finished folders are reused (Snakemake skips the
jobs whose outputs exist), so an interrupted benchmark resumes.

    .venv/bin/python benchmarks/seeds.py --methods ppo dpo rloo --seeds 0 1 2 --dir /work/seeds \\
        --out results/benchmarks/seeds.csv
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def run_seed(seed: int, methods: list[str], workdir: Path, cores: str, overlays: list[str]) -> None:
    """Run the loop of ``methods`` for one seed in ``workdir`` (raises when Snakemake fails)."""
    workdir.mkdir(parents=True, exist_ok=True)
    targets = [f"results/{m}/evaluation.csv" for m in methods]
    configs = [str(ROOT / "config.yaml"), *[str(Path(o).resolve()) for o in overlays]]
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(workdir), "--cores", cores,
           *targets, "--configfile", *configs, "--config", f"seed={seed}"]
    log = workdir / "snakemake.log"
    with open(log, "w") as handle:
        done = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        raise SystemExit(f"seed {seed}: snakemake failed (exit {done.returncode}), see {log}")


def gains(seed: int, methods: list[str], workdir: Path) -> list[dict]:
    """One row per method: SFT and last-iteration gold, difference and its z score."""
    rows = []
    for method in methods:
        table = pd.read_csv(workdir / "results" / method / "evaluation.csv").set_index("iteration")
        sft, last = table.loc[-1], table.loc[table.index.max()]
        diff = float(last.gold_mean - sft.gold_mean)
        se = math.sqrt(float(sft.gold_stderr) ** 2 + float(last.gold_stderr) ** 2)
        rows.append({"method": method, "seed": seed, "iteration": int(table.index.max()),
                     "sft_gold": float(sft.gold_mean), "sft_se": float(sft.gold_stderr),
                     "last_gold": float(last.gold_mean), "last_se": float(last.gold_stderr),
                     "difference": diff, "z": diff / se if se > 0 else math.nan, "kl": float(last.kl)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["ppo", "dpo", "rloo"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--dir", default="seeds", help="parent folder of the per-seed working folders")
    parser.add_argument("--cores", default="all")
    parser.add_argument("--configfile", nargs="*", default=[], help="config overlays after config.yaml")
    parser.add_argument("--out", default="results/benchmarks/seeds.csv")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        workdir = Path(args.dir) / f"seed_{seed}"
        print(f"seed {seed}: running in {workdir}", flush=True)
        run_seed(seed, args.methods, workdir, args.cores, args.configfile)
        rows += gains(seed, args.methods, workdir)
    table = pd.DataFrame(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))


if __name__ == "__main__":
    main()
