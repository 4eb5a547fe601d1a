"""ZOPrO (methods ``zorloo`` and ``zorloo_reference``, iterations >= 1): RLOO with a zeroth-order update.

:class:`ZOPrOTrainer` subclasses ``trl.RLOOTrainer`` and keeps everything of RLOO (generation,
reward scoring, KL penalty to the frozen reference folded into the rewards, leave-one-out
advantages, the PPO-clip loss, buffering over ``steps_per_generation`` / ``num_iterations``), so
first- and zeroth-order runs differ only in how they step. Two variants, chosen by the type of
``zo_config``:

* :class:`~workflow.zo.guarded.GuardedConfig` (``zopro.variant: guarded``, the default): a
  bounded momentum step before the first batch (``train``), then per rollout batch the guarded
  updates of :class:`~workflow.zo.guarded.GuardedEngine` inside ``training_step``; the
  optimizer facade only carries the engine's state into checkpoints.
* :class:`~workflow.zo.direction.ZOConfig` (``reference``, the paper's algorithm), described
  below.

Reference variant:

* ``training_step`` takes the micro-batch RLOO prepared (``self._prepare_inputs``) and, under
  ``torch.no_grad``, evaluates the parent's loss (``RLOOTrainer._compute_loss`` without its
  metrics: ``_probe_loss``) at ``theta +/- eps z`` (see :mod:`workflow.zo.direction` for ``z``),
  restoring the parameters in place; the projected gradients accumulate over the
  gradient-accumulation micro-batches;
* the Trainer's optimizer is a stateless :class:`~workflow.zo.engine.ZOOptimizer` whose
  ``step()`` applies ``theta <- theta - lr * (g z + wd theta)`` once per update (``g`` averaged
  over micro-batches and, in data-parallel runs, over processes with one all-reduce), so the
  Trainer's own optimizer step is the ZO update and nothing else moves the parameters. Gradient
  clipping is switched off (``max_grad_norm = 0``): there are no gradients.
* the lr applied is the optimizer group's lr, i.e. ``zo_config.lr`` shaped by
  ``args.lr_scheduler_type`` (use ``"constant"`` for the reference behaviour);
* resume: the ZO state (update step, hence seed and gamma; skipped count; pending accumulation)
  is part of ``optimizer.state_dict()`` and therefore of every HF checkpoint (``optimizer.pt``);
  ``trainer.train(resume_from_checkpoint=...)`` continues a killed stage where it stopped.
  The lr scheduler state is saved by the Trainer as usual (``scheduler.pt``).

How the policy stage calls it (drop-in for ``RLOOTrainer`` plus three keyword arguments)::

    mu, v = load_direction_inputs(policy_prev, policy_prev2, reward, reward_prev)
    trainer = ZOPrOTrainer(model=peft_policy, reward_funcs=reward_fn, args=rloo_config,
                           train_dataset=ds, processing_class=tok, callbacks=[...],
                           mu=mu, v=v, zo_config=ZOConfig.from_config(cfg["zopro"]["reference"], seed))
    trainer.train(resume_from_checkpoint=...)

``mu``/``v`` are dicts keyed by LoRA keys (normalised with :func:`workflow.models.snapshots.normalise_key`;
:func:`load_direction_inputs` makes them from the adapter folders). ``model`` must
already be the PEFT policy (trainable LoRA tensors = the tensors ZOPrO moves); passing
``peft_config`` also works (the LoRA is then freshly initialised by the Trainer).
ZOPrO metrics are logged with the RLOO ones: ``zo/g``, ``zo/g_abs``, ``zo/gamma``, ``zo/step``,
``zo/lr``, ``zo/skipped`` (non-finite ``g``, update skipped).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from trl import RLOOTrainer

from workflow.models.snapshots import load_tensors, normalise_key
from workflow.runtime import seeded_rng
from workflow.zo.direction import ZOConfig
from workflow.zo.engine import ZOEngine, ZOOptimizer
from workflow.zo.guarded import GuardedConfig, GuardedEngine

ADAPTER_FILE = "adapter_model.safetensors"

__all__ = ["GuardedConfig", "ZOConfig", "ZOPrOTrainer", "load_adapter_tensors", "load_direction_inputs"]


def _adapter_file(path: str | os.PathLike) -> Path:
    """``adapter_model.safetensors`` of an adapter folder, a stage folder (``<stage>/adapter``) or a file."""
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (p / ADAPTER_FILE, p / "adapter" / ADAPTER_FILE):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no {ADAPTER_FILE} in {p} (nor in {p / 'adapter'})")


def load_adapter_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a saved adapter, float32, keyed by normalised LoRA keys."""
    return {normalise_key(k): t.to(torch.float32) for k, t in load_tensors(_adapter_file(path)).items()}


def _difference(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k in new.keys() & old.keys():
        if new[k].shape != old[k].shape:
            raise ValueError(f"{k}: shapes {tuple(new[k].shape)} and {tuple(old[k].shape)} differ")
        out[k] = new[k] - old[k]
    return out


def load_direction_inputs(
    policy_prev: str | os.PathLike,
    policy_prev2: str | os.PathLike,
    reward: str | os.PathLike,
    reward_prev: str | os.PathLike,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(mu, v)`` from adapter folders.

    ``mu = policy_{i-1} - policy_{i-2}`` (pass the SFT adapter as ``policy_prev2`` for i = 1),
    ``v = reward - reward_prev`` (reward models i and i-1), on the keys both adapters of a pair share. ``v`` is further
    restricted to the keys of ``mu`` (policy keys): the reward head (``score.weight``) and any
    reward-only tensor are dropped; a policy tensor without a reward counterpart gets plain
    (unprojected) noise, see :mod:`workflow.zo.direction`.
    """
    mu = _difference(load_adapter_tensors(policy_prev), load_adapter_tensors(policy_prev2))
    v = _difference(load_adapter_tensors(reward), load_adapter_tensors(reward_prev))
    v = {k: t for k, t in v.items() if k in mu}
    return mu, v


def _normalised(tensors: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    return {normalise_key(k): t for k, t in (tensors or {}).items()}


class ZOPrOTrainer(RLOOTrainer):
    """RLOO whose update is the ZOPrO zeroth-order step (see module docstring)."""

    _tag_names = ["trl", "zopro"]  # the tags of the saved adapter's model card (RLOOTrainer's: "rloo")

    def __init__(
        self,
        *args: Any,
        mu: Mapping[str, torch.Tensor] | None = None,
        v: Mapping[str, torch.Tensor] | None = None,
        zo_config: ZOConfig | GuardedConfig | None = None,
        **kwargs: Any,
    ):
        optimizers = kwargs.get("optimizers", (None, None))
        if optimizers and optimizers[0] is not None:
            raise ValueError("ZOPrOTrainer builds its own (stateless) optimizer; do not pass `optimizers`")
        self.zo_config = zo_config or ZOConfig()
        self._zo_mu = _normalised(mu)
        self._zo_v = _normalised(v)
        self.zo: ZOEngine | GuardedEngine | None = None
        super().__init__(*args, **kwargs)
        self.args.max_grad_norm = 0.0  # no gradients to clip
        self.args.learning_rate = self.zo_config.lr  # logged lr and scheduler base = the ZO lr
        self._stochastic_forward = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in self.model.modules())
        if self.guarded and self.args.gradient_accumulation_steps != 1:
            raise ValueError(
                "the guarded ZOPrO variant updates on whole rollout batches: gradient_accumulation_steps must be 1"
            )

    @property
    def guarded(self) -> bool:
        """Whether this is the guarded variant (:mod:`workflow.zo.guarded`), else the reference."""
        return isinstance(self.zo_config, GuardedConfig)

    # --- the optimizer seam ---------------------------------------------------------------
    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(normalise_key(n), p) for n, p in self.model.named_parameters() if p.requires_grad]

    def build_engine(self, total_steps: int | None = None) -> ZOEngine:
        if self.zo is None:
            named = self._trainable()
            if not named:
                raise ValueError("the model has no trainable parameters")
            if self.guarded:
                self.zo = GuardedEngine(named, self._zo_mu, self._zo_v, self.zo_config)
            else:
                self.zo = ZOEngine(named, self._zo_mu, self._zo_v, self.zo_config, total_steps=total_steps)
            self._zo_mu = self._zo_v = None  # the engine holds float32 device copies
        elif total_steps is not None and not self.guarded:
            self.zo.state.total_steps = total_steps
        return self.zo

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = ZOOptimizer(self.build_engine(), lr=self.zo_config.lr, on_step=self._record)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        self.build_engine(total_steps=int(num_training_steps))
        return super().create_scheduler(num_training_steps=num_training_steps, optimizer=optimizer)

    def _record(self, metrics: dict[str, float]) -> None:
        for k, val in metrics.items():
            self._metrics["train"][k].append(val)

    # --- the guarded variant's momentum step (once, before the first rollout batch) ----------
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """``RLOOTrainer.train``; the guarded variant first takes its momentum step (not when
        resuming: the checkpoint's weights already hold it, its optimizer state the metrics)."""
        if self.guarded and not resume_from_checkpoint:
            start = self._rollouts()
            self._record(self.build_engine().momentum(lambda: self._kl_from(start), self._kl_to_reference))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    @torch.no_grad()
    def _rollouts(self) -> dict[str, torch.Tensor]:
        """Fresh rollouts of the current policy for the first ``momentum_prompts`` training prompts
        (``num_generations`` each): token ids, masks and the policy's sequence log-probs. They are
        probes, not training rollouts: nothing of them is logged."""
        from trl.trainer.utils import pad

        prompts = list(self.train_dataset[: self.zo_config.momentum_prompts]["prompt"])
        prompts = [p for p in prompts for _ in range(self.num_generations)]
        logged = {mode: defaultdict(list, {k: list(v) for k, v in m.items()}) for mode, m in self._metrics.items()}
        prompt_ids, completion_ids, _ = self._generate(prompts)
        self._metrics = logged
        device, pad_id = self.accelerator.device, self._tokenizer.pad_token_id
        prompts_t = [torch.tensor(ids, device=device) for ids in prompt_ids]
        completions_t = [torch.tensor(ids, device=device) for ids in completion_ids]
        completion_mask = pad([torch.ones_like(t) for t in completions_t], padding_value=0, padding_side="right")
        rollouts = {
            "input_ids": torch.cat(
                [
                    pad(prompts_t, padding_value=pad_id, padding_side="left"),
                    pad(completions_t, padding_value=pad_id, padding_side="right"),
                ],
                dim=1,
            ),
            "attention_mask": torch.cat(
                [pad([torch.ones_like(t) for t in prompts_t], padding_value=0, padding_side="left"), completion_mask],
                dim=1,
            ),
            "completion_mask": completion_mask,
        }
        rollouts["logps"] = self._sequence_logps(rollouts)
        return rollouts

    def _sequence_logps(self, rollouts: dict[str, torch.Tensor], adapter: str | None = None) -> torch.Tensor:
        """Sequence log-probs of ``rollouts``' completions under the policy (or its ``adapter``)."""
        from trl.trainer.utils import use_adapter

        mask = rollouts["completion_mask"]
        with use_adapter(self.accelerator.unwrap_model(self.model), adapter_name=adapter) if adapter else nullcontext():
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model, rollouts["input_ids"], rollouts["attention_mask"], mask.size(1)
            )
        return (logps * mask).sum(1)

    @torch.no_grad()
    def _kl_from(self, start: dict[str, torch.Tensor]) -> float:
        """``KL(pi_start || pi_now)``, sequence level, on the rollouts ``start`` of ``pi_start``."""
        return float((start["logps"] - self._sequence_logps(start)).mean())

    @torch.no_grad()
    def _kl_to_reference(self) -> float:
        """``KL(pi_now || pi_ref)`` to the frozen ``ref`` adapter (SFT), sequence level, on fresh
        rollouts of the current policy (NaN without a ``ref`` adapter: no bound). Every call samples
        with the same random numbers (common random numbers), so the differences between momentum
        candidates are not swamped by sampling noise; the training RNG is left as it was."""
        if "ref" not in getattr(self.accelerator.unwrap_model(self.model), "peft_config", {}):
            return float("nan")
        with seeded_rng(self.zo_config.seed):  # the same random numbers for every candidate
            rollouts = self._rollouts()
        return float((rollouts["logps"] - self._sequence_logps(rollouts, adapter="ref")).mean())

    # --- the update -----------------------------------------------------------------------
    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        time_before = time.perf_counter()
        model.train()
        engine = self.build_engine()
        inputs = self._prepare_inputs(inputs)  # RLOO: generation, rewards, KL, advantages (buffered)

        def loss_fn() -> torch.Tensor:
            with self.compute_loss_context_manager():
                return self._probe_loss(model, inputs)

        with torch.no_grad():
            base = self._known_base(inputs)
            if self.guarded:
                self._record(engine.update(loss_fn, base=base))
                loss = torch.tensor(engine.last_loss)
            else:
                _, loss = engine.estimate(loss_fn, base=base)
        self._step += 1
        self._current_train_step_time += time.perf_counter() - time_before
        if self._step % self.current_gradient_accumulation_steps == 0:
            self._metrics["train"]["step_time"].append(self._current_train_step_time)
            self._current_train_step_time = 0.0
        return (loss.float() / self.current_gradient_accumulation_steps).to(self.args.device)

    def _probe_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """RLOO's PPO-clip loss (``RLOOTrainer._compute_loss``, the same operations) without its
        metrics: a probe at perturbed parameters computes no entropy over the vocabulary, reads
        nothing back from the device and logs no clip ratios of parameters the policy never takes.
        Inputs the text-only path does not cover (images, an auxiliary loss) go to the parent."""
        if self.aux_loss_enabled or any(inputs.get(k) is not None for k in ("pixel_values", "token_type_ids")):
            return self._compute_loss(model, inputs)
        completion_mask = inputs["completion_mask"]
        per_token_logps, _, _ = self._get_per_token_logps_and_entropies(
            model,
            torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
            torch.cat([inputs["prompt_mask"], completion_mask], dim=1),
            inputs["completion_ids"].size(1),
        )
        coef_1 = torch.exp((per_token_logps * completion_mask).sum(1) - inputs["old_logps"])
        coef_2 = torch.clamp(coef_1, 1 - self.epsilon_low, 1 + self.epsilon_high)
        advantages = inputs["advantages"]
        return -torch.min(coef_1 * advantages, coef_2 * advantages).mean()

    def _known_base(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        """The batch loss at the current parameters without a forward pass, where it is exact
        (``zopro.known_base``): on the first update after a generation the policy is the one that
        scored the rollouts, every ratio is 1 and the PPO-clip loss is ``-mean(advantages)``.
        None elsewhere: later updates on buffered rollouts, dropout still active after trl's
        ``disable_dropout`` (the training forward is then random), an auxiliary loss, the switch off."""
        if not self.zo_config.known_base or self._stochastic_forward or self.aux_loss_enabled:
            return None
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every >= self.current_gradient_accumulation_steps:
            return None
        return -inputs["advantages"].mean()
