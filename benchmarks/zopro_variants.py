"""ZOPrO iteration 1 (``--iterations 1 2``: and 2) under several settings, each compared paired with
the iteration-0 policy it starts from and, where the run has them, with SFT and rloo's policy of
the same iteration (issue 11's criterion: the last iteration beats iteration 0 by more than 2
paired standard errors and gains at least 0.8x rloo's gain over SFT).

Needs a finished run's prefix in RUN_DIR (data, base model, SFT, reward model 0, rloo's iteration 0
and reward model 1: ``.venv/bin/snakemake --cores all results/rloo/iter_1/reward/metrics.csv``).
For every variant the real ``train_policy`` stages of ``zorloo`` (with the pairs and refined reward
models between them) run in its own folder
``RUN_DIR/zopro_variants/<name>`` (a copy of that prefix, Snakemake with the variant's overlay),
then each policy answers the evaluation prompts with ``--seeds`` sampling seeds and the gold gain
over the iteration-0 policy is paired over (prompt, seed) units (:func:`workflow.evaluation.generate.paired_difference`).

    .venv/bin/python benchmarks/zopro_variants.py . --out results/benchmarks/zopro_variants.csv

A study seed's chain (``results/study/seed_<s>``) is compared with ``--seed <s>``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from workflow.io import atomic_dir, atomic_path, write_csv  # noqa: E402

# name -> overlay of config.yaml (the default is the guarded variant as configured)
VARIANTS: dict[str, dict] = {
    "guarded (default)": {},
    "carried coefficient uncapped (kl_coef_max null)": {"zopro": {"kl_coef_max": None}},
    "no carried coefficient (policy.kl_coef)": {"zopro": {"carry_kl_coef": False}},
    "updates_per_batch 8, step_size 1e-4": {"zopro": {"updates_per_batch": 8, "step_size": 1e-4}},
    "previous default (no carry, 8 updates of 1e-4)": {
        "zopro": {"carry_kl_coef": False, "updates_per_batch": 8, "step_size": 1e-4}
    },
    "momentum step only": {"zopro": {"step_size": 1e-9, "updates_per_batch": 1, "n_perturbations": 1}},
    "exploration only (momentum_kl 0)": {"zopro": {"momentum_kl": 0.0}},
    "reference (the paper's)": {"zopro": {"variant": "reference"}},
}
PREFIX = [
    "results/data",
    "results/base",
    "results/sft",
    "results/reward",
    "results/rloo/iter_0",
    "results/rloo/iter_1/reward",
]
ITERATION_0 = "results/rloo/iter_0/policy/adapter"


def policy_adapter(iteration: int, method: str = "zorloo") -> str:
    """``method``'s policy adapter of ``iteration`` (zorloo's iteration 0 is rloo's)."""
    return ITERATION_0 if iteration == 0 else f"results/{method}/iter_{iteration}/policy/adapter"


def criterion(gain: float, stderr: float, ratio: float) -> str:
    """Issue 11's test of a last iteration: ``pass`` when it beats iteration 0 by more than 2 paired
    standard errors and its gain over SFT is at least 0.8x rloo's; ``-`` without rloo's run."""
    if math.isnan(ratio):
        return "-"
    return "pass" if gain > 2 * stderr and ratio >= 0.8 else "fail"


def train_variant(run_dir: Path, name: str, overlay: dict, cores: str, seed: int, last: int) -> Path:
    """Run zorloo's policy stages up to iteration ``last`` (with their pairs and refined reward
    models) with ``overlay`` and ``seed`` in the variant's own folder; returns the folder."""
    folder = run_dir / "zopro_variants" / "".join(c for c in name.replace(" ", "_") if c.isalnum() or c in "_.-")
    if not (folder / policy_adapter(last)).exists():
        for part in PREFIX:
            if not (folder / part).exists():
                with atomic_dir(folder / part) as tmp:  # a killed copy is never taken for a whole one
                    shutil.copytree(run_dir / part, tmp, dirs_exist_ok=True)
        with atomic_path(folder / "overlay.yaml") as tmp:
            tmp.write_text(yaml.safe_dump({"zopro": {}, **overlay, "seed": seed}))
        cmd = [
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            str(REPO / "Snakefile"),
            "-d",
            str(folder),
            "--cores",
            cores,
            policy_adapter(last),
            "--rerun-triggers",
            "mtime",
            "--configfile",
            str(REPO / "config.yaml"),
            str(folder / "overlay.yaml"),
        ]
        with open(folder / "snakemake.log", "w") as log:
            subprocess.run(
                cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
            )
    return folder


def evaluate_adapter(run_dir: Path, adapter: Path, cfg: dict) -> pd.DataFrame:
    """Gold rows of ``adapter`` on the evaluation prompts (seeded as the workflow's evaluations)."""
    from workflow.evaluation.generate import evaluate, evaluation_prompts
    from workflow.models.loading import load_policy, load_tokenizer, read_rows

    tokenizer = load_tokenizer(str(run_dir / "results/sft/adapter"), "chat")
    test = str(run_dir / "results/data/embedded/test.parquet")
    prompts = evaluation_prompts(read_rows(test), int(cfg["evaluation"]["n_prompts"]), tokenizer, cfg["model"], test)
    model = load_policy(str(run_dir / "results/base"), str(adapter))
    return evaluate(model, tokenizer, None, prompts, cfg, seed=int(cfg["seed"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="folder of a finished run (see above)")
    parser.add_argument("--seeds", type=int, default=5, help="sampling seeds of the paired evaluation (default 5)")
    parser.add_argument("--cores", default="all", help="Snakemake --cores of each variant's stage")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        metavar="NAME",
        help="variants to run (default: all)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="the run's training seed (default: config.yaml's; a study seed's folder needs its own)",
    )
    parser.add_argument(
        "--iterations", nargs="+", type=int, default=[1], help="zorloo iterations to train and compare (default 1)"
    )
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/zopro_variants.csv"))
    parser.add_argument(
        "--dry-run", action="store_true", help="check RUN_DIR's prefix and print each variant's overlay; run nothing"
    )
    args = parser.parse_args()
    missing = [part for part in PREFIX if not (args.run_dir / part).is_dir()]
    if missing:
        raise SystemExit(
            f"{args.run_dir} lacks {', '.join(missing)}: run .venv/bin/snakemake --cores all "
            "results/rloo/iter_1/reward/metrics.csv there first"
        )
    if args.dry_run:
        from snakemake.utils import update_config, validate

        from workflow.schema import SCHEMA

        for name in args.variants:
            config = yaml.safe_load((REPO / "config.yaml").read_text())
            update_config(config, VARIANTS[name])
            validate(config, str(SCHEMA))  # the overlay is a valid config
            print(f"{name}: {yaml.safe_dump(VARIANTS[name], default_flow_style=True).strip()}")
        print(f"{args.seeds} sampling seeds; table -> {args.out}")
        return
    from workflow import runtime
    from workflow.evaluation.generate import paired_difference

    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["evaluation"]["n_seeds"] = args.seeds
    if args.seed is not None:
        cfg["seed"] = args.seed
    runtime.configure(2, int(cfg["seed"]))
    reference = evaluate_adapter(args.run_dir, args.run_dir / ITERATION_0, cfg)
    sft = evaluate_adapter(args.run_dir, args.run_dir / "results/sft/adapter", cfg)
    rloo_gain = {}  # rloo's gain over SFT per iteration, where the run has rloo's policy
    for i in args.iterations:
        if (args.run_dir / policy_adapter(i, "rloo")).is_dir():
            rloo = evaluate_adapter(args.run_dir, args.run_dir / policy_adapter(i, "rloo"), cfg)
            rloo_gain[i] = paired_difference(rloo, sft)[0]
    rows = []
    for name in args.variants:
        folder = train_variant(args.run_dir, name, VARIANTS[name], args.cores, int(cfg["seed"]), max(args.iterations))
        for i in args.iterations:
            metrics = pd.read_csv(folder / Path(policy_adapter(i)).parent / "metrics.csv")
            evaluation = evaluate_adapter(args.run_dir, folder / policy_adapter(i), cfg)
            gain, stderr = paired_difference(evaluation, reference)
            over_sft = paired_difference(evaluation, sft)[0]
            ratio = over_sft / rloo_gain[i] if i in rloo_gain else math.nan
            alpha = metrics["zo/momentum_alpha"].dropna() if "zo/momentum_alpha" in metrics else pd.Series(dtype=float)
            rows.append(
                {
                    "variant": name,
                    "iteration": i,
                    "gold_gain_vs_iteration_0": gain,
                    "gold_gain_stderr": stderr,
                    "gold_gain_vs_sft": over_sft,
                    "rloo_gain_vs_sft": rloo_gain.get(i, math.nan),
                    "gain_ratio_to_rloo": ratio,
                    "criterion": criterion(gain, stderr, ratio) if i == max(args.iterations) else "",
                    "momentum_alpha": float(alpha.iloc[0]) if len(alpha) else float("nan"),
                    "stage_runtime_s": float(metrics["runtime_s"].dropna().iloc[-1]),
                }
            )
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    write_csv(table, args.out)
    print(
        "| variant | iteration | gold gain over iteration 0 (z) | gain over SFT / rloo's | momentum alpha | stage s |"
        " criterion |\n| --- | --- | --- | --- | --- | --- | --- |"
    )
    for r in rows:
        z = r["gold_gain_vs_iteration_0"] / r["gold_gain_stderr"]
        print(
            f"| {r['variant']} | {r['iteration']} | {r['gold_gain_vs_iteration_0']:+.3f} ± {r['gold_gain_stderr']:.3f} "
            f"({z:.1f}) | {r['gold_gain_vs_sft']:+.3f} / {r['rloo_gain_vs_sft']:+.3f} ({r['gain_ratio_to_rloo']:.2f}) | "
            f"{r['momentum_alpha']:.3f} | {r['stage_runtime_s']:.0f} | {r['criterion']} |"
        )


if __name__ == "__main__":
    main()
