"""Policy learning, one loop iteration: ``ppo``, ``dpo`` (online DPO), ``rloo`` and ``zorloo`` via trl 1.12.

Iteration ``i`` trains policy ``i`` against reward model ``i`` (docs/design.md, "Iterations").

Adapters and the KL reference
-----------------------------
The trainable adapter (PEFT name ``default``) is loaded from policy ``i-1`` (the SFT adapter for
``i = 0``). The KL reference must be the frozen **SFT policy**, not the base model and not policy
``i-1``. trl's own PEFT defaults would get this wrong from iteration 1 on (RLOO copies the
*initial* adapter as its reference, i.e. policy ``i-1``; PPO and online DPO disable the adapters,
i.e. the bare base model), so each method is wired explicitly:

* ``rloo`` / ``zorloo``: ``RLOOTrainer`` adds a frozen ``ref`` adapter (a copy of ``default``)
  and computes reference log-probs with it; right after construction the ``ref`` tensors are
  overwritten with the SFT adapter's (:func:`load_adapter_weights`, every tensor checked).
* ``ppo``: the SFT adapter is loaded as a second, frozen adapter ``ref`` on the same PeftModel and
  ``PPOConfig.ref_adapter_name="ref"`` makes PPO switch to it for the reference forward pass.
* ``dpo``: ``OnlineDPOTrainer`` takes an explicit ``ref_model``: base + SFT adapter, frozen
  (one extra copy of the base weights; fine for the sizes this project trains on one device).

Only the ``default`` adapter is saved (``adapter/``) and snapshotted (the ``ref`` tensors are
frozen, and snapshots hold trainable tensors only).

Reward
------
``rloo``, ``zorloo`` and ``dpo`` get a :class:`RewardFunction` callable: it scores
``prompt + completion`` with the LoRA reward model ``i`` (``workflow.scoring.reward_scores``, the
same text rendering the reward model was trained on), **raises** on a NaN score (trl would
otherwise turn NaN into 0 silently) and records every scored rollout. Those records are the
trainer's own rollouts and become ``samples.parquet``. ``ppo`` needs a sequence-classification
model object (``get_reward`` reads the backbone and ``score`` head directly), so it gets the reward
model with its LoRA merged (``merge_and_unload``), and its value model is a separate, trainable
deep copy of that merged model (PPO never changes the reward model). ``get_reward`` reads the
score at a rollout's last token, the stop token, one token short of where the reward model was
trained and where ``reward_scores`` reads it (the end of the chat rendering: ``<|im_end|>`` and a
newline for the embedded task); :class:`TemplateEndReward` appends the template's end so that PPO
optimises the same scores as the other methods (read at the stop token, reward model 0 of the
embedded task scored about 5 lower and ranked held-out pairs worse, 0.90 against 0.93; PPO's
gold at iteration 2, seeds 0/1/2, was 0.48/0.63/0.54 without the wrapper, 0.61/0.70/0.72 with it).
PPO's rollouts are not
exposed, so for ``ppo`` ``samples.parquet`` is re-sampled after training from the final policy on
the iteration's prompts (``policy.rloo_k`` samples each, ``policy.temperature``), then scored the
same way; its reward model is probed once before training so that a NaN-producing adapter fails
before PPO trains on NaN rewards.
``ppo`` uses ``policy.ppo_kl_coef`` as its KL coefficient when it is set (``null``:
``policy.kl_coef``). PPO's KL penalty is per token on raw reward-model scores (no group baseline,
``ppo_epochs`` Adam steps per rollout batch), so the ``kl_coef`` that suits ``rloo``/``dpo`` is too
weak for it: on the embedded task (measured before :class:`TemplateEndReward` existed) it drifted
far from the SFT policy from iteration 1 on and hacked the refined reward models (answers dropped
the topic word, reward up, gold down).

Prompts per iteration
---------------------
:func:`iteration_prompts`: with ``loop.intraepoch`` each iteration takes chunk ``i`` of one seeded
permutation of the training prompts (chunk size ``ceil(loop.iteration_fraction * n)``, wrapping
around the end), otherwise all prompts (``policy.epochs`` epochs over them).
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from workflow.job import SEED_OFFSETS
from workflow.sampling import sample_completions
from workflow.schema import METHODS, ZO_METHODS
from workflow.scoring import RewardFunction, gold_scorer


def zopro_variant(method: str, cfg: dict[str, Any]) -> str:
    """The ZOPrO variant a ZO method trains with: ``reference`` or ``guarded``."""
    return "reference" if method == "zorloo_reference" else str(cfg["zopro"]["variant"])


class PolicyConfigError(ValueError):
    """The loop/policy configuration cannot be run."""


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------
def iteration_indices(n_rows: int, iteration: int, loop_cfg: dict[str, Any], seed: int) -> np.ndarray:
    """Row indices of the prompts iteration ``iteration`` trains on (see the module docstring)."""
    if n_rows <= 0:
        raise PolicyConfigError("there are no training prompts")
    if not loop_cfg.get("intraepoch", False):
        return np.arange(n_rows)
    fraction = float(loop_cfg.get("iteration_fraction", 0.05))
    size = max(1, min(n_rows, math.ceil(fraction * n_rows - 1e-9)))
    order = np.random.default_rng(int(seed)).permutation(n_rows)
    start = int(iteration) * size
    return order[(start + np.arange(size)) % n_rows]


def iteration_prompts(rows: pd.DataFrame, iteration: int, cfg: dict[str, Any], seed: int) -> list[list[dict]]:
    """Prompt message lists of iteration ``iteration``."""
    idx = iteration_indices(len(rows), iteration, cfg.get("loop", {}), seed)
    return [list(rows["prompt"].iloc[int(k)]) for k in idx]


# --------------------------------------------------------------------------------------------
# reward
# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# adapters
# --------------------------------------------------------------------------------------------
def adapter_state(adapter_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a saved PEFT adapter, keyed by ``workflow.snapshots.normalise_key``."""
    from workflow.snapshots import load_tensors, normalise_key

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"no adapter weights in {adapter_dir} (expected adapter_model.safetensors)")
    return {normalise_key(k): v for k, v in load_tensors(path).items()}


@torch.no_grad()
def load_adapter_weights(model, adapter_name: str, adapter_dir: str | os.PathLike) -> int:
    """Copy the saved adapter of ``adapter_dir`` into the (existing) adapter ``adapter_name`` of ``model``.

    Every LoRA tensor of ``adapter_name`` must be found in the file; returns how many were copied.
    """
    from workflow.snapshots import normalise_key

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


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
# --------------------------------------------------------------------------------------------
# trainers
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# one iteration
# --------------------------------------------------------------------------------------------
def train_policy(
    method: str,
    iteration: int,
    base_path: str,
    prev_adapter: str,
    sft_adapter: str,
    reward_adapter: str,
    prompts: list,
    out_dir: str | os.PathLike,
    cfg: dict[str, Any],
    seed: int,
    task: str,
    direction_inputs: dict[str, str] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train policy ``iteration`` and write ``out_dir/{adapter,snapshots,metrics.csv,samples.parquet}``.

    ``checkpoint_dir`` (default ``out_dir/checkpoints``): where the stage keeps its resumable state
    (:mod:`workflow.resume`); a killed stage rerun with the same config and inputs continues from
    its last checkpoint (``ppo`` excepted: trl's PPOTrainer cannot resume, it restarts the
    iteration). Data-parallel processes must all be given the same folder. ``data``: the accounting
    of the prompts' rows (``workflow.accounting``), added to the summary.
    """
    from transformers import set_seed

    from workflow.io import atomic_dir, write_parquet
    from workflow.models import add_adapter, load_policy, load_reward_model, load_tokenizer
    from workflow.resume import StageCheckpoints, fingerprint
    from workflow.training import write_metrics

    if method not in METHODS:
        raise PolicyConfigError(f"unknown policy method {method!r}; expected one of {', '.join(METHODS)}")
    if not prompts:
        raise PolicyConfigError(f"policy {method} iteration {iteration}: no training prompts")
    out = Path(out_dir)
    set_seed(int(seed))
    pcfg = cfg["policy"]
    tokenizer = load_tokenizer(base_path, task)
    tokenizer.padding_side = "left"
    reward_tokenizer = load_tokenizer(reward_adapter, task)
    model = load_policy(base_path, prev_adapter, trainable=True)
    reward = load_reward_model(base_path, reward_adapter, trainable=False, pad_token_id=reward_tokenizer.pad_token_id)
    for p in reward.parameters():
        p.requires_grad_(False)
    max_len = int(cfg["model"]["max_length"])
    reward_fn = RewardFunction(
        reward,
        reward_tokenizer,
        name=f"{reward_adapter} (iteration {iteration})",
        batch_size=max(32, int(pcfg["batch_size"])),
        max_length=max_len,
        gold=gold_scorer(cfg),
    )
    zo = method in ZO_METHODS and int(iteration) >= 1
    kind = "zopro" if zo else ("rloo" if method in ZO_METHODS else method)
    inputs = [prev_adapter, sft_adapter, reward_adapter, *(direction_inputs or {}).values()]
    start = time.time()
    with atomic_dir(out / "snapshots") as snaps, atomic_dir(out / "adapter") as adapter:
        state = StageCheckpoints(
            checkpoint_dir or out / "checkpoints",
            fingerprint(cfg, inputs, method=method, iteration=int(iteration), seed=int(seed), prompts=prompts),
        )
        print(f"policy {method} iteration {iteration}: {state.describe()}")
        reward_fn.records = state.resumed_samples()
        trainer_dir = str(state.trainer_dir)
        callbacks = [
            PolicySnapshotCallback(cfg["snapshots"]["every"], state.snapshots),
            state.callback(reward_fn.samples),
        ]
        kl_control = kl_controller(kind, cfg, prev_adapter)
        if kl_control is not None:
            callbacks.append(kl_control)
        if kind == "rloo":
            trainer = build_rloo(model, tokenizer, reward_fn, prompts, cfg, trainer_dir, seed, callbacks, sft_adapter)
        elif kind == "zopro":
            if not direction_inputs:
                raise PolicyConfigError(f"{method} iteration {iteration} needs the mu/v adapters as inputs")
            trainer = build_zorloo(
                model,
                tokenizer,
                reward_fn,
                prompts,
                cfg,
                trainer_dir,
                seed,
                callbacks,
                sft_adapter,
                direction_inputs,
                zopro_variant(method, cfg),
            )
        elif kind == "dpo":
            ref_model = load_policy(base_path, sft_adapter, trainable=False)
            for p in ref_model.parameters():
                p.requires_grad_(False)
            trainer = build_dpo(model, ref_model, tokenizer, reward_fn, prompts, cfg, trainer_dir, seed, callbacks)
        else:  # ppo
            add_adapter(model, sft_adapter, "ref")
            model.set_adapter("default")
            merged = reward.merge_and_unload()
            merged.eval()
            value = copy.deepcopy(merged)
            for p in value.parameters():
                p.requires_grad_(True)
            reward_fn.model = merged
            # PPO scores rollouts inside trl (no callable): probe the reward model once up front so a
            # NaN-producing adapter fails here, not after a run trained on NaN rewards
            probe = prompts[: int(pcfg["batch_size"])]
            reward_fn.score(probe, [""] * len(probe))
            trainer = build_ppo(model, tokenizer, merged, value, prompts, cfg, trainer_dir, seed, callbacks)
        if kl_control is not None:
            kl_control.bind(trainer)
        if kind == "ppo":
            result = trainer.train()
        else:
            result = trainer.train(resume_from_checkpoint=str(state.checkpoint) if state.checkpoint else None)
        policy = model
        policy.set_adapter("default")
        policy.save_pretrained(adapter, selected_adapters=["default"])
        tokenizer.save_pretrained(adapter)
        if kind == "ppo":
            k = int(pcfg["rloo_k"])
            rep = [p for p in prompts for _ in range(k)]
            texts = sample_completions(
                policy,
                tokenizer,
                rep,
                cfg["model"]["generation_length"],
                pcfg["temperature"],
                seed + SEED_OFFSETS["ppo_records"],
            )
            reward_fn(rep, texts, step=int(trainer.state.global_step))
        samples = reward_fn.samples()
        if samples.empty:
            raise RuntimeError(f"policy {method} iteration {iteration}: the trainer scored no rollouts")
        steps = int(trainer.state.global_step)
        summary = {
            "stage": "policy",
            "method": method,
            "iteration": int(iteration),
            "trainer": kind,
            **({"zopro_variant": zopro_variant(method, cfg)} if zo else {}),
            "prompts": len(prompts),
            "steps": steps,
            "resumed_from_step": state.step,
            "train_loss": float(getattr(result, "training_loss", float("nan")) if result is not None else float("nan")),
            "sample_reward_mean": float(samples["score"].mean()),
            "runtime_s": time.time() - start,
            **(data or {}),
        }
        write_parquet(samples, out / "samples.parquet")
        write_metrics(trainer.state.log_history, summary, out / "metrics.csv")
        os.rmdir(snaps)
        shutil.move(state.snapshots, snaps)  # a rename: the snapshots are not copied
    state.finish()
    return summary


def run(job) -> None:
    """Stage function of rule ``train_policy``."""
    from workflow.accounting import usable_rows
    from workflow.datasets import task_of
    from workflow.models import load_tokenizer, read_rows

    cfg = job.config
    method = job.wildcards["method"]
    iteration = int(job.wildcards["i"])
    out_dir = job.stage_dir
    tokenizer = load_tokenizer(job.params["base"], task_of(cfg["dataset"]["name"]))
    rows, data = usable_rows(
        read_rows(job.input["train"]), tokenizer, cfg["model"]["max_length"], "prompts", job.input["train"]
    )
    prompts = iteration_prompts(rows, iteration, cfg, job.seed)
    direction = None
    if method in ZO_METHODS and iteration >= 1:
        direction = {
            "policy_prev": job.input["prev_policy"],
            "policy_prev2": job.input["policy_prev2"],
            "reward_i": job.input["reward"],
            "reward_prev": job.input["reward_prev"],
        }
    summary = train_policy(
        method,
        iteration,
        job.params["base"],
        job.input["prev_policy"],
        job.input["sft"],
        job.input["reward"],
        prompts,
        out_dir,
        cfg,
        job.stage_seed("policy"),
        task_of(cfg["dataset"]["name"]),
        direction_inputs=direction,
        checkpoint_dir=job.params.get("checkpoints"),
        data=data,
    )
    print(summary)
