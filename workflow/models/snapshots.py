"""LoRA trajectories: snapshots of the trainable adapter tensors during training.

Format (docs/design.md, "Snapshots"): a folder with ``index.csv`` (columns ``snapshot``,
``step``, ``file``, in step order) and one ``step_{step:07d}.safetensors`` per snapshot holding
the trainable LoRA tensors (float32, normalised keys) of that optimizer step. Snapshot 0 is the
adapter before the first step, the last snapshot the final adapter.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from workflow.io import SNAPSHOT_INDEX as INDEX
from workflow.io import atomic_path, reading, write_csv
from workflow.io import read_snapshot_index as read_index

_ADAPTER_SEGMENT = re.compile(r"\.(modules_to_save|original_module)\.[^.]+(?=\.)")
_LORA_ADAPTER = re.compile(r"\.(lora_[A-Za-z_]+)\.[^.]+(?=\.)")


def normalise_key(key: str) -> str:
    """Adapter-independent name of a LoRA tensor, shared by policy and reward adapters.

    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`` (a parameter
    name) and ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (a saved
    adapter key) both become ``layers.0.self_attn.q_proj.lora_A.weight``; the reward head
    ``base_model.model.score.modules_to_save.default.weight`` becomes ``score.weight``.
    """
    key = _LORA_ADAPTER.sub(r".\1", key)  # drop the adapter name after lora_A / lora_B
    key = _ADAPTER_SEGMENT.sub("", key)  # modules_to_save.<adapter> -> the module itself
    match = re.search(r"(^|\.)layers\.", key)
    if match:
        return key[match.start() + (1 if match.group(1) else 0) :]
    for prefix in ("module.", "base_model.model.", "model."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of ``model`` (LoRA matrices, reward head) as float32 CPU copies."""
    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            state[normalise_key(name)] = param.detach().to("cpu", torch.float32).clone().contiguous()
    return state


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path``; an error naming the file when it is truncated
    or damaged (safetensors' own header errors do not)."""
    with reading(path, "safetensors file"):
        return load_file(str(path))


def save_snapshot(
    model_or_state: torch.nn.Module | dict[str, torch.Tensor], out_dir: str | os.PathLike, step: int
) -> Path:
    """Write the snapshot of ``step`` and rewrite ``index.csv`` atomically; returns the file path.

    Saving a step that is already indexed replaces it (no duplicate rows).
    """
    state = model_or_state if isinstance(model_or_state, dict) else lora_state(model_or_state)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"step_{int(step):07d}.safetensors"
    with atomic_path(out / name) as tmp:
        save_file(state, str(tmp), metadata={"step": str(int(step))})
    index = read_index(out)
    index = index[index["step"] != int(step)]
    index = pd.concat([index, pd.DataFrame({"snapshot": [0], "step": [int(step)], "file": [name]})])
    index = index.sort_values("step").reset_index(drop=True)
    index["snapshot"] = range(len(index))
    write_csv(index[["snapshot", "step", "file"]], out / INDEX)
    return out / name


def load_snapshot(directory: str | os.PathLike, n: int) -> dict[str, torch.Tensor]:
    """Tensors of snapshot ``n`` (position in the index; negative counts from the end)."""
    index = read_index(directory)
    return load_tensors(Path(directory) / index["file"].iloc[int(n)])


def snapshot_interval(every: float, max_steps: int) -> int:
    """Optimizer steps between two snapshots: ``ceil(every * max_steps)``, at least 1."""
    return max(1, math.ceil(float(every) * max(1, int(max_steps)) - 1e-9))


class SnapshotCallback(TrainerCallback):
    """Save the trainable LoRA tensors before training, every ``ceil(every * max_steps)``
    optimizer steps, and after the last step (never twice for the same step).

    Every process writes to its own ``out_dir``: in data-parallel runs the job bridge
    (``workflow.job``) gives processes other than rank 0 scratch outputs, so their snapshots can
    be compared with rank 0's. ``out_dir`` should be a fresh folder (e.g. inside
    ``workflow.io.atomic_dir``) or one cut back to the step a resumed run starts from
    (``workflow.train.resume.StageCheckpoints``).
    """

    def __init__(self, every: float, out_dir: str | os.PathLike):
        self.every = float(every)
        self.out_dir = Path(out_dir)
        self.interval = 1
        self.saved: list[int] = []

    def _save(self, state: Any, model: torch.nn.Module | None) -> None:
        if model is None:
            return
        if self.saved and self.saved[-1] == state.global_step:
            return
        save_snapshot(model, self.out_dir, state.global_step)
        self.saved.append(state.global_step)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.interval = snapshot_interval(self.every, state.max_steps)
        self._save(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.interval == 0:
            self._save(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._save(state, model)
