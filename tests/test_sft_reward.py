"""SFT and reward stages on the tiny base: adapters, snapshots, objectives (a few steps each)."""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from workflow.models.loading import load_tokenizer, read_rows
from workflow.models.snapshots import load_snapshot, normalise_key, read_index
from workflow.train.reward import pairwise_accuracy, train_reward
from workflow.train.sft import build_sft_trainer, train_sft

REPO = Path(__file__).resolve().parents[1]
WMT = REPO.parent / "shared" / "data" / "wmt20-mlqe-en-de" / "dev.ende.df.short.tsv"


@pytest.fixture(scope="module")
def cfg():
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config = copy.deepcopy(config)
    config["snapshots"]["every"] = 0.25
    return config


@pytest.fixture(scope="module")
def rows(embedded_parquet):
    return {split: read_rows(path) for split, path in embedded_parquet.items()}


@pytest.fixture(scope="module")
def sft_dir(tiny_base, rows, cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    summary = train_sft(
        tiny_base, rows["train"], out, cfg, epochs=1, learning_rate=5e-3, batch_size=8, seed=0, task="chat", max_steps=8
    )
    assert summary["steps"] == 8
    return out


@pytest.fixture(scope="module")
def reward_dir(tiny_base, rows, cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("reward")
    summary = train_reward(
        tiny_base,
        None,
        rows["train"],
        rows["test"],
        out,
        cfg,
        epochs=1,
        learning_rate=5e-3,
        seed=0,
        task="chat",
        batch_size=8,
        max_steps=8,
    )
    assert summary["steps"] == 8 and 0 <= summary["heldout_accuracy"] <= 1
    return out


def _adapter_state(adapter_dir) -> dict[str, torch.Tensor]:
    return {normalise_key(k): v for k, v in load_file(str(Path(adapter_dir) / "adapter_model.safetensors")).items()}


def test_sft_outputs_and_plain_peft_load(sft_dir, tiny_base):
    assert sorted(p.name for p in sft_dir.iterdir()) == ["adapter", "metrics.csv", "snapshots"]
    assert read_index(sft_dir / "snapshots")["step"].tolist() == [0, 2, 4, 6, 8]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(sft_dir / "adapter"))
    assert model.peft_config["default"].lora_alpha == 2 * model.peft_config["default"].r
    # the last snapshot is the saved adapter, the first one the LoRA initialisation (B = 0)
    last, first = load_snapshot(sft_dir / "snapshots", -1), load_snapshot(sft_dir / "snapshots", 0)
    saved = _adapter_state(sft_dir / "adapter")
    assert set(last) == set(saved) and all(torch.allclose(last[k], saved[k].float()) for k in saved)
    assert all(float(v.abs().max()) == 0 for k, v in first.items() if "lora_B" in k)
    metrics = pd.read_csv(sft_dir / "metrics.csv")
    assert "loss" in metrics and metrics["step"].max() == 8
    tokenizer = load_tokenizer(str(sft_dir / "adapter"), "chat")
    assert tokenizer.chat_template and tokenizer.pad_token


def test_sft_loss_covers_answer_tokens_only(tiny_base, rows, cfg, tmp_path):
    tokenizer = load_tokenizer(tiny_base, "chat")
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    trainer = build_sft_trainer(model, tokenizer, rows["train"].head(4), cfg, str(tmp_path), 1, 1e-3, 2, 0)
    example = trainer.train_dataset[0]
    ids, labels = example["input_ids"], example["labels"]
    answer = [t for t, label in zip(ids, labels) if label != -100]
    prompt = [t for t, label in zip(ids, labels) if label == -100]
    assert ids[: len(prompt)] == prompt  # the masked tokens are exactly the prompt prefix
    assert tokenizer.decode(answer).startswith(rows["train"]["chosen"][0][0]["content"])
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_checkpointing_follows_the_config(checkpointing, tiny_base, rows, cfg, tmp_path):
    """trl's configs turn gradient checkpointing on; the trainers recompute activations only when the
    config's ``activation_checkpointing`` says so (default off)."""
    from workflow.models.lora import lora_config

    tokenizer = load_tokenizer(tiny_base, "chat")
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    config = {**cfg, "activation_checkpointing": checkpointing}
    peft = lora_config(config, "CAUSAL_LM")
    trainer = build_sft_trainer(
        model, tokenizer, rows["train"].head(4), config, str(tmp_path), 1, 1e-3, 2, 0, peft_config=peft, max_steps=1
    )
    trainer.train()
    assert trainer.args.activation_checkpointing is checkpointing
    assert trainer.model.get_base_model().is_activation_checkpointing is checkpointing


def test_reward_outputs_keys_shared_with_policy(reward_dir, sft_dir, tiny_base):
    steps = read_index(reward_dir / "snapshots")["step"].tolist()
    assert steps == [0, 2, 4, 6, 8]
    reward_keys, policy_keys = (
        set(load_snapshot(reward_dir / "snapshots", 1)),
        set(load_snapshot(sft_dir / "snapshots", 1)),
    )
    assert reward_keys - policy_keys == {"score.weight"} and policy_keys <= reward_keys
    assert all(k.startswith("layers.") for k in policy_keys)
    # plain peft load of the reward adapter restores the trained head
    base = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1)
    model = PeftModel.from_pretrained(base, str(reward_dir / "adapter"))
    head = [p for n, p in model.named_parameters() if normalise_key(n) == "score.weight" and "modules_to_save" in n]
    assert torch.allclose(head[0].float(), load_snapshot(reward_dir / "snapshots", -1)["score.weight"])
    metrics = pd.read_csv(reward_dir / "metrics.csv")
    assert metrics["heldout_accuracy"].notna().any() and metrics["heldout_accuracy"].dropna().between(0, 1).all()


def test_refinement_continues_from_init_adapter(reward_dir, tiny_base, rows, cfg, tmp_path):
    train = rows["train"].head(16)
    summary = train_reward(
        tiny_base,
        str(reward_dir / "adapter"),
        train,
        None,
        tmp_path,
        cfg,
        epochs=1,
        learning_rate=1e-3,
        seed=1,
        task="chat",
        batch_size=8,
    )
    assert summary["init_adapter"] and summary["steps"] == 2
    start, previous = load_snapshot(tmp_path / "snapshots", 0), load_snapshot(reward_dir / "snapshots", -1)
    assert set(start) == set(previous) and all(torch.allclose(start[k], previous[k]) for k in start)


def test_sft_is_deterministic_on_cpu(tiny_base, rows, cfg, tmp_path):
    finals = []
    for run in ("a", "b"):
        train_sft(tiny_base, rows["train"], tmp_path / run, cfg, 1, 5e-3, 8, seed=3, task="chat", max_steps=3)
        finals.append(load_snapshot(tmp_path / run / "snapshots", -1))
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_mt_regression_reduces_loss(tiny_base, cfg, tmp_path):
    if not WMT.exists():
        pytest.skip(f"WMT20 MLQE sample not found at {WMT}")
    from workflow.data.extract import extract

    mt = extract("wmt20", "test", files={"test": str(WMT)})
    assert "score" in mt
    tokenizer = load_tokenizer(tiny_base, "mt")
    fits = [
        len(tokenizer.apply_chat_template(p + c)) <= cfg["model"]["max_length"]
        and len(tokenizer.apply_chat_template(p + r)) <= cfg["model"]["max_length"]
        for p, c, r in zip(mt["prompt"], mt["chosen"], mt["rejected"])
    ]
    mt = mt[fits].head(16).reset_index(drop=True)
    assert len(mt) == 16
    mt_cfg = copy.deepcopy(cfg)
    mt_cfg["reward"]["score_objective"] = "regression"
    # one full batch per step: the logged loss of step t is the MSE on all rows before update t
    summary = train_reward(
        tiny_base, None, mt, mt, tmp_path, mt_cfg, epochs=8, learning_rate=2e-3, seed=0, task="mt", batch_size=16
    )
    assert summary["objective"] == "regression" and summary["steps"] == 8
    metrics = pd.read_csv(tmp_path / "metrics.csv").dropna(subset=["mse"])
    assert metrics["mse"].iloc[-1] < metrics["mse"].iloc[0]


def test_pairwise_accuracy_counts_ties_half(tiny_base, rows):
    from workflow.models.loading import load_sequence_classifier

    tokenizer = load_tokenizer(tiny_base, "chat")
    model = load_sequence_classifier(tiny_base, tokenizer.pad_token_id)
    same = rows["test"].head(4).copy()
    same["rejected"] = same["chosen"]
    assert pairwise_accuracy(model, tokenizer, same) == 0.5
