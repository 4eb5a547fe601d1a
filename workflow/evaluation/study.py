"""The multi-seed study: the loop of every configured method on every seed of ``study.seeds``.

Rules ``study_seed`` and ``study_summary`` (``rules/study.smk``):

* :func:`run_seed` (``study_seed``): the whole chain of one seed (data, base model, SFT, reward
  model 0, the loop of ``loop.methods``, evaluations) as a nested Snakemake run of this workflow in
  its own working folder ``results/study/seed_<s>``, with the run's config and ``seed: <s>``
  (:func:`seed_config`, written to ``results/study/seed_<s>/config.yaml``). The nested run keeps its
  own metadata, so a rerun of the stage (its settings or the workflow's code changed) redoes only
  the nested jobs whose inputs, settings or code changed. The config's own ``seed`` is not run
  here: its chain is the main one under ``results/``.
* :func:`summarise` (``study_summary``): ``evaluation.csv`` of every (seed, method) into
  ``summary.csv`` (:func:`study_table`) and ``summary.png`` (:func:`plot_study`).
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workflow.config_checks import path_settings
from workflow.rerun import RUNTIME_KEYS, stage_settings

if TYPE_CHECKING:  # the Snakefile imports this module for workflow_hash: no pandas or torch at parse time
    import pandas as pd

    from workflow.job import Job

# an iteration "beats" a reference when its paired gain is more than this many paired standard errors
MIN_Z = 2.0
SEED_COLUMNS = [
    "seed",
    "method",
    "iteration",
    "gold_mean",
    "gold_stderr",
    "gold_gain_vs_sft",
    "gold_gain_vs_sft_stderr",
    "gold_gain_vs_iter0",
    "gold_gain_vs_iter0_stderr",
    "kl",
    "beats_sft",
    "beats_iter0",
    "n_seeds",
]
# the values that the across-seed rows average (their standard error is the seeds' spread)
AVERAGED = ["gold_mean", "gold_gain_vs_sft", "gold_gain_vs_iter0"]


def nested_run_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The settings of a seed's nested run (``study_seed``'s ``settings`` param): the whole config but
    what does not change its results: ``study`` (the other seeds), ``seed`` (the wildcard's) and the
    :data:`workflow.rerun.RUNTIME_KEYS`, which the nested run gets anyway (:func:`seed_config`)."""
    return stage_settings(config, [k for k in config if k not in ("seed", "study", *RUNTIME_KEYS)])


def seed_config(config: dict[str, Any], seed: int, root: str | os.PathLike) -> dict[str, Any]:
    """The config of seed ``seed``'s nested run: ``config`` with ``seed`` set, ``cache_dir`` and the
    path settings (:data:`workflow.config_checks.PATH_KEYS`) that name existing files relative to
    ``root`` made absolute."""
    out = copy.deepcopy(config)
    out["seed"] = int(seed)
    root = Path(root).resolve()
    if out.get("cache_dir"):
        out["cache_dir"] = str(root / out["cache_dir"])  # absolute stays absolute
    for parent, key, value in path_settings(out):
        if value and not os.path.isabs(value) and (root / value).exists():
            parent[key] = str(root / value)
    return out


def workflow_hash(basedir: str | os.PathLike) -> str:
    """``sha256:`` of the code every nested run executes: the syntax of every ``workflow`` module
    (``workflow.rerun.code_hash``: docstrings and layout left out) and the text of the Snakefile,
    ``rules/``, ``scripts/`` and the config schema. ``study_seed``'s ``code`` param: a change reruns
    each seed's nested Snakemake, which then redoes only what the change affects."""
    from workflow.rerun import ROOT, code_hash

    base = Path(basedir)
    modules = (p.relative_to(ROOT).with_suffix("").parts for p in ROOT.rglob("*.py"))
    digest = hashlib.sha256(
        code_hash(*sorted(".".join(("workflow", *parts)) for parts in modules if parts[-1] != "__init__")).encode()
    )
    files = [
        base / "Snakefile",
        *sorted(base.glob("rules/*.smk")),
        *sorted(base.glob("scripts/*.py")),
        base / "workflow" / "schemas" / "config.schema.yaml",
    ]
    for path in files:
        digest.update(f"{path.relative_to(base)}\n".encode() + path.read_bytes())
    return "sha256:" + digest.hexdigest()[:16]


def _as_list(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def run_seed(job: Job) -> None:
    """Stage function of ``study_seed``: write the seed's config and run the nested Snakemake.

    Wildcard ``seed``; params ``workdir`` (the seed's folder) and ``snakefile``; outputs
    ``evaluation`` (``evaluation.csv`` of every method, inside ``workdir``), the nested run's targets.
    The nested run uses ``job.threads`` cores (at most the usable CPUs: Snakemake does not cap
    ``--cores`` at them) and the workflow profile, like a run of its own, and
    ``--nolock``: only this job drives the seed's folder, and the main run's lock on this job's
    outputs keeps two runs of the same seed apart.
    """
    import yaml

    from workflow.io import atomic_path, subprocess_stream
    from workflow.runtime import usable_cpus

    seed, workdir = int(job.wildcards["seed"]), Path(job.params["workdir"])
    config = seed_config(job.config, seed, Path.cwd())
    config_path = workdir / "config.yaml"
    with atomic_path(config_path) as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=True))
    targets = [os.path.relpath(path, workdir) for path in _as_list(job.output["evaluation"])]
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(Path(job.params["snakefile"]).resolve()),
        "-d",
        str(workdir),
        "--cores",
        str(min(job.threads, usable_cpus())),
        "--nolock",
        *targets,
        "--configfile",
        str(config_path.resolve()),
    ]
    print(f"seed {seed}: {' '.join(cmd)}", flush=True)
    sys.stderr.flush()
    done = subprocess.run(cmd, stdout=subprocess_stream(sys.stdout), stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(
            f"seed {seed}: the nested Snakemake run in {workdir} failed (exit {done.returncode}); "
            f"its output is in {job.log or 'the output above'}"
        )


def run_seed_script(smk: Any) -> None:
    """Entry point of ``scripts/study_seed.py``: the job's log, then :func:`run_seed` in this process
    (not :func:`workflow.job.run_job`: the nested run spreads its own jobs over GPUs and processes)."""
    from workflow.job import Job, log_to

    job = Job.from_snakemake(smk)
    with log_to(job.log):
        run_seed(job)


def _stderr(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


def _beats(gain: float, stderr: float) -> float:
    """1.0 when ``gain`` is more than :data:`MIN_Z` paired standard errors, 0.0 when not, NaN without a gain."""
    if math.isnan(gain) or math.isnan(stderr):
        return math.nan
    return float(gain > MIN_Z * stderr)


def study_table(evaluations: list[tuple[int, str, pd.DataFrame]]) -> pd.DataFrame:
    """``summary.csv`` from ``(seed, method, evaluation.csv table)`` triples.

    One row per seed, method and iteration (``-1`` = SFT) with the gold score, the paired gains
    over SFT and over the method's iteration 0 with their paired standard errors, the KL to SFT, and
    ``beats_sft`` / ``beats_iter0``: 1 when the gain is more than :data:`MIN_Z` paired standard
    errors, else 0 (NaN where undefined). Then one row per method and iteration with ``seed`` =
    ``all``: the mean over seeds of the gold score and the gains, with the standard error of that
    mean over seeds (the seed-to-seed spread, the error that matters for a claim about the method),
    the mean KL, the number of seeds that beat each reference, and ``n_seeds``.
    """
    import pandas as pd

    rows = []
    for seed, method, table in evaluations:
        for _, r in table.sort_values("iteration").iterrows():
            values = {c: float(r.get(c, math.nan)) for c in SEED_COLUMNS[3:10]}
            rows.append(
                {
                    "seed": int(seed),
                    "method": method,
                    "iteration": int(r["iteration"]),
                    **values,
                    "beats_sft": _beats(values["gold_gain_vs_sft"], values["gold_gain_vs_sft_stderr"])
                    if r["iteration"] >= 0
                    else math.nan,
                    "beats_iter0": _beats(values["gold_gain_vs_iter0"], values["gold_gain_vs_iter0_stderr"])
                    if r["iteration"] >= 1
                    else math.nan,
                    "n_seeds": 1,
                }
            )
    per_seed = pd.DataFrame(rows, columns=SEED_COLUMNS)
    across = []
    for (method, iteration), group in per_seed.groupby(["method", "iteration"], sort=False):
        row: dict[str, Any] = {"seed": "all", "method": method, "iteration": iteration}
        for column in AVERAGED:
            stderr_column = "gold_stderr" if column == "gold_mean" else f"{column}_stderr"
            row[column], row[stderr_column] = float(group[column].mean()), _stderr(group[column])
        row["kl"] = float(group["kl"].mean())
        for column in ("beats_sft", "beats_iter0"):
            row[column] = float(group[column].sum()) if group[column].notna().any() else math.nan
        row["n_seeds"] = len(group)
        across.append(row)
    out = pd.concat([per_seed, pd.DataFrame(across, columns=SEED_COLUMNS)], ignore_index=True)
    return out.astype({"seed": str})


def plot_study(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """``summary.png``: per method, the paired gain over SFT (left) and over iteration 0 (right) per
    iteration, one thin line per seed and the mean over seeds with its standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from workflow.io import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    loop = table[table["iteration"] >= 0]
    for k, (method, rows) in enumerate(loop.groupby("method", sort=False)):
        color = f"C{k}"
        for ax, column in zip(axes, ("gold_gain_vs_sft", "gold_gain_vs_iter0")):
            for _, one in rows[rows["seed"] != "all"].groupby("seed"):
                ax.plot(one["iteration"], one[column], "-", color=color, alpha=0.35, lw=1)
            mean = rows[rows["seed"] == "all"].sort_values("iteration")
            ax.errorbar(
                mean["iteration"],
                mean[column],
                yerr=mean[f"{column}_stderr"],
                marker="o",
                capsize=3,
                color=color,
                lw=2,
                label=f"{method} ({int(mean['n_seeds'].max())} seeds)",
            )
    for ax, title in zip(axes, ("Paired gold gain over SFT", "Paired gold gain over the method's iteration 0")):
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if len(loop):
            ax.set_xticks(sorted(loop["iteration"].unique()))
    axes[0].set_ylabel("gold gain (thin: one seed; thick: mean ± se over seeds)")
    if len(loop):
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def summarise(job: Job) -> None:
    """Stage function of ``study_summary``: inputs ``evaluation`` (``evaluation.csv`` files) in the
    order of params ``runs`` (``[seed, method]`` pairs); outputs ``table`` and ``figure``."""
    from workflow.io import read_table, write_csv

    runs = [(int(seed), str(method)) for seed, method in job.params["runs"]]
    paths = _as_list(job.input["evaluation"])
    if len(paths) != len(runs):
        raise ValueError(f"{len(paths)} evaluation tables for {len(runs)} (seed, method) runs")
    columns = ("iteration", "gold_mean", "gold_gain_vs_sft", "gold_gain_vs_sft_stderr")
    table = study_table([(seed, method, read_table(path, columns)) for (seed, method), path in zip(runs, paths)])
    write_csv(table, job.output["table"])
    plot_study(table, job.output["figure"])
    print(table.to_string(index=False))
