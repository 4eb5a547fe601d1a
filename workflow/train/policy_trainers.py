"""The trainers of the policy methods (trl 1.12): RLOO, ZOPrO (RLOO with a zeroth-order update),
online DPO and PPO, each wired to the frozen SFT reference (see :mod:`workflow.train.policy`), and the
KL coefficient and its adaptive controller."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workflow.job import SEED_OFFSETS
from workflow.models.lora import load_adapter_weights
from workflow.schema import section, setting
from workflow.train.sampling import sample_completions
from workflow.train.scoring import TemplateEndReward


class PolicyConfigError(ValueError):
    """The loop/policy configuration cannot be run."""


@dataclasses.dataclass
class PolicyStage:
    """What every method's builder is given (one signature for all): the policy being trained
    (PEFT adapter ``default``, loaded from policy i-1), reward model i as a trl reward callable,
    the prompts and the stage's settings."""

    model: Any
    tokenizer: Any
    reward_fn: Any  # workflow.train.scoring.RewardFunction
    prompts: list
    cfg: dict[str, Any]
    scratch: str  # the Trainer's output folder (its checkpoints, workflow.train.resume)
    seed: int
    callbacks: list
    base_path: str
    sft_adapter: str  # the frozen KL reference
    variant: str | None = None  # ZOPrO's variant (zorloo iterations >= 1)
    direction_inputs: dict[str, str] | None = None  # ZOPrO's mu / v adapters (build_zorloo)


@dataclasses.dataclass
class Built:
    """A method's trainer, whether it resumes from a checkpoint, and what runs after training
    (PPO: the stage's rollout records, which trl's PPO does not keep)."""

    trainer: Any
    resumable: bool = True
    after_train: Callable[[], None] | None = None


class PolicySnapshotCallback:
    """``SnapshotCallback`` that snapshots only the policy of PPO's policy-and-value wrapper."""

    def __new__(cls, every: float, out_dir):
        from workflow.models.snapshots import SnapshotCallback

        class _Policy(SnapshotCallback):
            def _save(self, state, model):
                super()._save(state, getattr(model, "policy", model))

        return _Policy(every, out_dir)


def _common_args(scratch: str, cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """Trainer arguments of every method; ``scratch`` (the Trainer's output folder) receives a
    checkpoint every ``policy.checkpoint_every`` of the steps (0: none), see :mod:`workflow.train.resume`."""
    from workflow.train.kit import trainer_kwargs

    pcfg = cfg["policy"]
    every = float(setting(cfg, "policy.checkpoint_every") or 0)
    saving = dict(save_strategy="steps", save_steps=every, save_total_limit=1, save_only_model=False) if every else {}
    return trainer_kwargs(
        scratch,
        pcfg["epochs"],
        pcfg["learning_rate"],
        pcfg["batch_size"],
        seed,
        config=cfg,
        logging_steps=1,
        **saving,
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


def _dataset(prompts: list):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": prompts})


def build_rloo(stage: PolicyStage) -> Built:
    """RLOO with the SFT adapter as its frozen reference."""
    from trl import RLOOTrainer

    trainer = RLOOTrainer(
        model=stage.model,
        reward_funcs=stage.reward_fn,
        args=_rloo_args(stage.scratch, stage.cfg, stage.seed),
        train_dataset=_dataset(stage.prompts),
        processing_class=stage.tokenizer,
        callbacks=stage.callbacks,
    )
    _set_rloo_reference(trainer, stage.sft_adapter)
    return Built(trainer)


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


def build_zorloo(stage: PolicyStage) -> Built:
    """ZOPrO trainer (iteration >= 1): ``workflow.zo.trainer.ZOPrOTrainer`` with ``mu`` and ``v``.

    ``stage.direction_inputs``: adapter folders ``policy_prev`` (i-1), ``policy_prev2`` (i-2, SFT
    for i = 1), ``reward`` (i) and ``reward_prev`` (i-1), as the rule names them. ``stage.variant``: ``reference`` (the
    paper's algorithm, settings ``zopro.reference``, constant lr) or ``guarded``
    (:mod:`workflow.zo.guarded`, settings ``zopro``). On a bf16 base both compute in fp32
    (:func:`workflow.models.loading.fp32_compute`), without autocast.
    """
    from workflow import runtime
    from workflow.models.loading import fp32_compute
    from workflow.zo.trainer import GuardedConfig, ZOConfig, ZOPrOTrainer, load_direction_inputs

    if not stage.direction_inputs:
        raise PolicyConfigError("a ZOPrO iteration needs the mu/v adapters as inputs")
    cfg, seed = stage.cfg, stage.seed
    args = _rloo_args(stage.scratch, cfg, seed)
    args.lr_scheduler_type = "constant"
    if stage.variant == "reference":
        zo_config = ZOConfig.from_config(cfg["zopro"]["reference"], seed=seed)
    else:
        zo_config = GuardedConfig.from_config(cfg, seed=seed)
    if runtime.use_bf16():  # finite differences are below bf16 resolution (workflow.zo.guarded, Precision)
        fp32_compute(stage.model)
        args.bf16 = False
    args.learning_rate = zo_config.lr
    inputs = stage.direction_inputs
    mu, v = load_direction_inputs(
        inputs["policy_prev"], inputs["policy_prev2"], inputs["reward"], inputs["reward_prev"]
    )
    trainer = ZOPrOTrainer(
        model=stage.model,
        reward_funcs=stage.reward_fn,
        args=args,
        train_dataset=_dataset(stage.prompts),
        processing_class=stage.tokenizer,
        callbacks=stage.callbacks,
        mu=mu,
        v=v,
        zo_config=zo_config,
    )
    _set_rloo_reference(trainer, stage.sft_adapter)
    return Built(trainer)


def build_dpo(stage: PolicyStage) -> Built:
    """Online DPO with an explicit frozen reference model: the base with the SFT adapter."""
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from workflow.models.loading import load_policy

    cfg = stage.cfg
    ref_model = load_policy(stage.base_path, stage.sft_adapter, trainable=False)
    for p in ref_model.parameters():
        p.requires_grad_(False)
    pcfg = cfg["policy"]
    kwargs = _common_args(stage.scratch, cfg, stage.seed)
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
    trainer = OnlineDPOTrainer(
        model=stage.model,
        ref_model=ref_model,
        reward_funcs=stage.reward_fn,
        args=OnlineDPOConfig(**kwargs),
        train_dataset=_dataset(stage.prompts),
        processing_class=stage.tokenizer,
        reward_processing_classes=None,
        callbacks=stage.callbacks,
    )
    return Built(trainer)


def build_ppo(stage: PolicyStage) -> Built:
    """PPO: the SFT adapter as a second, frozen adapter ``ref`` of the policy, reward model i
    merged (trl reads its backbone and ``score`` head, :class:`TemplateEndReward`) and a trainable
    copy of it as the value model. trl's PPO cannot resume from a checkpoint, and it keeps no
    rollouts: after training, ``policy.rloo_k`` answers per prompt of the trained policy are
    sampled and scored as the stage's rollout records."""
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from workflow.data.templates import template_end_ids
    from workflow.models.loading import add_adapter

    cfg, tokenizer, model, reward_fn = stage.cfg, stage.tokenizer, stage.model, stage.reward_fn
    pcfg = cfg["policy"]
    add_adapter(model, stage.sft_adapter, "ref")
    model.set_adapter("default")
    merged = reward_fn.model.merge_and_unload()
    merged.eval()
    value = copy.deepcopy(merged)
    for p in value.parameters():
        p.requires_grad_(True)
    reward_fn.model = merged
    # PPO scores rollouts inside trl (no callable): probe the reward model once up front so a
    # NaN-producing adapter fails here, not after a run trained on NaN rewards
    probe = stage.prompts[: int(pcfg["batch_size"])]
    reward_fn.score(probe, [""] * len(probe))
    kwargs = _common_args(stage.scratch, cfg, stage.seed)
    kwargs.update(
        response_length=int(cfg["model"]["generation_length"]),
        temperature=float(pcfg["temperature"]),
        kl_coef=kl_coefficient("ppo", cfg),
        cliprange=float(pcfg["clip_range"]),
        num_ppo_epochs=int(setting(cfg, "policy.ppo_epochs")),
        num_mini_batches=1,
        gradient_accumulation_steps=1,
        local_rollout_forward_batch_size=int(pcfg["batch_size"]),
        total_episodes=int(math.ceil(float(pcfg["epochs"]) * len(stage.prompts))),
        num_sample_generations=0,
        save_strategy="no",  # trl's PPOTrainer cannot resume from its checkpoints
        stop_token="eos",
        missing_eos_penalty=None,
        ref_adapter_name="ref",
        model_adapter_name="default",
        remove_unused_columns=False,
    )
    ids = [
        tokenizer.apply_chat_template(list(p), tokenize=True, add_generation_prompt=True, return_dict=False)
        for p in stage.prompts
    ]
    ids = [list(x["input_ids"]) if isinstance(x, dict) else list(x) for x in ids]

    class DataParallelPPOTrainer(PPOTrainer):
        """trl 1.12's PPOTrainer reads ``self.model.policy`` for the reference adapter's log-probs (a
        no-grad pass); with more than one process ``self.model`` is the DistributedDataParallel
        wrapper, which hides it: expose it there (a plain attribute, not a registered submodule)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if not hasattr(self.model, "policy"):
                object.__setattr__(self.model, "policy", self.accelerator.unwrap_model(self.model).policy)

    trainer = DataParallelPPOTrainer(
        args=PPOConfig(**kwargs),
        processing_class=tokenizer,
        model=model,
        ref_model=None,
        reward_model=TemplateEndReward(merged, template_end_ids(tokenizer), tokenizer.eos_token_id),
        train_dataset=Dataset.from_dict({"input_ids": ids}),
        value_model=value,
        eval_dataset=Dataset.from_dict({"input_ids": ids[: max(1, min(len(ids), int(pcfg["batch_size"])))]}),
        callbacks=stage.callbacks,
    )

    def record_rollouts() -> None:
        """Each data-parallel process samples and scores its share of the prompts."""
        from workflow.runtime import processes

        model.set_adapter("default")
        share = processes()
        own = stage.prompts[share.process_index :: share.num_processes]
        prompts = [p for p in own for _ in range(int(pcfg["rloo_k"]))]
        texts = sample_completions(
            model,
            tokenizer,
            prompts,
            cfg["model"]["generation_length"],
            pcfg["temperature"],
            stage.seed + SEED_OFFSETS["ppo_records"],
        )
        reward_fn(prompts, texts, step=int(trainer.state.global_step))

    return Built(trainer, resumable=False, after_train=record_rollouts)


# trainer kind (workflow.train.policy) -> its builder
BUILDERS: dict[str, Callable[[PolicyStage], Built]] = {
    "rloo": build_rloo,
    "zopro": build_zorloo,
    "dpo": build_dpo,
    "ppo": build_ppo,
}


# the policy key that overrides policy.kl_coef for a method's KL coefficient (online DPO: its beta)
OWN_KL_KEY = {"ppo": "ppo_kl_coef", "dpo": "dpo_beta"}


def kl_coefficient(kind: str, cfg: dict[str, Any]) -> float:
    """The configured KL coefficient of ``kind``: ``policy.ppo_kl_coef`` for ppo and
    ``policy.dpo_beta`` for dpo unless null, else ``policy.kl_coef``."""
    pcfg = section(cfg, "policy")
    own = OWN_KL_KEY.get(kind)
    if own and pcfg[own] is not None:
        return float(pcfg[own])
    return float(pcfg["kl_coef"])


def kl_controller(kind: str, cfg: dict[str, Any], prev_adapter: str, variant: str | None = None):
    """The adaptive KL callback of a stage (``policy.kl_target`` set), starting from the previous
    iteration's last coefficient; else None. A ZOPrO stage (``kind`` zopro) never steers its
    coefficient; with ``zopro.carry_kl_coef`` the guarded variant keeps the previous iteration's
    last one, capped at ``zopro.kl_coef_max``, fixed (floor = ceiling), and logs it so that the next
    iteration carries it on."""
    from workflow.train.kl_control import AdaptiveKLCallback, KLTarget, previous_coefficient

    pcfg = section(cfg, "policy")
    if pcfg["kl_target"] is None:
        return None
    initial = kl_coefficient(kind, cfg)
    if kind == "zopro":
        # a zeroth-order policy cannot answer a growing coefficient fast enough: the controller grew
        # it by 1.5x per step (beta 1e7 after 40 steps, advantages swamped by the penalty)
        if variant != "guarded" or not setting(cfg, "zopro.carry_kl_coef"):
            return None
        start = previous_coefficient(Path(prev_adapter).parent, initial)
        cap = setting(cfg, "zopro.kl_coef_max")
        if cap is not None:  # iteration 0 may end mid-fight with a runaway KL (seed 2: 14.9; README)
            start = min(start, max(initial, float(cap)))
        fixed = KLTarget(float(pcfg["kl_target"]), float(pcfg["kl_horizon"]), floor=start, ceiling=start)
        return AdaptiveKLCallback(fixed, start)
    if initial <= 0:
        own = f"policy.{OWN_KL_KEY[kind]} / " if kind in OWN_KL_KEY else ""
        raise PolicyConfigError(
            f"policy.kl_target needs a positive starting coefficient: {own}policy.kl_coef is {initial}"
        )
    # online DPO's beta is not a penalty: far above its configured value DPO's loss saturates and
    # the policy stops learning instead of coming back (seed 2: beta 104, gold -0.043 at KL 0.09)
    ceiling = pcfg["dpo_beta_max"] if kind == "dpo" else None
    target = KLTarget(
        float(pcfg["kl_target"]),
        float(pcfg["kl_horizon"]),
        floor=initial,
        ceiling=math.inf if ceiling is None else max(initial, float(ceiling)),
    )
    return AdaptiveKLCallback(target, previous_coefficient(Path(prev_adapter).parent, initial))
