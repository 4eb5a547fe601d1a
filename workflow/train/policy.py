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
  overwritten with the SFT adapter's (:func:`workflow.models.lora.load_adapter_weights`, every tensor checked).
* ``ppo``: the SFT adapter is loaded as a second, frozen adapter ``ref`` on the same PeftModel and
  ``PPOConfig.ref_adapter_name="ref"`` makes PPO switch to it for the reference forward pass.
* ``dpo``: ``OnlineDPOTrainer`` takes an explicit ``ref_model``: base + SFT adapter, frozen
  (one extra copy of the base weights; fine for the sizes this project trains on one device).

Only the ``default`` adapter is saved (``adapter/``) and snapshotted (the ``ref`` tensors are
frozen, and snapshots hold trainable tensors only).

Reward
------
``rloo``, ``zorloo`` and ``dpo`` get a :class:`RewardFunction` callable: it scores
``prompt + completion`` with the LoRA reward model ``i`` (``workflow.train.scoring.reward_scores``, the
same text rendering the reward model was trained on), **raises** on a NaN score (trl would
otherwise turn NaN into 0 silently) and records every scored rollout. Those records are the
trainer's own rollouts and become ``samples.parquet``. ``ppo`` needs a sequence-classification
model object (``get_reward`` reads the backbone and ``score`` head directly), so it gets the reward
model with its LoRA merged (``merge_and_unload``), and its value model is a separate, trainable
deep copy of that merged model (PPO never changes the reward model). ``get_reward`` reads the
score at a rollout's last token, the stop token, one token short of where the reward model was
trained and where ``reward_scores`` reads it (the end of the chat rendering: ``<|im_end|>`` and a
newline for the embedded task); :class:`workflow.train.scoring.TemplateEndReward` appends the template's end so that PPO
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

import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from workflow.schema import METHODS, ZO_METHODS, section
from workflow.train.policy_trainers import (
    BUILDERS,
    PolicyConfigError,
    PolicySnapshotCallback,
    PolicyStage,
    kl_controller,
)
from workflow.train.scoring import RewardFunction, gold_scorer

if TYPE_CHECKING:
    from workflow.job import Job


def zopro_variant(method: str, cfg: dict[str, Any]) -> str:
    """The ZOPrO variant a ZO method trains with: ``reference`` or ``guarded``."""
    return "reference" if method == "zorloo_reference" else str(cfg["zopro"]["variant"])


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------
def iteration_indices(n_rows: int, iteration: int, loop_cfg: dict[str, Any], seed: int) -> np.ndarray:
    """Row indices of the prompts iteration ``iteration`` trains on (see the module docstring)."""
    if n_rows <= 0:
        raise PolicyConfigError("there are no training prompts")
    loop = section({"loop": loop_cfg}, "loop")
    if not loop["intraepoch"]:
        return np.arange(n_rows)
    fraction = float(loop["iteration_fraction"])
    size = max(1, min(n_rows, math.ceil(fraction * n_rows - 1e-9)))
    order = np.random.default_rng(int(seed)).permutation(n_rows)
    start = int(iteration) * size
    return order[(start + np.arange(size)) % n_rows]


def iteration_prompts(rows: pd.DataFrame, iteration: int, cfg: dict[str, Any], seed: int) -> list[list[dict]]:
    """Prompt message lists of iteration ``iteration``."""
    idx = iteration_indices(len(rows), iteration, section(cfg, "loop"), seed)
    return [list(rows["prompt"].iloc[int(k)]) for k in idx]


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
    (:mod:`workflow.train.resume`); a killed stage rerun with the same config and inputs continues from
    its last checkpoint (``ppo`` excepted: trl's PPOTrainer cannot resume, it restarts the
    iteration). Data-parallel processes must all be given the same folder. ``data``: the accounting
    of the prompts' rows (``workflow.data.accounting``), added to the summary.
    """
    from transformers import set_seed

    from workflow.io import atomic_dir, link_tree, write_parquet
    from workflow.models.loading import load_policy, load_reward_model, load_tokenizer
    from workflow.train.kit import write_metrics
    from workflow.train.resume import StageCheckpoints, fingerprint

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
    variant = zopro_variant(method, cfg) if zo else None
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
        kl_control = kl_controller(kind, cfg, prev_adapter, variant)
        if kl_control is not None:
            callbacks.append(kl_control)
        built = BUILDERS[kind](
            PolicyStage(
                model,
                tokenizer,
                reward_fn,
                prompts,
                cfg,
                trainer_dir,
                seed,
                callbacks,
                base_path,
                sft_adapter,
                variant=variant,
                direction_inputs=direction_inputs,
            )
        )
        trainer = built.trainer
        if kl_control is not None:
            kl_control.bind(trainer)
        resume = {"resume_from_checkpoint": str(state.checkpoint) if state.checkpoint else None}
        result = trainer.train(**(resume if built.resumable else {}))
        model.set_adapter("default")
        model.save_pretrained(adapter, selected_adapters=["default"])
        tokenizer.save_pretrained(adapter)
        if built.after_train is not None:
            built.after_train()
        samples = reward_fn.samples(every_process=True)
        if samples.empty:
            raise RuntimeError(f"policy {method} iteration {iteration}: the trainer scored no rollouts")
        steps = int(trainer.state.global_step)
        summary = {
            "stage": "policy",
            "method": method,
            "iteration": int(iteration),
            "trainer": kind,
            **({"zopro_variant": variant} if zo else {}),
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
        link_tree(state.snapshots, snaps)  # the resumable state keeps its own until the outputs are committed
    state.finish()
    return summary


def run(job: Job) -> None:
    """Stage function of rule ``train_policy``."""
    from workflow.data.accounting import usable_rows
    from workflow.data.datasets import task_of
    from workflow.models.loading import load_tokenizer, read_rows

    cfg = job.config
    method = job.wildcards["method"]
    iteration = int(job.wildcards["i"])
    out_dir = job.stage_dir
    tokenizer = load_tokenizer(job.params["base"], task_of(cfg["dataset"]["name"]))
    rows, data = usable_rows(
        read_rows(job.input["train"]),
        tokenizer,
        cfg["model"]["max_length"],
        "prompts",
        job.input["train"],
        generation_length=cfg["model"]["generation_length"],
    )
    prompts = iteration_prompts(rows, iteration, cfg, job.seed)
    direction = None
    if method in ZO_METHODS and iteration >= 1:
        direction = {name: job.input[name] for name in ("policy_prev", "policy_prev2", "reward", "reward_prev")}
    summary = train_policy(
        method,
        iteration,
        job.params["base"],
        job.input["policy_prev"],
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
