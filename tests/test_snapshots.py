"""Snapshot format: schedule, index, normalised keys, files readable alone."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState, TrainingArguments

from workflow.models.snapshots import (
    SnapshotCallback,
    load_snapshot,
    lora_state,
    normalise_key,
    read_index,
    save_snapshot,
)


@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
            "layers.0.self_attn.q_proj.lora_A.weight",
        ),
        ("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight", "layers.1.mlp.down_proj.lora_B.weight"),
        (
            "module.base_model.model.model.layers.3.mlp.up_proj.lora_B.policy.weight",
            "layers.3.mlp.up_proj.lora_B.weight",
        ),
        ("base_model.model.score.modules_to_save.default.weight", "score.weight"),
        ("base_model.model.score.weight", "score.weight"),
    ],
)
def test_normalise_key(name, expected):
    assert normalise_key(name) == expected


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lora_A = torch.nn.Linear(3, 2, bias=False)
        self.frozen = torch.nn.Linear(2, 2, bias=False)
        self.frozen.weight.requires_grad_(False)


def _drive(callback, model, max_steps):
    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    state, control = TrainerState(max_steps=max_steps), TrainerControl()
    callback.on_train_begin(args, state, control, model=model)
    for step in range(1, max_steps + 1):
        state.global_step = step
        with torch.no_grad():
            model.lora_A.weight.add_(1.0)
        callback.on_step_end(args, state, control, model=model)
    callback.on_train_end(args, state, control, model=model)


@pytest.mark.parametrize(
    "every, steps, expected",
    [
        (0.25, 8, [0, 2, 4, 6, 8]),
        (0.3, 10, [0, 3, 6, 9, 10]),  # the final adapter is always saved
        (0.05, 7, list(range(8))),  # never fewer than one step apart
        (1.0, 5, [0, 5]),
    ],
)
def test_schedule_and_index(tmp_path, every, steps, expected):
    model = _Toy()
    _drive(SnapshotCallback(every, tmp_path), model, steps)
    index = read_index(tmp_path)
    assert list(index.columns) == ["snapshot", "step", "file"]
    assert index["step"].tolist() == expected
    assert index["snapshot"].tolist() == list(range(len(expected)))
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == index["file"].tolist()
    # snapshot n holds the weights of its step; only trainable tensors, float32
    for n in range(len(expected)):
        tensors = load_file(str(tmp_path / index["file"][n]))
        assert set(tensors) == {"lora_A.weight"}
        assert tensors["lora_A.weight"].dtype == torch.float32
    first, last = load_snapshot(tmp_path, 0), load_snapshot(tmp_path, -1)
    assert torch.allclose(last["lora_A.weight"] - first["lora_A.weight"], torch.full((2, 3), float(steps)))


def test_save_snapshot_replaces_same_step(tmp_path):
    save_snapshot({"a": torch.zeros(2)}, tmp_path, 0)
    save_snapshot({"a": torch.ones(2)}, tmp_path, 5)
    save_snapshot({"a": torch.full((2,), 2.0)}, tmp_path, 5)
    index = read_index(tmp_path)
    assert index["step"].tolist() == [0, 5]
    assert torch.equal(load_snapshot(tmp_path, 1)["a"], torch.full((2,), 2.0))
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_lora_state_is_a_detached_copy():
    model = _Toy()
    state = lora_state(model)
    assert set(state) == {"lora_A.weight"}
    with torch.no_grad():
        model.lora_A.weight.add_(1.0)
    assert not torch.equal(state["lora_A.weight"], model.lora_A.weight)


def test_read_index_empty(tmp_path):
    assert isinstance(read_index(tmp_path), pd.DataFrame) and read_index(tmp_path).empty
