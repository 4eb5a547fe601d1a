"""Damaged files and wrong layouts fail with errors that name the file (and what is wrong)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from workflow.io import DataFileError, read_table
from workflow.models import load_policy, load_reward_model, read_rows
from workflow.snapshots import load_snapshot, read_index, save_snapshot


def _truncated_copy(adapter: str, tmp_path: Path) -> Path:
    """A copy of ``adapter`` whose weights file lost its second half (a killed write)."""
    bad = tmp_path / "adapter"
    shutil.copytree(adapter, bad)
    weights = bad / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return bad


def test_truncated_adapter_names_the_file(tiny_base, adapters, tmp_path):
    from workflow.policy import adapter_state
    from workflow.zopro import load_adapter_tensors

    policy = _truncated_copy(adapters["sft"], tmp_path / "policy")
    for load in (lambda: load_policy(tiny_base, str(policy)), lambda: adapter_state(policy)):
        with pytest.raises(DataFileError, match=re.escape(str(policy))) as err:
            load()
        assert "damaged" in str(err.value) and "SafetensorError" in str(err.value)
    with pytest.raises(DataFileError, match=re.escape(str(policy / "adapter_model.safetensors"))):
        load_adapter_tensors(policy)
    reward = _truncated_copy(adapters["reward"], tmp_path / "reward")
    with pytest.raises(DataFileError, match=re.escape(str(reward))):
        load_reward_model(tiny_base, str(reward))


def test_damaged_snapshot_and_index_name_the_file(tmp_path):
    from workflow.trajectories import read_header

    path = save_snapshot({"layers.0.q.lora_A.weight": torch.ones(4, 4)}, tmp_path, step=3)
    assert torch.equal(load_snapshot(tmp_path, 0)["layers.0.q.lora_A.weight"], torch.ones(4, 4))
    data = path.read_bytes()
    path.write_bytes(data[:8] + data[8:20])  # the header length survives, the header does not
    with pytest.raises(DataFileError, match=re.escape(str(path))):
        load_snapshot(tmp_path, 0)
    with pytest.raises(DataFileError, match=re.escape(str(path))):
        read_header(path)
    index = tmp_path / "index.csv"
    index.write_text("")
    with pytest.raises(DataFileError, match=re.escape(str(index))):
        read_index(tmp_path)
    index.write_text("snapshot,step\n0,3\n")
    with pytest.raises(DataFileError, match=re.escape(str(index)) + ".*file"):
        read_index(tmp_path)


def test_rows_file_with_wrong_columns_names_the_file_and_column(tmp_path):
    path = tmp_path / "pairs.parquet"
    message = [{"role": "assistant", "content": "x"}]
    pd.DataFrame({"prompt": [[{"role": "user", "content": "q"}]], "chosen": [message],
                  "reject": [message]}).to_parquet(path)
    with pytest.raises(DataFileError, match=re.escape(str(path)) + r".*'rejected'.*it has 'prompt', 'chosen', 'reject'"):
        read_rows(str(path))
    assert list(read_rows(str(path), ("prompt", "chosen")).columns) == ["prompt", "chosen", "reject"]
    with pytest.raises(DataFileError, match=re.escape(str(path)) + ".*'completion'"):
        read_table(path, ("prompt", "completion"))
