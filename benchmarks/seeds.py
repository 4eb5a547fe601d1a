"""Benchmark: is a method's gain over SFT robust across seeds, or one lucky run?

For every seed the workflow runs in a folder of its own (``--dir``/seed_<s>: data, base model, SFT,
reward model 0 and the loop all depend on the seed) with the repository's ``config.yaml``, any
``--configfile`` overlays, and ``seed=<s>``. Then, per method, seed and iteration, the table gives
the gold score (mean ± standard error over (prompt, sampling seed) units), its paired gain over SFT
(``evaluation.csv``'s ``gold_gain_vs_sft``) with its paired standard error and ``z = gain / se``, its
paired drop against the iteration before in the same units, the KL to SFT, and whether the method
meets every criterion on that seed: each iteration beats SFT by more than 2 paired standard errors,
loses at most 2 against the one before, and stays below KL 3. A Markdown summary for the README
follows. Finished folders are reused (Snakemake skips the jobs whose outputs exist), so an
interrupted benchmark resumes.

The workflow's own multi-seed target, ``results/study/summary.csv`` (``study.seeds``, README
"Multi-seed study"), runs the same per-seed chains inside Snakemake; this script keeps the criteria
table of the README and its folder layout (``--dir``/seed_<s>).

    .venv/bin/python benchmarks/seeds.py --methods ppo dpo rloo --seeds 0 1 2 --dir /work/seeds \\
        --out results/benchmarks/seeds.csv
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from workflow.io import write_csv  # noqa: E402

# the criteria of issue "robust baseline": every iteration beats SFT by more than 2 standard errors,
# loses at most 2 against the iteration before, and stays below KL 3 to SFT
MIN_Z, MAX_KL, MAX_DROP_Z = 2.0, 3.0, 2.0


def run_seed(seed: int, methods: list[str], workdir: Path, cores: str, overlays: list[str]) -> None:
    """Run the loop of ``methods`` for one seed in ``workdir`` (raises when Snakemake fails)."""
    workdir.mkdir(parents=True, exist_ok=True)
    targets = [f"results/{m}/evaluation.csv" for m in methods]
    configs = [str(ROOT / "config.yaml"), *[str(Path(o).resolve()) for o in overlays]]
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(ROOT / "Snakefile"),
        "-d",
        str(workdir),
        "--cores",
        cores,
        *targets,
        "--configfile",
        *configs,
        "--config",
        f"seed={seed}",
    ]
    log = workdir / "snakemake.log"
    with open(log, "w") as handle:
        done = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        raise SystemExit(f"seed {seed}: snakemake failed (exit {done.returncode}), see {log}")


def iteration_rows(seed: int, methods: list[str], workdir: Path) -> list[dict]:
    """One row per method and iteration: gold, paired gain over SFT with its standard error and z,
    the paired drop against the iteration before (SFT before iteration 0) in paired standard errors,
    KL to SFT, and whether the method passes the CI gate's criteria (``summarise_run.gate_method``)
    on this seed."""
    from summarise_run import gate_method, paired, paired_z

    rows = []
    for method in methods:
        table = pd.read_csv(workdir / "results" / method / "evaluation.csv").set_index("iteration")
        verdict = gate_method(method, table, MIN_Z, MAX_KL, MAX_DROP_Z)
        sft = table.loc[-1]
        for i in sorted(int(k) for k in table.index if k >= 0):
            row = table.loc[i]
            gain, gain_se = paired(table, i, "sft")
            rows.append(
                {
                    "method": method,
                    "seed": seed,
                    "iteration": i,
                    "sft_gold": float(sft.gold_mean),
                    "gold": float(row.gold_mean),
                    "gold_se": float(row.gold_stderr),
                    "gain": gain,
                    "gain_se": gain_se,
                    "z": paired_z(gain, gain_se),
                    "drop_z": -paired_z(*paired(table, i, "previous")),
                    "kl": float(row.kl),
                    "passes": verdict.passed,
                }
            )
    return rows


def markdown(table: pd.DataFrame) -> str:
    """Per method and seed: each iteration's paired gain over SFT (z) [KL to SFT], and the verdict."""
    iterations = sorted(table["iteration"].unique())
    lines = [
        "| method | seed | " + " | ".join(f"iter {i}" for i in iterations) + " | all criteria |",
        "|" + " --- |" * (len(iterations) + 3),
    ]
    for (method, seed), group in table.groupby(["method", "seed"], sort=True):
        cells = {int(r.iteration): f"{r.gain:+.3f} ({r.z:.1f}) [{r.kl:.2f}]" for r in group.itertuples()}
        verdict = "pass" if bool(group["passes"].all()) else "FAIL"
        lines.append(
            f"| {method} | {seed} | " + " | ".join(cells.get(int(i), "") for i in iterations) + f" | {verdict} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["ppo", "dpo", "rloo"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--dir", default="seeds", help="parent folder of the per-seed working folders")
    parser.add_argument("--cores", default="all")
    parser.add_argument("--configfile", nargs="*", default=[], help="config overlays after config.yaml")
    parser.add_argument("--out", default="results/benchmarks/seeds.csv")
    parser.add_argument(
        "--summarise-only", action="store_true", help="tabulate the seed folders as they are, without running Snakemake"
    )
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        workdir = Path(args.dir) / f"seed_{seed}"
        if not args.summarise_only:
            print(f"seed {seed}: running in {workdir}", flush=True)
            run_seed(seed, args.methods, workdir, args.cores, args.configfile)
        rows += iteration_rows(seed, args.methods, workdir)
    table = pd.DataFrame(rows)
    write_csv(table, args.out)
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print()
    print(markdown(table))


if __name__ == "__main__":
    main()
