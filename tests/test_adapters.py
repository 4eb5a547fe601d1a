"""What saved adapters record: an absolute base path (so that they load from any working directory)
and the tag of the trainer that made them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import POLICY_TEST_LORA


def test_adapters_record_an_absolute_base_and_load_from_elsewhere(tiny_base, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM, get_peft_model

    from workflow.models.loading import load_causal_lm, load_sequence_classifier
    from workflow.models.lora import lora_config

    monkeypatch.chdir(Path(tiny_base).parent)  # the workflow names its base relative: results/base
    relative = Path(tiny_base).name
    for name, model in (
        ("policy", get_peft_model(load_causal_lm(relative), lora_config(POLICY_TEST_LORA))),
        ("reward", get_peft_model(load_sequence_classifier(relative), lora_config(POLICY_TEST_LORA, "SEQ_CLS"))),
    ):
        model.save_pretrained(tmp_path / name)
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == os.path.abspath(tiny_base), name
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "policy"))
    assert loaded.peft_config["default"].base_model_name_or_path == os.path.abspath(tiny_base)


def test_hub_ids_are_kept_as_they_are(tmp_path, monkeypatch):
    from workflow.models.loading import model_source

    monkeypatch.chdir(tmp_path)
    assert model_source("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"


@pytest.mark.parametrize("zo", [False, True])
def test_adapters_are_tagged_with_their_trainer(tiny_base, adapters, tmp_path, zo):
    """ZOPrO adapters (zorloo iterations >= 1) carry the tag zopro, not rloo, in their model card."""
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    from workflow.models.loading import load_policy, load_tokenizer
    from workflow.zo.trainer import ZOPrOTrainer

    model = load_policy(tiny_base, adapters["sft"], trainable=True)
    args = RLOOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    trainer_class = ZOPrOTrainer if zo else RLOOTrainer
    trainer = trainer_class(
        model=model,
        reward_funcs=lambda completions, **_: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": [[{"role": "user", "content": "hi"}]] * 2}),
        processing_class=load_tokenizer(tiny_base, "chat"),
    )
    trainer.model.save_pretrained(tmp_path / "adapter", selected_adapters=["default"])
    card = (tmp_path / "adapter" / "README.md").read_text().split("---")[1]
    tags = {line.strip()[2:] for line in card.splitlines() if line.strip().startswith("- ")}
    assert ("zopro" in tags, "rloo" in tags) == ((True, False) if zo else (False, True)), card
