"""Trajectory plots, interplay metrics and the comparison of methods.

Stage functions (``run(job)`` style, see workflow/job.py):

* :func:`run` (rules ``plot_trajectories`` / ``plot_trajectories_upto``): inputs ``policy`` and
  ``reward`` (lists of snapshots folders, one per iteration), output ``plots`` (a folder) with
  ``metrics.{csv,parquet}`` (per step), ``metrics_iterations.{csv,parquet}`` (per iteration and
  whole trajectory), ``coordinates.{csv,parquet}`` (reduced and 2D/3D coordinates of every
  snapshot), ``{projection}_2d.png``, ``{projection}_3d.png``, ``{projection}_3d.html``
  (plotly, self-contained: plotly.js embedded, opens offline), ``interplay.png`` and
  ``summary.json``. Every stage folder is validated before any work.
* :func:`compare` (rule ``compare_methods``): ``evaluation.csv`` and ``plots/metrics.csv`` of
  every method into ``gold.png``, ``interplay.png`` and ``summary.csv``.

Command line (used by benchmarks/plots_memory.py)::

    python -m workflow.plots --policy P0 P1 --reward R0 R1 --out DIR [--reduce-dim 100] ...
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from workflow import interplay as ip  # noqa: E402
from workflow import trajectories as tj  # noqa: E402
from workflow.io import atomic_dir  # noqa: E402

log = logging.getLogger(__name__)

DEFAULTS = {
    "projections": ["pca", "tsne"],
    "reduce_dim": 100,
    "layer": None,
    "obi_wan": False,
    "keep_rm": False,
    "max_snapshots": None,
    "extrapolate": 10,
}
COLOURS = {"policy": "tab:blue", "reward": "tab:orange"}


def options(config: dict[str, Any]) -> dict[str, Any]:
    """``config["plots"]`` over the defaults, plus ``keep_rm_alpha`` from ``config["loop"]``."""
    opts = dict(DEFAULTS)
    opts.update({k: v for k, v in (config.get("plots") or {}).items()})
    opts["keep_rm_alpha"] = float((config.get("loop") or {}).get("keep_rm_alpha", 0.5))
    return opts


def _as_list(value: Any) -> list[str]:
    return [str(value)] if isinstance(value, (str, os.PathLike)) else [str(v) for v in value]


# --------------------------------------------------------------------------- analysis


def analyse(policy_dirs: list[str], reward_dirs: list[str], opts: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Validate, stream once, embed and compute the metrics (no files written)."""
    if len(policy_dirs) != len(reward_dirs):
        raise ValueError(f"{len(policy_dirs)} policy but {len(reward_dirs)} reward iterations")
    # validate both before any work, reporting every incomplete iteration at once
    errors = []
    for name, dirs in (("policy", policy_dirs), ("reward", reward_dirs)):
        try:
            tj.validate(dirs, name)
        except tj.IncompleteTrajectoryError as err:
            errors.append(str(err))
    if errors:
        raise tj.IncompleteTrajectoryError("\n".join(errors))
    t0 = time.perf_counter()
    trajs = {
        "policy": tj.load_trajectory("policy", policy_dirs, opts["max_snapshots"], validate_first=False),
        "reward": tj.load_trajectory("reward", reward_dirs, opts["max_snapshots"], validate_first=False),
    }
    keys = tj.shared_keys(trajs.values(), opts["layer"])
    n_params = sum(info.numel for info in keys.values())
    log.info(
        "%d shared tensors, %d parameters; %d policy and %d reward snapshots",
        len(keys),
        n_params,
        len(trajs["policy"]),
        len(trajs["reward"]),
    )
    alignment = ip.align(trajs["policy"], trajs["reward"])
    acc = ip.UpdateAccumulator(alignment, trajs["policy"], trajs["reward"])
    keep_rm = {"reward": opts["keep_rm_alpha"]} if opts["keep_rm"] else None

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 20) == 0:
            log.info("streamed %d/%d chunks", done, total)

    reduced = tj.stream(
        trajs, keys, dim=int(opts["reduce_dim"]), seed=seed, keep_rm=keep_rm, hooks=[acc], progress=progress
    )
    t_stream = time.perf_counter() - t0
    joint = np.vstack([reduced["policy"], reduced["reward"]])
    n_p = len(trajs["policy"])
    embeddings = {}
    for method in ["pca"] + [m for m in tj.available_projections(opts["projections"]) if m != "pca"]:
        for k in (2, 3):
            y = tj.embed(joint, method, k, seed=seed)
            embeddings[(method, k)] = {"policy": y[:n_p], "reward": y[n_p:]}
    steps = ip.step_table(acc, trajs["policy"], trajs["reward"], reduced, embeddings[("pca", 3)])
    iters = ip.iteration_table(steps, acc, reduced)
    return dict(
        trajectories=trajs,
        keys=keys,
        n_params=n_params,
        reduced=reduced,
        embeddings=embeddings,
        steps=steps,
        iterations=iters,
        projections=[m for m in tj.available_projections(opts["projections"])],
        stream_seconds=t_stream,
    )


def coordinates_table(res: dict[str, Any]) -> pd.DataFrame:
    frames = []
    for name, t in res["trajectories"].items():
        cols = {
            "model": name,
            "row": np.arange(len(t)),
            "iteration": t.iteration,
            "snapshot": t.snapshot,
            "step": t.steps,
            "progress": t.progress(),
        }
        for (method, k), emb in res["embeddings"].items():
            for d in range(k):
                cols[f"{method}{k}d_{d}"] = emb[name][:, d]
        red = res["reduced"][name]
        for d in range(red.shape[1]):
            cols[f"reduced_{d}"] = red[:, d]
        frames.append(pd.DataFrame(cols))
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------- figures


def extrapolation(points: np.ndarray, n: int) -> np.ndarray | None:
    """Least-squares line through the last ``n`` points, continued ``n`` points past the last
    one (``None`` when ``n < 2`` or there are fewer points)."""
    if n < 2 or len(points) < n:
        return None
    t = np.arange(n, dtype=float)
    tail = points[-n:]
    coef = np.polyfit(t, tail, 1)  # (2, dims)
    future = np.arange(n - 1, 2 * n - 1, dtype=float)
    return coef[0][None, :] * future[:, None] + coef[1][None, :]


def _title(opts: dict[str, Any], method: str, label: str) -> str:
    extra = []
    if opts.get("layer") is not None:
        extra.append(f"layer {opts['layer']}")
    if opts.get("keep_rm"):
        extra.append("keep_rm replay")
    return f"{label}: policy and reward LoRA trajectories ({method.upper()})" + (
        f" [{', '.join(extra)}]" if extra else ""
    )


def plot_static(res: dict[str, Any], method: str, k: int, path: Path, opts: dict[str, Any], label: str) -> None:
    emb = res["embeddings"][(method, k)]
    fig = plt.figure(figsize=(8, 6.5))
    ax = fig.add_subplot(111, projection="3d" if k == 3 else None)
    for name, traj in res["trajectories"].items():
        y = emb[name][:, :k]
        c = COLOURS[name]
        ax.plot(*y.T, "-", color=c, lw=1.2, alpha=0.85, label=name)
        ax.scatter(*y.T, color=c, s=8, alpha=0.6)
        ax.scatter(*y[0], marker="o", s=90, facecolor="white", edgecolor=c, lw=2, zorder=5)
        ax.scatter(*y[-1], marker="*", s=180, color=c, edgecolor="black", zorder=5)
        for i, b in enumerate(traj.boundaries[1:], start=1):
            ax.scatter(*y[b], marker="D", s=45, color=c, edgecolor="black", zorder=5)
            ax.text(*y[b], f" {name[0]}{i}", fontsize=8)
        ext = extrapolation(y, int(opts.get("extrapolate") or 0))
        if ext is not None:
            ax.plot(*ext.T, "--", color=c, lw=1.2, alpha=0.9)
    handles = [plt.Line2D([], [], color=COLOURS[n], label=n) for n in res["trajectories"]] + [
        plt.Line2D([], [], marker="o", ls="", mfc="white", mec="gray", label="start"),
        plt.Line2D([], [], marker="*", ls="", color="gray", ms=12, label="end"),
        plt.Line2D([], [], marker="D", ls="", color="gray", label="iteration start"),
    ]
    if int(opts.get("extrapolate") or 0) >= 2:
        handles.append(
            plt.Line2D([], [], ls="--", color="gray", label=f"linear extrapolation (last {opts['extrapolate']})")
        )
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_title(_title(opts, method, label), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_html(res: dict[str, Any], method: str, path: Path, opts: dict[str, Any], label: str) -> None:
    """Interactive 3D plot; plotly.js is embedded (include_plotlyjs=True): opens offline."""
    import plotly.graph_objects as go

    emb = res["embeddings"][(method, 3)]
    fig = go.Figure()
    for name, traj in res["trajectories"].items():
        y = emb[name]
        c = COLOURS[name].replace("tab:", "")
        hover = [f"{name} iteration {i}, step {s}" for i, s in zip(traj.iteration, traj.steps)]
        fig.add_trace(
            go.Scatter3d(
                x=y[:, 0],
                y=y[:, 1],
                z=y[:, 2],
                mode="lines+markers",
                name=name,
                text=hover,
                hoverinfo="text",
                line=dict(color=c, width=4),
                marker=dict(size=2, color=c),
            )
        )
        fig.add_trace(
            go.Scatter3d(
                x=y[[0], 0],
                y=y[[0], 1],
                z=y[[0], 2],
                mode="markers",
                name=f"{name} start",
                marker=dict(size=7, color="white", line=dict(color=c, width=3)),
            )
        )
        fig.add_trace(
            go.Scatter3d(
                x=y[[-1], 0],
                y=y[[-1], 1],
                z=y[[-1], 2],
                mode="markers",
                name=f"{name} end",
                marker=dict(size=8, color=c, symbol="diamond"),
            )
        )
        b = traj.boundaries[1:]
        if b:
            fig.add_trace(
                go.Scatter3d(
                    x=y[b, 0],
                    y=y[b, 1],
                    z=y[b, 2],
                    mode="markers+text",
                    text=[f"{name[0]}{i}" for i in range(1, len(b) + 1)],
                    name=f"{name} iteration starts",
                    marker=dict(size=5, color=c, symbol="square"),
                )
            )
        ext = extrapolation(y, int(opts.get("extrapolate") or 0))
        if ext is not None:
            fig.add_trace(
                go.Scatter3d(
                    x=ext[:, 0],
                    y=ext[:, 1],
                    z=ext[:, 2],
                    mode="lines",
                    name=f"{name} extrapolation",
                    line=dict(color=c, width=3, dash="dash"),
                )
            )
    fig.update_layout(
        title=_title(opts, method, label),
        height=750,
        scene=dict(xaxis_title=f"{method}1", yaxis_title=f"{method}2", zaxis_title=f"{method}3"),
    )
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)


def plot_interplay(res: dict[str, Any], path: Path, opts: dict[str, Any], label: str) -> None:
    steps = res["steps"]
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    x = (steps["progress"] + steps["progress_end"]) / 2  # middle of each step
    primary = "obi_wan_cosine" if opts.get("obi_wan") else "cosine"
    axes[0].plot(x, steps["cosine"], "-o", ms=3, label="cos(dP_t, dR_t)", alpha=1 if primary == "cosine" else 0.5)
    axes[0].plot(
        x,
        steps["obi_wan_cosine"],
        "-s",
        ms=3,
        label="obi-wan cos(dR_t, dP_t+1)",
        alpha=1 if primary != "cosine" else 0.5,
    )
    axes[0].set_ylabel("update cosine")
    axes[1].plot(x, steps["pearson"], "-o", ms=3, color="tab:green")
    axes[1].set_ylabel("Pearson r of\nweight changes")
    axes[2].plot(
        x, steps["policy_consecutive_cosine"], "-o", ms=3, color=COLOURS["policy"], label="policy cos(dP_t, dP_t+1)"
    )
    axes[2].plot(
        x, steps["reward_consecutive_cosine"], "-o", ms=3, color=COLOURS["reward"], label="reward cos(dR_t, dR_t+1)"
    )
    axes[2].set_ylabel("consecutive\nupdate cosine")
    axes[3].semilogy(
        x, steps["policy_speed"].where(steps["policy_speed"] > 0), "-o", ms=3, color=COLOURS["policy"], label="policy"
    )
    axes[3].semilogy(
        x, steps["reward_speed"].where(steps["reward_speed"] > 0), "-o", ms=3, color=COLOURS["reward"], label="reward"
    )
    axes[3].set_ylabel("|update| per\noptimizer step")
    axes[3].set_xlabel("training progress (iteration + fraction of its steps)")
    for ax in axes:
        for b in range(1, int(steps["iteration"].max()) + 1 if len(steps) else 0):
            ax.axvline(b, color="gray", ls=":", lw=1)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in axes[:3]:
        ax.axhline(0, color="black", lw=0.6)
    axes[0].set_title(f"{label}: policy-reward interplay over {res['n_params']:,} shared parameters", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- stage functions


def write_outputs(res: dict[str, Any], out: Path, opts: dict[str, Any], label: str) -> None:
    from workflow.io import write_csv, write_parquet

    write_parquet(res["steps"], out / "metrics.parquet")
    write_csv(res["steps"], out / "metrics.csv")
    write_parquet(res["iterations"], out / "metrics_iterations.parquet")
    write_csv(res["iterations"], out / "metrics_iterations.csv")
    coords = coordinates_table(res)
    write_parquet(coords, out / "coordinates.parquet")
    write_csv(coords, out / "coordinates.csv")
    for method in res["projections"]:
        plot_static(res, method, 2, out / f"{method}_2d.png", opts, label)
        plot_static(res, method, 3, out / f"{method}_3d.png", opts, label)
        plot_html(res, method, out / f"{method}_3d.html", opts, label)
    plot_interplay(res, out / "interplay.png", opts, label)
    summary = {
        "label": label,
        "options": opts,
        "n_params": res["n_params"],
        "n_tensors": len(res["keys"]),
        "snapshots": {n: len(t) for n, t in res["trajectories"].items()},
        "iterations": res["trajectories"]["policy"].n_iterations,
        "stream_seconds": res["stream_seconds"],
        "policy_dirs": [str(d) for d in res["trajectories"]["policy"].dirs],
        "reward_dirs": [str(d) for d in res["trajectories"]["reward"].dirs],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


def run(job: Any) -> None:
    """Stage function of ``plot_trajectories`` and ``plot_trajectories_upto``."""
    opts = options(job.config)
    policy_dirs = _as_list(job.input["policy"])
    reward_dirs = _as_list(job.input["reward"])
    label = job.wildcards.get("method", "trajectories")
    if "k" in job.wildcards:
        label += f" (iterations 0..{int(job.wildcards['k']) - 1})"
    res = analyse(policy_dirs, reward_dirs, opts, seed=job.seed)
    with atomic_dir(job.output["plots"]) as out:
        write_outputs(res, out, opts, label)
    log.info("wrote %s", job.output["plots"])


def _read_csv(path: str | os.PathLike) -> pd.DataFrame | None:
    try:
        return pd.read_csv(path)
    except Exception as err:  # noqa: BLE001 - a method without results is shown as missing
        log.warning("cannot read %s: %s", path, err)
        return None


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


def compare(job: Any) -> None:
    """Stage function of ``compare_methods`` (inputs ``evaluation`` and ``plots``: lists in the
    order of ``params.methods``)."""
    methods = [str(m) for m in job.params.get("methods") or job.config["loop"]["methods"]]
    evaluations = _as_list(job.input["evaluation"])
    plots = _as_list(job.input.get("plots", []))
    gold, inter = [], []
    for j, m in enumerate(methods):
        ev = _read_csv(evaluations[j]) if j < len(evaluations) else None
        if ev is not None and {"iteration", "gold_mean"} <= set(ev.columns):
            ev = ev.assign(method=m)
            gold.append(ev)
        elif ev is not None:
            log.warning("%s lacks iteration/gold_mean columns", evaluations[j])
        mt = _read_csv(Path(plots[j]) / "metrics.csv") if j < len(plots) else None
        if mt is not None and "iteration" in mt.columns:
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


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="trajectory plots and interplay metrics")
    p.add_argument("--policy", nargs="+", required=True, help="policy stage/snapshots folders, one per iteration")
    p.add_argument("--reward", nargs="+", required=True, help="reward stage/snapshots folders, one per iteration")
    p.add_argument("--out", required=True)
    p.add_argument("--projections", nargs="+", default=DEFAULTS["projections"])
    p.add_argument("--reduce-dim", type=int, default=DEFAULTS["reduce_dim"])
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--max-snapshots", type=int, default=None)
    p.add_argument("--extrapolate", type=int, default=DEFAULTS["extrapolate"])
    p.add_argument("--obi-wan", action="store_true")
    p.add_argument("--keep-rm", action="store_true")
    p.add_argument("--keep-rm-alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    opts = dict(
        projections=a.projections,
        reduce_dim=a.reduce_dim,
        layer=a.layer,
        obi_wan=a.obi_wan,
        keep_rm=a.keep_rm,
        max_snapshots=a.max_snapshots,
        extrapolate=a.extrapolate,
        keep_rm_alpha=a.keep_rm_alpha,
    )
    res = analyse(a.policy, a.reward, opts, seed=a.seed)
    with atomic_dir(a.out) as out:
        write_outputs(res, out, opts, "trajectories")


if __name__ == "__main__":
    main()
