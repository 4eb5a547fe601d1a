"""LoRA configuration shared by every stage (policy and reward adapters)."""

from __future__ import annotations

from typing import Any

from peft import LoraConfig

# Sequence-classification heads that stay fully trainable next to the LoRA matrices.
REWARD_HEAD = ["score"]


def lora_config(cfg: dict[str, Any], task_type: str = "CAUSAL_LM") -> LoraConfig:
    """Build the ``LoraConfig`` of the config's ``lora:`` section.

    ``alpha: null`` means ``2 * r``; ``target_modules`` is ``"all-linear"`` or a list of module
    names. ``task_type="SEQ_CLS"`` (reward models) keeps the ``score`` head trainable through
    ``modules_to_save`` (``all-linear`` never wraps the head itself).
    """
    lora = cfg.get("lora", cfg)
    r = int(lora.get("r", 8))
    alpha = lora.get("alpha")
    target = lora.get("target_modules", "all-linear")
    if not isinstance(target, str):
        target = list(target)
    return LoraConfig(
        r=r,
        lora_alpha=float(alpha) if alpha is not None else 2 * r,
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=target,
        task_type=task_type,
        modules_to_save=list(REWARD_HEAD) if task_type == "SEQ_CLS" else None,
        bias="none",
    )
