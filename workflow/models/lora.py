"""LoRA configuration shared by every stage (policy and reward adapters), and saved adapters' tensors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig

from workflow.schema import section

# Sequence-classification heads that stay fully trainable next to the LoRA matrices.
REWARD_HEAD = ["score"]


def lora_config(cfg: dict[str, Any], task_type: str = "CAUSAL_LM") -> LoraConfig:
    """Build the ``LoraConfig`` of the config's ``lora:`` section (``cfg`` is the config or that section;
    keys it lacks take the schema's defaults).

    ``alpha: null`` means ``2 * r``; ``target_modules`` is ``"all-linear"`` or a list of module
    names. ``task_type="SEQ_CLS"`` (reward models) keeps the ``score`` head trainable through
    ``modules_to_save`` (``all-linear`` never wraps the head itself).
    """
    lora = section({"lora": cfg.get("lora", cfg)}, "lora")
    r = int(lora["r"])
    alpha = lora["alpha"]
    target = lora["target_modules"]
    if not isinstance(target, str):
        target = list(target)
    return LoraConfig(
        r=r,
        lora_alpha=float(alpha) if alpha is not None else 2 * r,
        lora_dropout=float(lora["dropout"]),
        target_modules=target,
        task_type=task_type,
        modules_to_save=list(REWARD_HEAD) if task_type == "SEQ_CLS" else None,
        bias="none",
    )


def adapter_state(adapter_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a saved PEFT adapter, keyed by ``workflow.models.snapshots.normalise_key``."""
    from workflow.models.snapshots import load_tensors, normalise_key

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"no adapter weights in {adapter_dir} (expected adapter_model.safetensors)")
    return {normalise_key(k): v for k, v in load_tensors(path).items()}


@torch.no_grad()
def load_adapter_weights(model, adapter_name: str, adapter_dir: str | os.PathLike) -> int:
    """Copy the saved adapter of ``adapter_dir`` into the (existing) adapter ``adapter_name`` of ``model``.

    Every LoRA tensor of ``adapter_name`` must be found in the file; returns how many were copied.
    """
    from workflow.models.snapshots import normalise_key

    state = adapter_state(adapter_dir)
    marker = f".{adapter_name}."
    copied, missing = 0, []
    for name, param in model.named_parameters():
        if marker not in name:
            continue
        key = normalise_key(name)
        if key not in state:
            missing.append(key)
            continue
        if state[key].shape != param.shape:
            raise ValueError(
                f"adapter {adapter_dir}: {key} has shape {tuple(state[key].shape)}, "
                f"the model's {adapter_name!r} adapter {tuple(param.shape)}"
            )
        param.data.copy_(state[key].to(param.device, param.dtype))
        copied += 1
    if missing or not copied:
        raise ValueError(
            f"adapter {adapter_dir} does not match adapter {adapter_name!r} of the model "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, copied {copied})"
        )
    return copied
