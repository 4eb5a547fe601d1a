"""Peak memory and wall time of the trajectory / interplay / plots pipeline at scale.

Writes synthetic policy and reward trajectories in the snapshot format (docs/design.md), then
runs ``python -m workflow.analysis.plots`` on them as a subprocess and measures its peak RSS
(``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``) and wall time. Target: peak < 1 GB.

Default scale: 200 snapshots x 20M LoRA parameters per model (policy and reward), split over
``--iterations`` iterations: a Llama-1B-like LoRA (hidden 2048, intermediate 5632, rank 16,
7 modules per layer, 32 layers = 20.2M parameters) — 2 x 200 x 80 MB = ~32 GB of float32
files. Before writing, free disk space is checked: when it is short the number of parameters
is scaled down to fit (the scale used is printed and saved). Memory of the pipeline does not
grow with the number of parameters (it streams fixed-size chunks), only its time does.

    .venv/bin/python benchmarks/plots_memory.py --dir /work/bench_plots            # full scale
    .venv/bin/python benchmarks/plots_memory.py --dir /tmp/bp --params 2000000    # smaller
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from workflow.io import atomic_path  # noqa: E402

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_shapes(params: int, hidden: int = 2048, intermediate: int = 5632, r: int = 16) -> dict:
    """LoRA A/B shapes of a Llama-like model with as many layers as needed for ``params``;
    small targets shrink ``hidden`` / ``intermediate`` so that at least one layer fits."""

    def per_layer(h, m):
        return r * (4 * 2 * h + 3 * (h + m))

    while per_layer(hidden, intermediate) > params and hidden > 16:
        hidden, intermediate = hidden // 2, intermediate // 2
    layers = max(1, round(params / per_layer(hidden, intermediate)))
    dims = {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, hidden),
        "v_proj": (hidden, hidden),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }
    shapes = {}
    for layer in range(layers):
        for mod in MODULES:
            fan_in, fan_out = dims[mod]
            group = "self_attn" if mod.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            shapes[f"layers.{layer}.{group}.{mod}.lora_A.weight"] = (r, fan_in)
            shapes[f"layers.{layer}.{group}.{mod}.lora_B.weight"] = (fan_out, r)
    return shapes


def write_trajectories(root: Path, shapes: dict, snapshots: int, iterations: int, seed: int = 0) -> dict:
    """Policy and reward trajectories (random walks with a drift; the reward's drift is half
    the policy's plus its own) as ``results/{bench,reward}`` stage folders."""
    from safetensors.numpy import save_file

    n = sum(int(np.prod(s)) for s in shapes.values())
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(n + 1_000_003, dtype=np.float32)  # noise: random windows of a pool
    drift_p = rng.standard_normal(n, dtype=np.float32)
    drift_r = 0.5 * drift_p + rng.standard_normal(n, dtype=np.float32)
    per_iter = [len(a) for a in np.array_split(np.arange(snapshots), iterations)]
    dirs = {"policy": [], "reward": []}
    for name, drift in (("policy", drift_p), ("reward", drift_r)):
        state = 0.01 * rng.standard_normal(n, dtype=np.float32)
        for i in range(iterations):
            stage = root / ("results/bench" if name == "policy" else "results/reward") / f"iter_{i}"
            sd = stage / "snapshots"
            sd.mkdir(parents=True, exist_ok=True)
            rows = []
            for j in range(per_iter[i]):
                if j:  # snapshot 0 of an iteration is the previous iteration's final weights
                    off = int(rng.integers(0, 1_000_000))
                    state += 1e-4 * drift + 1e-4 * pool[off : off + n]
                tensors, start = {}, 0
                for key, shape in shapes.items():
                    size = int(np.prod(shape))
                    tensors[key] = state[start : start + size].reshape(shape)
                    start += size
                if name == "reward":
                    tensors["score.weight"] = np.ones((1, 16), dtype=np.float32)
                step = 10 * j
                save_file(tensors, str(sd / f"step_{step:07d}.safetensors"))
                rows.append((j, step, f"step_{step:07d}.safetensors"))
            pd.DataFrame(rows, columns=["snapshot", "step", "file"]).to_csv(sd / "index.csv", index=False)
            dirs[name].append(str(stage))
    return dirs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="folder for the synthetic data and outputs")
    p.add_argument("--snapshots", type=int, default=200, help="snapshots per model (all iterations)")
    p.add_argument("--params", type=int, default=20_000_000, help="LoRA parameters per model")
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--reduce-dim", type=int, default=100)
    p.add_argument("--projections", nargs="+", default=["pca", "tsne"])
    p.add_argument("--reuse", action="store_true", help="reuse data already in --dir")
    p.add_argument("--cleanup", action="store_true", help="delete the synthetic data afterwards")
    p.add_argument("--disk-margin-gb", type=float, default=8.0)
    a = p.parse_args(argv)
    root = Path(a.dir)
    root.mkdir(parents=True, exist_ok=True)
    meta_path = root / "bench_data.json"
    if a.reuse and meta_path.exists():
        meta = json.loads(meta_path.read_text())
    else:
        free = shutil.disk_usage(root).free
        params = a.params
        need = lambda prm: 2 * a.snapshots * prm * 4 * 1.01  # noqa: E731
        if need(params) > free - a.disk_margin_gb * 1e9:
            params = int(max(1e5, (free - a.disk_margin_gb * 1e9) / (2 * a.snapshots * 4 * 1.01)))
            print(
                f"disk: {free / 1e9:.1f} GB free, {need(a.params) / 1e9:.1f} GB needed; "
                f"scaling down to {params:,} parameters per model",
                flush=True,
            )
        shapes = lora_shapes(params)
        n = sum(int(np.prod(s)) for s in shapes.values())
        print(
            f"writing 2 x {a.snapshots} snapshots of {n:,} parameters ({2 * a.snapshots * n * 4 / 1e9:.1f} GB) "
            f"into {root}",
            flush=True,
        )
        t0 = time.perf_counter()
        dirs = write_trajectories(root, shapes, a.snapshots, a.iterations)
        meta = {
            "dirs": dirs,
            "params": n,
            "snapshots": a.snapshots,
            "iterations": a.iterations,
            "write_seconds": time.perf_counter() - t0,
        }
        with atomic_path(meta_path) as tmp:  # written last: it marks the trajectories complete
            tmp.write_text(json.dumps(meta, indent=2))
        print(f"written in {meta['write_seconds']:.0f} s", flush=True)
    out = root / "plots"
    cmd = [
        sys.executable,
        "-m",
        "workflow.analysis.plots",
        "--policy",
        *meta["dirs"]["policy"],
        "--reward",
        *meta["dirs"]["reward"],
        "--out",
        str(out),
        "--reduce-dim",
        str(a.reduce_dim),
        "--projections",
        *a.projections,
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    if proc.returncode:
        raise SystemExit(f"pipeline failed with exit code {proc.returncode}")
    summary = json.loads((out / "summary.json").read_text())
    result = {
        "params_per_model": meta["params"],
        "snapshots_per_model": meta["snapshots"],
        "iterations": meta["iterations"],
        "data_gb": 2 * meta["snapshots"] * meta["params"] * 4 / 1e9,
        "reduce_dim": a.reduce_dim,
        "projections": a.projections,
        "peak_rss_mb": round(peak_mb, 1),
        "wall_seconds": round(wall, 1),
        "stream_seconds": round(summary["stream_seconds"], 1),
        "target_peak_mb": 1024,
        "ok": peak_mb < 1024,
    }
    with atomic_path(root / "plots_memory.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if a.cleanup:
        for d in ("results",):
            shutil.rmtree(root / d, ignore_errors=True)


if __name__ == "__main__":
    main()
