"""Stage ``compare_methods``: every method of ``loop.methods`` side by side (``results/compare/plots``):
the gold score and the judge's win rate against SFT per iteration, the interplay metrics per
iteration, and ``summary.csv`` joining them."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

if TYPE_CHECKING:
    from workflow.job import Job

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from workflow.io import as_paths, atomic_dir, read_table  # noqa: E402

log = logging.getLogger(__name__)


def _read_csv(path: str | os.PathLike, columns: tuple[str, ...]) -> pd.DataFrame | None:
    """The table of ``path``; ``None`` when there is no such file (the method is shown as missing),
    an error naming the file when it is damaged or lacks one of ``columns``."""
    if not os.path.exists(path):
        log.warning("%s does not exist: its method is shown as missing", path)
        return None
    return read_table(path, columns)


def _plot_per_iteration(
    path: Path,
    table: pd.DataFrame,
    column: str,
    stderr_column: str,
    width: float,
    ylabel: str,
    title: str,
    reference: float | None = None,
) -> None:
    """One line per method of ``column`` over the iterations (SFT = -1), with error bars of
    ``width`` standard errors; a note instead where no method has a value."""
    rows = table.dropna(subset=[column]) if column in table.columns else table.iloc[0:0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if len(rows):
        for m, df in rows.groupby("method", sort=False):
            df = df.sort_values("iteration")
            err = width * df[stderr_column] if stderr_column in df.columns else None
            ax.errorbar(df["iteration"], df[column], yerr=err, marker="o", capsize=3, label=m)
        ticks = sorted(rows["iteration"].unique())
        ax.set_xticks(ticks)
        ax.set_xticklabels(["SFT" if i == -1 else str(i) for i in ticks])
        ax.legend()
    else:
        ax.text(0.5, 0.5, f"no {column} in the evaluation tables", ha="center", transform=ax.transAxes)
    if reference is not None:
        ax.axhline(reference, color="black", lw=0.6)
    ax.set_xlabel("iteration (SFT = before policy learning)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(job: Job) -> None:
    """Stage function of ``compare_methods`` (inputs ``evaluation`` and ``plots``: lists in the
    order of ``params.methods``)."""
    methods = [str(m) for m in job.params["methods"]]
    evaluations = as_paths(job.input["evaluation"])
    plots = as_paths(job.input.get("plots", []))
    gold, inter = [], []
    for j, m in enumerate(methods):
        ev = _read_csv(evaluations[j], ("iteration", "gold_mean")) if j < len(evaluations) else None
        if ev is not None:
            gold.append(ev.assign(method=m))
        mt = _read_csv(Path(plots[j]) / "metrics.csv", ("iteration",)) if j < len(plots) else None
        if mt is not None:
            keep = [
                c
                for c in ("cosine", "obi_wan_cosine", "pearson", "policy_consecutive_cosine", "angle_deg")
                if c in mt.columns
            ]
            agg = mt.groupby("iteration")[keep].mean().reset_index().assign(method=m)
            inter.append(agg)
    with atomic_dir(job.output["plots"]) as out:
        from workflow.io import write_csv

        g = pd.concat(gold, ignore_index=True) if gold else pd.DataFrame(columns=["method", "iteration", "gold_mean"])
        _plot_per_iteration(
            out / "gold.png",
            g,
            "gold_mean",
            "gold_stderr",
            1.0,
            "gold score (mean +- stderr)",
            "Gold score per iteration",
        )
        _plot_per_iteration(
            out / "win_rate.png",
            g,
            "win_rate_vs_sft",
            "win_rate_vs_sft_stderr",
            1.96,
            "win rate against SFT (95% interval)",
            "Judge's win rate against SFT per iteration (ties count 1/2)",
            reference=0.5,
        )

        panels = ["cosine", "obi_wan_cosine", "pearson", "policy_consecutive_cosine"]
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8), sharey=True)
        it = pd.concat(inter, ignore_index=True) if inter else pd.DataFrame(columns=["method", "iteration"])
        for ax, col in zip(axes, panels):
            if col in it.columns:
                for m, df in it.groupby("method", sort=False):
                    ax.plot(df["iteration"], df[col], "-o", label=m)
            ax.set_title(col, fontsize=10)
            ax.set_xlabel("iteration")
            ax.axhline(0, color="black", lw=0.6)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("mean over the iteration's steps")
        if inter:
            axes[0].legend(fontsize=8)
        fig.suptitle("Policy-reward interplay per iteration")
        fig.tight_layout()
        fig.savefig(out / "interplay.png", dpi=120)
        plt.close(fig)

        summary = g.merge(it, on=["method", "iteration"], how="outer") if len(it) else g
        write_csv(summary, out / "summary.csv")
