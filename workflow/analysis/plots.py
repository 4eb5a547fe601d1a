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

    python -m workflow.analysis.plots --policy P0 P1 --reward R0 R1 --out DIR [--reduce-dim 100] ...
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

if TYPE_CHECKING:
    from workflow.job import Job

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from workflow.analysis import interplay as ip  # noqa: E402
from workflow.analysis import projections as proj  # noqa: E402
from workflow.analysis import trajectories as tj  # noqa: E402
from workflow.io import as_paths, atomic_dir  # noqa: E402
from workflow.schema import section, setting

log = logging.getLogger(__name__)

COLOURS = {"policy": "tab:blue", "reward": "tab:orange"}


def options(config: dict[str, Any]) -> dict[str, Any]:
    """``config["plots"]`` over the schema's defaults, plus ``keep_rm_alpha`` from ``config["loop"]``."""
    return {**section(config, "plots"), "keep_rm_alpha": float(setting(config, "loop.keep_rm_alpha"))}


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
    for method in ["pca"] + [m for m in proj.available_projections(opts["projections"]) if m != "pca"]:
        for k in (2, 3):
            y = proj.embed(joint, method, k, seed=seed)
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
        projections=[m for m in proj.available_projections(opts["projections"])],
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

    def trace(points: np.ndarray, **style: Any) -> None:
        fig.add_trace(go.Scatter3d(x=points[:, 0], y=points[:, 1], z=points[:, 2], **style))

    for name, traj in res["trajectories"].items():
        y = emb[name]
        c = COLOURS[name].replace("tab:", "")
        hover = [f"{name} iteration {i}, step {s}" for i, s in zip(traj.iteration, traj.steps)]
        trace(
            y,
            mode="lines+markers",
            name=name,
            text=hover,
            hoverinfo="text",
            line=dict(color=c, width=4),
            marker=dict(size=2, color=c),
        )
        trace(
            y[[0]],
            mode="markers",
            name=f"{name} start",
            marker=dict(size=7, color="white", line=dict(color=c, width=3)),
        )
        trace(y[[-1]], mode="markers", name=f"{name} end", marker=dict(size=8, color=c, symbol="diamond"))
        b = traj.boundaries[1:]
        if b:
            trace(
                y[b],
                mode="markers+text",
                text=[f"{name[0]}{i}" for i in range(1, len(b) + 1)],
                name=f"{name} iteration starts",
                marker=dict(size=5, color=c, symbol="square"),
            )
        ext = extrapolation(y, int(opts.get("extrapolate") or 0))
        if ext is not None:
            trace(ext, mode="lines", name=f"{name} extrapolation", line=dict(color=c, width=3, dash="dash"))
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


def run(job: Job) -> None:
    """Stage function of ``plot_trajectories`` and ``plot_trajectories_upto``."""
    opts = options(job.config)
    policy_dirs = as_paths(job.input["policy"])
    reward_dirs = as_paths(job.input["reward"])
    label = job.wildcards.get("method", "trajectories")
    if "k" in job.wildcards:
        label += f" (iterations 0..{int(job.wildcards['k']) - 1})"
    res = analyse(policy_dirs, reward_dirs, opts, seed=job.seed)
    with atomic_dir(job.output["plots"]) as out:
        write_outputs(res, out, opts, label)
    log.info("wrote %s", job.output["plots"])


def main(argv: list[str] | None = None) -> None:
    """Command line (``python -m workflow.analysis.plots``; benchmarks/plots_memory.py): the plots of stage
    folders with config.yaml's ``plots`` settings, ``--reduce-dim`` and ``--projections`` overriding."""
    import argparse

    p = argparse.ArgumentParser(description="trajectory plots and interplay metrics")
    p.add_argument("--policy", nargs="+", required=True, help="policy stage/snapshots folders, one per iteration")
    p.add_argument("--reward", nargs="+", required=True, help="reward stage/snapshots folders, one per iteration")
    p.add_argument("--out", required=True)
    p.add_argument("--reduce-dim", type=int)
    p.add_argument("--projections", nargs="+")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    opts = options({})
    opts.update({k: v for k, v in (("reduce_dim", a.reduce_dim), ("projections", a.projections)) if v is not None})
    res = analyse(a.policy, a.reward, opts, seed=a.seed)
    with atomic_dir(a.out) as out:
        write_outputs(res, out, opts, "trajectories")


if __name__ == "__main__":
    main()
