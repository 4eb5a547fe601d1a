"""Shared, session-scoped fixtures: the embedded task's rows and a tiny saved base model.

``embedded_frames``  -> {split: DataFrame} from ``workflow.data.embedded_task.generate_split``
``embedded_parquet`` -> {split: parquet path} of those rows
``tiny_base``        -> str path of a saved tiny Llama + tokenizer (chat template, pad token set)
``adapters``         -> {"sft", "sft2", "reward", "reward1"}: random LoRA adapters on ``tiny_base``
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

EMBEDDED_ROWS = {"train": 64, "test": 32}
TINY_BASE_CFG = {
    "vocab_size": 360,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_layers": 2,
    "num_heads": 2,
    "epochs": 1,
    "learning_rate": 3e-3,
    "batch_size": 16,
    "max_length": 128,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the ``slow`` tests (tiny trainings, workflows end to end) first, so that under
    ``pytest -n`` they start at once on every worker and the short ones fill in beside them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def embedded_frames():
    """``{"train": 64 rows, "test": 32 rows}`` of the embedded task (seed 0)."""
    from workflow.data.embedded_task import generate_split

    return {split: generate_split(split, n, seed=0) for split, n in EMBEDDED_ROWS.items()}


@pytest.fixture(scope="session")
def embedded_parquet(embedded_frames, tmp_path_factory):
    """``{split: path}`` of the embedded rows written as parquet."""
    root = tmp_path_factory.mktemp("embedded_data")
    paths = {}
    for split, df in embedded_frames.items():
        path = root / f"{split}.parquet"
        df.to_parquet(path, index=False)
        paths[split] = str(path)
    return paths


@pytest.fixture(scope="session")
def tiny_base(embedded_frames, tmp_path_factory):
    """Path of a tiny saved causal LM + tokenizer built on the embedded train rows (a few seconds).

    Loads with ``AutoModelForCausalLM``, ``AutoTokenizer`` (chat template set) and
    ``AutoModelForSequenceClassification(num_labels=1)`` (``pad_token_id`` in the config).
    """
    from workflow.models.base_model import build_base_model, dialogues

    out = tmp_path_factory.mktemp("tiny_base") / "base"
    threads = torch.get_num_threads()
    build_base_model(dialogues(embedded_frames["train"]), out, TINY_BASE_CFG, seed=0)
    torch.set_num_threads(threads)
    return str(out)


# LoRA of the policy tests' adapters (tests/test_policy.py CFG["lora"] must match it)
POLICY_TEST_LORA = {"lora": {"r": 4, "alpha": None, "dropout": 0.0, "target_modules": "all-linear"}}


def _perturb_lora(model, seed: int, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(
                    torch.randn(p.shape, generator=gen).to(p.device) * scale
                )  # noise drawn on the CPU: same on every device


@pytest.fixture(scope="session")
def adapters(tiny_base, tmp_path_factory):
    """``{"sft": ..., "sft2": ..., "reward": ..., "reward1": ...}`` adapter folders (tokenizer beside each)."""
    from peft import get_peft_model

    from workflow.models.loading import load_causal_lm, load_sequence_classifier, load_tokenizer
    from workflow.models.lora import lora_config

    root = tmp_path_factory.mktemp("adapters")
    tok = load_tokenizer(tiny_base, "chat")
    out = {}
    for name, seed in (("sft", 1), ("sft2", 2)):
        torch.manual_seed(seed)
        model = get_peft_model(load_causal_lm(tiny_base), lora_config(POLICY_TEST_LORA))
        _perturb_lora(model, seed)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    for name, seed in (("reward", 3), ("reward1", 4)):
        torch.manual_seed(seed)
        model = get_peft_model(
            load_sequence_classifier(tiny_base, tok.pad_token_id), lora_config(POLICY_TEST_LORA, "SEQ_CLS")
        )
        _perturb_lora(model, seed)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


@pytest.fixture
def set_precision():
    """``runtime.set_precision``, with the process's precision restored afterwards."""
    from workflow import runtime

    before = runtime.precision()
    yield runtime.set_precision
    runtime.set_precision(before)
