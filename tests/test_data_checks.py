"""Data accounting of the training stages (rows read, dropped and why), and damaged files or wrong
layouts failing with errors that name the file (and what is wrong)."""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from workflow.data.accounting import DataError, DataWarning, usable_rows
from workflow.io import DataFileError, read_table, write_parquet
from workflow.job import Job
from workflow.models.loading import load_policy, load_reward_model, load_tokenizer, read_rows
from workflow.models.snapshots import load_snapshot, read_index, save_snapshot

REPO = Path(__file__).resolve().parents[1]
LONG = "word " * 200  # far more than model.max_length (128) tokens


@pytest.fixture(scope="module")
def cfg() -> dict:
    config = copy.deepcopy(yaml.safe_load((REPO / "config.yaml").read_text()))
    config["snapshots"]["every"] = 0.5
    return config


def _rows(embedded_frames, n: int = 16) -> pd.DataFrame:
    """The first ``n`` embedded training rows as ``read_rows`` gives them (plain message lists)."""
    rows = embedded_frames["train"].head(n).copy()
    for column in ("prompt", "chosen", "rejected"):
        rows[column] = [[dict(m) for m in v] for v in rows[column]]
    return rows.reset_index(drop=True)


def _answer(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _with_long_prompts(rows: pd.DataFrame, at: list[int]) -> pd.DataFrame:
    rows = rows.copy()
    for i in at:
        rows.at[i, "prompt"] = [{"role": "user", "content": LONG}]
    return rows


def _sft_job(tmp_path: Path, train: str, cfg: dict, base: str) -> Job:
    out = tmp_path / "sft"
    return Job(
        input={"train": train},
        params={"base": base},
        config=cfg,
        wildcards={},
        output={
            "adapter": str(out / "adapter"),
            "snapshots": str(out / "snapshots"),
            "metrics": str(out / "metrics.csv"),
        },
    )


def test_valid_rows_are_used_unchanged(tiny_base, embedded_frames):
    """On valid data nothing is dropped and the very same rows go on (results cannot change)."""
    rows = _rows(embedded_frames, 64)
    tokenizer = load_tokenizer(tiny_base, "chat")
    for kind in ("prompts", "sft", "pairs", "scores"):
        length = {"generation_length": 24} if kind == "prompts" else {}
        kept, counts = usable_rows(rows, tokenizer, 128, kind, "train.parquet", **length)
        assert kept is rows and counts["rows_read"] == counts["rows_used"] == 64
        assert counts["dropped_too_long"] == counts["dropped_empty"] == counts["dropped_identical"] == 0


def test_usable_rows_counts_each_reason(tiny_base, embedded_frames):
    rows = _with_long_prompts(_rows(embedded_frames), [0])
    rows.at[1, "rejected"] = rows.at[1, "chosen"]  # identical pair
    rows.at[2, "rejected"] = _answer("  ")  # empty rejected answer
    rows.at[3, "chosen"] = _answer("")  # empty chosen answer
    tokenizer = load_tokenizer(tiny_base, "chat")
    with pytest.warns(
        DataWarning,
        match=r"16 rows, 14 used; 1 dropped as longer than model.max_length \(128 "
        r"tokens\); 1 dropped for identical .*; 2 kept with an empty",
    ):
        kept, counts = usable_rows(rows, tokenizer, 128, "pairs", "pairs.parquet")
    assert counts == {
        "rows_read": 16,
        "rows_used": 14,
        "dropped_too_long": 1,
        "dropped_empty": 0,
        "dropped_identical": 1,
        "kept_empty": 2,
        "truncated": 0,
    }
    assert kept["prompt"].tolist() == rows["prompt"].drop([0, 1]).tolist()
    # regression on scores never compares the two answers; SFT uses the chosen answer only
    with pytest.warns(DataWarning, match="15 used"):
        assert usable_rows(rows, tokenizer, 128, "scores", "x")[1]["dropped_identical"] == 0
    with pytest.warns(DataWarning, match="1 dropped for an empty chosen answer"):
        kept, counts = usable_rows(rows, tokenizer, 128, "sft", "x")
    assert (counts["rows_used"], counts["dropped_too_long"], counts["dropped_empty"]) == (14, 1, 1)
    with pytest.warns(DataWarning, match="1 dropped as longer"):
        assert usable_rows(rows, tokenizer, 128, "prompts", "x", generation_length=24)[1]["rows_used"] == 15


def test_a_policy_prompt_must_leave_room_for_its_answer(tiny_base, embedded_frames):
    """The reward model reads model.max_length tokens: a prompt longer than max_length minus
    generation_length would have its sampled answers scored cut (the reference's rule)."""
    from workflow.data.accounting import token_counts

    rows = _rows(embedded_frames)
    tokenizer = load_tokenizer(tiny_base, "chat")
    lengths = token_counts(tokenizer, [list(p) for p in rows["prompt"]], generation_prompt=True)
    longest = int(lengths.max())
    kept, _ = usable_rows(rows, tokenizer, longest + 24, "prompts", "x", generation_length=24)
    assert kept is rows  # every prompt fits with 24 answer tokens
    with pytest.warns(
        DataWarning, match=rf"dropped as longer than model.max_length - model.generation_length \({longest - 1} tokens"
    ):
        kept, counts = usable_rows(rows, tokenizer, longest + 23, "prompts", "x", generation_length=24)
    assert (
        counts["dropped_too_long"] == int((lengths == longest).sum())
        and len(kept) == len(rows) - counts["dropped_too_long"]
    )
    with pytest.raises(ValueError, match="generation_length"):
        usable_rows(rows, tokenizer, 128, "prompts", "x")


def test_split_without_usable_rows_fails_naming_max_length_and_file(tiny_base, embedded_frames, cfg, tmp_path):
    from workflow.train import sft

    train = tmp_path / "train.parquet"
    rows = _rows(embedded_frames, 8)
    write_parquet(_with_long_prompts(rows, list(range(8))), train)
    with pytest.raises(
        DataError,
        match=re.escape(str(train)) + r": none of its 8 rows is usable \(8 dropped as "
        r"longer than model.max_length \(128 tokens\)\)",
    ):
        sft.run(_sft_job(tmp_path, str(train), cfg, tiny_base))
    assert not (tmp_path / "sft").exists() or not any((tmp_path / "sft").iterdir())
    # the same rows fit a larger model.max_length (the error's advice)
    tokenizer = load_tokenizer(tiny_base, "chat")
    assert usable_rows(read_rows(str(train)), tokenizer, 4096, "sft", str(train))[1]["rows_used"] == 8


@pytest.mark.slow
def test_sft_metrics_account_for_dropped_rows_and_stale_scratch_is_removed(tiny_base, embedded_frames, cfg, tmp_path):
    """SFT drops too-long and empty-answer rows and says so in metrics.csv; the scratch folders a
    killed run left (fixed names) are gone after the next run."""
    from workflow.train import sft

    train = tmp_path / "train.parquet"
    rows = _with_long_prompts(_rows(embedded_frames), [0, 5])
    rows.at[7, "chosen"] = _answer("")
    write_parquet(rows, train)
    out = tmp_path / "sft"
    for stale in (".adapter.tmp", ".snapshots.tmp", ".trainer.tmp"):  # what SIGKILL used to leave
        (out / stale / "checkpoint-1").mkdir(parents=True)
    with pytest.warns(DataWarning, match=re.escape(str(train)) + ": 16 rows, 13 used"):
        sft.run(_sft_job(tmp_path, str(train), cfg, tiny_base))
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "metrics.csv", "snapshots"]
    summary = pd.read_csv(out / "metrics.csv").iloc[-1]
    assert (summary["rows_read"], summary["rows_used"], summary["rows"]) == (16, 13, 13)
    assert (summary["dropped_too_long"], summary["dropped_empty"], summary["dropped_identical"]) == (2, 1, 0)


@pytest.mark.slow
def test_reward_metrics_count_identical_pairs(tiny_base, embedded_frames, cfg, tmp_path):
    from workflow.train.reward import train_reward

    rows = _rows(embedded_frames)
    for i in (2, 4, 9):
        rows.at[i, "rejected"] = rows.at[i, "chosen"]
    rows.at[11, "rejected"] = _answer("")
    with pytest.warns(
        DataWarning,
        match=r"pairs.parquet: 16 rows, 13 used; 3 dropped for identical chosen and "
        r"rejected answers; 1 kept with an empty",
    ):
        summary = train_reward(
            tiny_base,
            None,
            rows,
            None,
            tmp_path,
            cfg,
            epochs=1,
            learning_rate=1e-3,
            seed=0,
            task="chat",
            batch_size=8,
            max_steps=1,
            source="pairs.parquet",
        )
    metrics = pd.read_csv(tmp_path / "metrics.csv").iloc[-1]
    for key, value in {"rows": 13, "rows_read": 16, "rows_used": 13, "dropped_identical": 3, "kept_empty": 1}.items():
        assert summary[key] == value and metrics[key] == value


@pytest.mark.slow
def test_policy_metrics_account_for_too_long_prompts(tiny_base, adapters, embedded_frames, tmp_path):
    from test_policy import CFG

    from workflow.train import policy

    train = tmp_path / "train.parquet"
    write_parquet(_with_long_prompts(_rows(embedded_frames, 64), [3, 30]), train)
    config = copy.deepcopy(CFG)
    config["loop"]["iteration_fraction"] = 0.1
    out = tmp_path / "results" / "rloo" / "iter_0" / "policy"
    job = Job(
        input={
            "policy_prev": adapters["sft"],
            "sft": adapters["sft"],
            "reward": adapters["reward"],
            "train": str(train),
        },
        output={
            "adapter": str(out / "adapter"),
            "snapshots": str(out / "snapshots"),
            "metrics": str(out / "metrics.csv"),
            "samples": str(out / "samples.parquet"),
        },
        params={"base": tiny_base, "checkpoints": str(out / "checkpoints")},
        config=config,
        wildcards={"method": "rloo", "i": "0"},
    )
    with pytest.warns(DataWarning, match=re.escape(str(train)) + ": 64 rows, 62 used; 2 dropped as longer"):
        policy.run(job)
    summary = pd.read_csv(out / "metrics.csv").iloc[-1]
    assert (summary["rows_read"], summary["rows_used"], summary["dropped_too_long"]) == (64, 62, 2)
    assert summary["prompts"] == 7  # ceil(0.1 * 62) usable prompts, not ceil(0.1 * 64)
    samples = pd.read_parquet(out / "samples.parquet")
    assert not any(LONG in m["content"] for p in samples["prompt"] for m in p)


def _truncated_copy(adapter: str, tmp_path: Path) -> Path:
    """A copy of ``adapter`` whose weights file lost its second half (a killed write)."""
    bad = tmp_path / "adapter"
    shutil.copytree(adapter, bad)
    weights = bad / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return bad


def test_truncated_adapter_names_the_file(tiny_base, adapters, tmp_path):
    from workflow.models.lora import adapter_state
    from workflow.zo.trainer import load_adapter_tensors

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
    from workflow.analysis.trajectories import read_header

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
    pd.DataFrame({"prompt": [[{"role": "user", "content": "q"}]], "chosen": [message], "reject": [message]}).to_parquet(
        path
    )
    with pytest.raises(DataFileError, match=re.escape(str(path)) + r".*'rejected'.*has 'prompt', 'chosen', 'reject'"):
        read_rows(str(path))
    assert list(read_rows(str(path), ("prompt", "chosen")).columns) == ["prompt", "chosen", "reject"]
    with pytest.raises(DataFileError, match=re.escape(str(path)) + ".*'completion'"):
        read_table(path, ("prompt", "completion"))
