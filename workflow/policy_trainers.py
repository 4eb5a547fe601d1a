"""The trainers of the policy methods (trl 1.12): RLOO, ZOPrO (RLOO with a zeroth-order update),
online DPO and PPO, each wired to the frozen SFT reference (see :mod:`workflow.policy`), and the
KL coefficient and its adaptive controller."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from workflow.lora import load_adapter_weights


class PolicyConfigError(ValueError):
    """The loop/policy configuration cannot be run."""


class PolicySnapshotCallback:
    """``SnapshotCallback`` that snapshots only the policy of PPO's policy-and-value wrapper."""

    def __new__(cls, every: float, out_dir):
        from workflow.snapshots import SnapshotCallback

        class _Policy(SnapshotCallback):
            def _save(self, state, model):
                super()._save(state, getattr(model, "policy", model))

        return _Policy(every, out_dir)


def _common_args(scratch: str, cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """Trainer arguments of every method; ``scratch`` (the Trainer's output folder) receives a
    checkpoint every ``policy.checkpoint_every`` of the steps (0: none), see :mod:`workflow.resume`."""
    from workflow.training import trainer_kwargs

    pcfg = cfg["policy"]
    every = float(pcfg.get("checkpoint_every", 0) or 0)
    saving = dict(save_strategy="steps", save_steps=every, save_total_limit=1, save_only_model=False) if every else {}
    return trainer_kwargs(
        scratch, pcfg["epochs"], pcfg["learning_rate"], pcfg["batch_size"], seed, logging_steps=1, **saving
    )


def _rloo_args(scratch: str, cfg: dict[str, Any], seed: int):
    """RLOO (and ZOPrO) trainer arguments: k samples per prompt, KL to the reference, PPO-clip."""
    from trl import RLOOConfig

    pcfg = cfg["policy"]
    k = int(pcfg["rloo_k"])
    batch = int(pcfg["batch_size"])
    if batch % k:
        raise PolicyConfigError(
            f"policy.batch_size ({batch}) must be a multiple of policy.rloo_k ({k}): "
            "every batch holds whole groups of k samples per prompt"
        )
    kwargs = _common_args(scratch, cfg, seed)
    kwargs.update(
        num_generations=k,
        max_completion_length=int(cfg["model"]["generation_length"]),
        temperature=float(pcfg["temperature"]),
        top_k=0,
        top_p=1.0,
        beta=float(pcfg["kl_coef"]),
        epsilon=float(pcfg["clip_range"]),
        steps_per_generation=1,
        num_iterations=1,
        log_completions=False,
        disable_dropout=True,
    )
    return RLOOConfig(**kwargs)


def build_rloo(model, tokenizer, reward_fn, prompts, cfg, scratch, seed, callbacks, sft_adapter):
    from datasets import Dataset
    from trl import RLOOTrainer

    args = _rloo_args(scratch, cfg, seed)
    trainer = RLOOTrainer(
        model=model,
        reward_funcs=reward_fn,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    _set_rloo_reference(trainer, sft_adapter)
    return trainer


def _set_rloo_reference(trainer, sft_adapter: str) -> None:
    """Point the RLOO trainer's frozen ``ref`` adapter at the SFT weights (see module docstring)."""
    model = trainer.model
    if float(trainer.beta) == 0.0:
        return
    if "ref" not in getattr(model, "peft_config", {}):
        raise RuntimeError("RLOOTrainer created no 'ref' adapter: the KL reference would not be the SFT policy")
    load_adapter_weights(model, "ref", sft_adapter)
    for name, param in model.named_parameters():
        if ".ref." in name:
            param.requires_grad_(False)


def build_zorloo(
    model,
    tokenizer,
    reward_fn,
    prompts,
    cfg,
    scratch,
    seed,
    callbacks,
    sft_adapter,
    direction_inputs: dict[str, str],
    variant: str,
):
    """ZOPrO trainer (iteration >= 1): ``workflow.zopro.ZOPrOTrainer`` with ``mu`` and ``v``.

    ``direction_inputs``: adapter folders ``policy_prev`` (i-1), ``policy_prev2`` (i-2, SFT for
    i = 1), ``reward_i`` and ``reward_prev`` (i-1). ``variant``: ``reference`` (the paper's
    algorithm, settings ``zopro.reference``, constant lr) or ``guarded``
    (:mod:`workflow.zopro_guarded`, settings ``zopro``; on a bf16 base the policy computes in fp32,
    :func:`workflow.models.fp32_compute`).
    """
    from datasets import Dataset

    from workflow import runtime
    from workflow.models import fp32_compute
    from workflow.zopro import GuardedConfig, ZOConfig, ZOPrOTrainer, load_direction_inputs

    args = _rloo_args(scratch, cfg, seed)
    args.lr_scheduler_type = "constant"
    if variant == "reference":
        zo_config = ZOConfig.from_config(cfg["zopro"]["reference"], seed=seed)
    else:
        zo_config = GuardedConfig.from_config(cfg, seed=seed)
        if runtime.use_bf16():
            fp32_compute(model)
            args.bf16 = False
    args.learning_rate = zo_config.lr
    mu, v = load_direction_inputs(
        direction_inputs["policy_prev"],
        direction_inputs["policy_prev2"],
        direction_inputs["reward_i"],
        direction_inputs["reward_prev"],
    )
    trainer = ZOPrOTrainer(
        model=model,
        reward_funcs=reward_fn,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
        callbacks=callbacks,
        mu=mu,
        v=v,
        zo_config=zo_config,
    )
    _set_rloo_reference(trainer, sft_adapter)
    return trainer


def build_dpo(model, ref_model, tokenizer, reward_fn, prompts, cfg, scratch, seed, callbacks):
    from datasets import Dataset
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    pcfg = cfg["policy"]
    kwargs = _common_args(scratch, cfg, seed)
    kwargs.update(
        max_new_tokens=int(cfg["model"]["generation_length"]),
        max_length=int(cfg["model"]["max_length"]),
        temperature=float(pcfg["temperature"]),
        top_k=0,
        top_p=1.0,
        beta=[kl_coefficient("dpo", cfg)],
        disable_dropout=True,
        remove_unused_columns=False,
    )
    args = OnlineDPOConfig(**kwargs)
    return OnlineDPOTrainer(
        model=model,
        ref_model=ref_model,
        reward_funcs=reward_fn,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
        reward_processing_classes=None,
        callbacks=callbacks,
    )


class TemplateEndReward(torch.nn.Module):
    """Reward model for trl's PPO that scores a rollout where the reward model was trained to.

    trl's ``get_reward`` reads the score at the last non-pad token of ``query + response``, i.e. at
    the stop token; the reward model was trained (and :class:`RewardFunction` scores) on the full
    chat rendering, whose last token is the template's end (``<|im_end|>`` then a newline for the
    embedded task). This wrapper appends the missing template tokens after each row's last token
    (the whole template end when the response did not stop) and hands ``get_reward`` the hidden
    state of the true last token at the position it reads.
    """

    base_model_prefix = "backbone"

    def __init__(self, reward_model, end_ids: Sequence[int], stop_id: int):
        super().__init__()
        self.reward_model = reward_model
        self.score = reward_model.score
        self.config = reward_model.config
        self.end_ids = [int(t) for t in end_ids]
        self.stop_id = int(stop_id)

    def backbone(self, input_ids, attention_mask, position_ids=None, **kwargs):
        from types import SimpleNamespace

        n, width = input_ids.shape
        mask = attention_mask.long()
        last = (mask * torch.arange(width, device=mask.device)).argmax(1)
        stopped = input_ids[torch.arange(n), last] == self.stop_id
        ends_with_stop = self.end_ids[:1] == [self.stop_id]
        tails = [self.end_ids[1:] if ends_with_stop and bool(s) else self.end_ids for s in stopped]
        extra = max(len(t) for t in tails)
        ids = torch.zeros((n, width + extra), dtype=input_ids.dtype, device=input_ids.device)
        new_mask = torch.zeros_like(ids, dtype=torch.bool)
        ids[:, :width] = input_ids
        new_mask[:, :width] = attention_mask.bool()
        end = last.clone()
        for row, tail in enumerate(tails):
            if tail:
                pos = int(last[row]) + 1
                ids[row, pos : pos + len(tail)] = torch.tensor(tail, dtype=ids.dtype, device=ids.device)
                new_mask[row, pos : pos + len(tail)] = True
                end[row] = pos + len(tail) - 1
        positions = new_mask.long().cumsum(1) - new_mask.long()
        out = getattr(self.reward_model, self.reward_model.base_model_prefix)(
            input_ids=ids,
            attention_mask=new_mask,
            position_ids=positions,
            return_dict=True,
            output_hidden_states=True,
            use_cache=False,
        )
        hidden = out.hidden_states[-1]
        read = hidden[:, :width].clone()
        read[torch.arange(n), last] = hidden[torch.arange(n), end]
        return SimpleNamespace(hidden_states=(read,))


def build_ppo(model, tokenizer, reward_model, value_model, prompts, cfg, scratch, seed, callbacks):
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from workflow.templates import template_end_ids

    pcfg = cfg["policy"]
    kwargs = _common_args(scratch, cfg, seed)
    kwargs.update(
        response_length=int(cfg["model"]["generation_length"]),
        temperature=float(pcfg["temperature"]),
        kl_coef=kl_coefficient("ppo", cfg),
        cliprange=float(pcfg["clip_range"]),
        num_ppo_epochs=int(pcfg.get("ppo_epochs", 1)),
        num_mini_batches=1,
        gradient_accumulation_steps=1,
        local_rollout_forward_batch_size=int(pcfg["batch_size"]),
        total_episodes=int(math.ceil(float(pcfg["epochs"]) * len(prompts))),
        num_sample_generations=0,
        save_strategy="no",  # trl's PPOTrainer cannot resume from its checkpoints
        stop_token="eos",
        missing_eos_penalty=None,
        ref_adapter_name="ref",
        model_adapter_name="default",
        remove_unused_columns=False,
    )
    args = PPOConfig(**kwargs)
    reward_model = TemplateEndReward(reward_model, template_end_ids(tokenizer), tokenizer.eos_token_id)
    ids = [
        tokenizer.apply_chat_template(list(p), tokenize=True, add_generation_prompt=True, return_dict=False)
        for p in prompts
    ]
    ids = [list(x["input_ids"]) if isinstance(x, dict) else list(x) for x in ids]
    train = Dataset.from_dict({"input_ids": ids})
    eval_ds = Dataset.from_dict({"input_ids": ids[: max(1, min(len(ids), int(pcfg["batch_size"])))]})
    return PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=model,
        ref_model=None,
        reward_model=reward_model,
        train_dataset=train,
        value_model=value_model,
        eval_dataset=eval_ds,
        callbacks=callbacks,
    )


# the policy key that overrides policy.kl_coef for a method's KL coefficient (online DPO: its beta)
OWN_KL_KEY = {"ppo": "ppo_kl_coef", "dpo": "dpo_beta"}


def kl_coefficient(kind: str, cfg: dict[str, Any]) -> float:
    """The configured KL coefficient of ``kind``: ``policy.ppo_kl_coef`` for ppo and
    ``policy.dpo_beta`` for dpo unless null, else ``policy.kl_coef``."""
    pcfg = cfg["policy"]
    own = OWN_KL_KEY.get(kind)
    if own and pcfg.get(own) is not None:
        return float(pcfg[own])
    return float(pcfg["kl_coef"])


def kl_controller(kind: str, cfg: dict[str, Any], prev_adapter: str):
    """The adaptive KL callback of a stage (``policy.kl_target`` set), starting from the previous
    iteration's last coefficient; else None."""
    from workflow.kl_control import AdaptiveKLCallback, KLTarget, previous_coefficient

    pcfg = cfg["policy"]
    if pcfg.get("kl_target") is None or kind == "zopro":
        # ZOPrO keeps policy.kl_coef fixed: a zeroth-order policy cannot answer a growing
        # coefficient fast enough, and the controller grew it by 1.5x per step (beta 1e7 after 40
        # steps, advantages swamped by the penalty); the guarded variant bounds its moves itself
        return None
    initial = kl_coefficient(kind, cfg)
    if initial <= 0:
        own = f"policy.{OWN_KL_KEY[kind]} / " if kind in OWN_KL_KEY else ""
        raise PolicyConfigError(
            f"policy.kl_target needs a positive starting coefficient: {own}policy.kl_coef is {initial}"
        )
    # online DPO's beta is not a penalty: far above its configured value DPO's loss saturates and
    # the policy stops learning instead of coming back (seed 2: beta 104, gold -0.043 at KL 0.09)
    ceiling = pcfg.get("dpo_beta_max") if kind == "dpo" else None
    target = KLTarget(
        float(pcfg["kl_target"]),
        float(pcfg["kl_horizon"]),
        floor=initial,
        ceiling=math.inf if ceiling is None else max(initial, float(ceiling)),
    )
    return AdaptiveKLCallback(target, previous_coefficient(Path(prev_adapter).parent, initial))
