"""Loading helpers: tokenizers, base models, policy and reward adapters, preference rows."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from workflow import runtime
from workflow.data.chat import as_messages
from workflow.io import read_table, reading

# the columns of a preference-rows file (workflow.data.extract), and of the judged pairs (workflow.judges.pairs)
ROW_COLUMNS = ("prompt", "chosen", "rejected")


def torch_dtype() -> torch.dtype:
    """The dtype of base models: bf16 when ``workflow.runtime.use_bf16()`` (config ``precision``), else fp32."""
    return torch.bfloat16 if runtime.use_bf16() else torch.float32


class FP32Head(torch.nn.Linear):
    """An output head (``lm_head``, a reward model's ``score``) that computes in fp32 outside
    autocast, whatever the dtype of its weights and input: bf16 logits keep 8 significant bits,
    which dominated the log-prob and KL-estimate error of a bf16 base (README, "Precision")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias)


def fp32_head(module: torch.nn.Module) -> FP32Head:
    """Turn the ``Linear`` head ``module`` into an :class:`FP32Head` in place (same parameters, so
    tied embeddings stay tied and state-dict keys are unchanged)."""
    if not isinstance(module, torch.nn.Linear):
        raise TypeError(f"expected a Linear output head, got {type(module).__name__}")
    module.__class__ = FP32Head
    return module


def fp32_compute(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model`` compute in fp32 while its weights keep their storage dtype (bf16 bases):
    every ``Linear`` computes as an :class:`FP32Head`, the input embeddings are returned as fp32, so
    the residual stream and attention run in fp32. Call it outside autocast (trainer ``bf16=False``).
    Zeroth-order finite differences need it (:mod:`workflow.zo.guarded`); a no-op on fp32 models."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = FP32Head
    model.get_input_embeddings().register_forward_hook(lambda _module, _args, output: output.float())
    return model


def read_tokenizer(path: str, what: str = "tokenizer"):
    """The tokenizer of ``path`` as saved (a damaged file is an error naming ``path`` and ``what``)."""
    with reading(path, what):
        return AutoTokenizer.from_pretrained(path)


def load_tokenizer(path: str, task: str):
    """Tokenizer of ``path`` with the task's chat template and a pad token."""
    from workflow.data.templates import prepare_tokenizer

    tokenizer = read_tokenizer(path)
    prepared = prepare_tokenizer(tokenizer, task)
    return prepared if prepared is not None else tokenizer


def model_source(path: str) -> str:
    """``path`` made absolute when it is a local folder (a hub id is returned as is). Models load
    from it, so the adapters trained on them record an absolute ``base_model_name_or_path`` (in
    ``adapter_config.json`` and the model card) and ``AutoPeftModelFor...`` finds the base from any
    working directory."""
    return os.path.abspath(path) if os.path.isdir(path) else path


def load_causal_lm(path: str, dtype: torch.dtype | None = None):
    """The base causal LM of ``path`` (folder or hub id, :func:`model_source`) on the runtime device;
    its ``lm_head`` computes fp32 logits (:class:`FP32Head`)."""
    with reading(path, "model"):
        model = AutoModelForCausalLM.from_pretrained(model_source(path), dtype=dtype or torch_dtype())
    fp32_head(model.get_output_embeddings())
    return model.to(runtime.device())


def load_policy(base_path: str, adapter_path: str | None, trainable: bool = False, adapter_name: str = "default"):
    """Base causal LM plus the LoRA adapter of ``adapter_path`` (plain ``PeftModel``; PEFT keeps
    LoRA weights fp32 on a bf16 base, ``autocast_adapter_dtype``).

    With ``adapter_path=None`` the bare base model is returned (e.g. to evaluate it).
    """
    from peft import PeftModel

    base = load_causal_lm(base_path)
    if adapter_path is None:
        return base
    with reading(adapter_path, "adapter"):
        model = PeftModel.from_pretrained(base, adapter_path, adapter_name=adapter_name, is_trainable=trainable)
    if not trainable:
        model.eval()
    return model


def _pad_token_id(*paths: str | None) -> int | None:
    for path in paths:
        if path and os.path.exists(os.path.join(path, "tokenizer_config.json")):
            tokenizer = read_tokenizer(path)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            if pad is not None:
                return int(pad)
    return None


def load_sequence_classifier(base_path: str, pad_token_id: int | None = None, dtype: torch.dtype | None = None):
    """The 1-label sequence classifier of ``base_path``: a base model with a fresh ``score`` head (the
    reward model before its adapter), or a trained reward model (the reward-model judge).

    The head is fp32 whatever the base's dtype (:class:`FP32Head`): a trained head then keeps fp32
    weights and optimizer states, as the LoRA weights do.
    """
    with reading(base_path, "model"):
        model = AutoModelForSequenceClassification.from_pretrained(
            model_source(base_path), num_labels=1, dtype=dtype or torch_dtype()
        )
    fp32_head(model.score.float())
    if pad_token_id is None:
        pad_token_id = _pad_token_id(base_path)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model.to(runtime.device())


def load_reward_model(base_path: str, adapter_path: str, trainable: bool = False, pad_token_id: int | None = None):
    """Reward model: 1-label sequence classifier on the base plus its LoRA adapter and head.

    A frozen reward model (``trainable=False``: scoring) loads in fp32 whatever the precision: on a
    bf16 base, scores moved by a few % of their spread (README, "Precision"). A trainable one
    follows the precision. ``config.pad_token_id`` comes from the tokenizer saved with the adapter
    (else the base's).
    """
    from peft import PeftModel

    if pad_token_id is None:
        pad_token_id = _pad_token_id(adapter_path, base_path)
    base = load_sequence_classifier(base_path, pad_token_id, dtype=None if trainable else torch.float32)
    with reading(adapter_path, "adapter"):
        model = PeftModel.from_pretrained(base, adapter_path, is_trainable=trainable)
    if not trainable:
        model.eval()
    return model


def add_adapter(model, adapter_path: str, adapter_name: str) -> None:
    """Load the saved adapter of ``adapter_path`` into the ``PeftModel`` ``model`` as a second,
    frozen adapter ``adapter_name`` (a damaged file raises an error naming it)."""
    with reading(adapter_path, "adapter"):
        model.load_adapter(adapter_path, adapter_name=adapter_name, is_trainable=False)


def read_rows(path: str, columns: Sequence[str] = ROW_COLUMNS) -> pd.DataFrame:
    """Preference rows of ``path`` with plain-Python message lists; an error naming the file and
    the column when one of ``columns`` is missing (``workflow.io.read_table``)."""
    rows = read_table(path, columns)
    for column in ("prompt", "chosen", "rejected"):
        if column in rows:
            rows[column] = [as_messages(v, role="assistant") for v in rows[column]]
    if "score" in rows:
        rows["score"] = rows["score"].astype(float)
    return rows.reset_index(drop=True)


def has_scores(rows: pd.DataFrame) -> bool:
    """True when ``rows`` carry a usable numeric ``score`` column (e.g. MT direct assessment)."""
    return "score" in rows and bool(np.isfinite(rows["score"].to_numpy(dtype=float)).any())
