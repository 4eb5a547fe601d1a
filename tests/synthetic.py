"""Synthetic trajectories in the snapshot format, for the trajectory and plotting tests."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from workflow.io import SNAPSHOT_INDEX


def write_stage(
    directory: str | os.PathLike, snapshots: Sequence[dict[str, np.ndarray]], steps: Sequence[int] | None = None
) -> Path:
    """Write ``snapshots`` (key -> array) in the snapshot format into ``directory/snapshots``
    (training stages use ``workflow.models.snapshots``)."""
    from safetensors.numpy import save_file

    sd = Path(directory) / "snapshots"
    sd.mkdir(parents=True, exist_ok=True)
    steps = list(range(len(snapshots))) if steps is None else [int(s) for s in steps]
    files = []
    for state, step in zip(snapshots, steps):
        name = f"step_{step:07d}.safetensors"
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}, str(sd / name))
        files.append(name)
    pd.DataFrame({"snapshot": range(len(files)), "step": steps, "file": files}).to_csv(sd / SNAPSHOT_INDEX, index=False)
    return sd
