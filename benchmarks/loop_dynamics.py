"""Benchmark: how a run's policy stages moved, step by step — reward-model score, gold and KL to SFT.

    .venv/bin/python benchmarks/loop_dynamics.py RUN_DIR [--methods ppo rloo] [--windows 4] [--out FILE.csv]

For every ``RUN_DIR/results/{method}/iter_{i}/policy`` stage, the training steps are cut into
``--windows`` equal windows; per window the table gives the mean reward-model score and the mean
gold score of the stage's own rollouts (``samples.parquet``: reward model ``i``'s ``score`` and the
task's ``gold``, recorded while training) and the mean sequence-level KL to SFT and KL coefficient
that the trainer logged (``metrics.csv``). A reward score that rises while gold falls is the policy
exploiting its reward model; a KL that jumps within one stage is a step size or KL control that is
too loose. Evaluation numbers (held-out prompts) are in ``results/{method}/evaluation.csv``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from workflow.io import write_csv  # noqa: E402
from workflow.train.kl_control import COLUMN as KL_COEF  # noqa: E402
from workflow.train.kl_control import sequence_kl  # noqa: E402


def stage_windows(stage: Path, windows: int) -> pd.DataFrame:
    """One row per step window of one policy stage (see the module docstring)."""
    samples = pd.read_parquet(stage / "samples.parquet")
    metrics = pd.read_csv(stage / "metrics.csv")
    metrics = metrics[metrics["step"].notna() & metrics.get("loss", metrics["step"]).notna()]
    metrics = metrics.assign(
        seq_kl=[sequence_kl({k: v for k, v in row.items() if pd.notna(v)}) for row in metrics.to_dict("records")]
    )
    last = max(int(samples["step"].max()), int(metrics["step"].max()) if len(metrics) else 0, 1)
    edges = np.linspace(0, last, windows + 1)
    rows = []
    for w in range(windows):
        lo, hi = edges[w], edges[w + 1]
        s = samples[(samples["step"] > lo) | ((w == 0) & (samples["step"] == lo))]
        s = s[s["step"] <= hi]
        m = metrics[(metrics["step"] > lo) & (metrics["step"] <= hi)]
        rows.append(
            {
                "window": w,
                "steps": f"{int(lo)}-{int(hi)}",
                "rollouts": len(s),
                "reward_score": float(s["score"].mean()) if len(s) else np.nan,
                "gold": float(s["gold"].mean()) if "gold" in s and len(s) else np.nan,
                "seq_kl": float(pd.to_numeric(m["seq_kl"], errors="coerce").mean()) if len(m) else np.nan,
                "kl_coef": float(m[KL_COEF].mean()) if KL_COEF in m and len(m) else np.nan,
            }
        )
    return pd.DataFrame(rows)


def run_dynamics(run_dir: Path, methods: list[str] | None, windows: int) -> pd.DataFrame:
    """:func:`stage_windows` of every policy stage of ``run_dir`` (``methods``: all when None)."""
    frames = []
    for stage in sorted((run_dir / "results").glob("*/iter_*/policy")):
        method, iteration = stage.parts[-3], int(stage.parts[-2].split("_")[1])
        if (methods and method not in methods) or not (stage / "samples.parquet").exists():
            continue
        frames.append(stage_windows(stage, windows).assign(method=method, iteration=iteration))
    if not frames:
        raise SystemExit(f"{run_dir}/results: no finished policy stage")
    table = pd.concat(frames, ignore_index=True)
    return table[["method", "iteration", *[c for c in table.columns if c not in ("method", "iteration")]]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="also write the table as CSV")
    args = parser.parse_args()
    table = run_dynamics(args.run_dir, args.methods, args.windows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_csv(table, args.out)
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))


if __name__ == "__main__":
    main()
