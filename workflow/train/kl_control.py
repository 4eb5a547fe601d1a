"""Adaptive KL control of a policy stage: steer the KL penalty's coefficient toward a target KL to SFT.

A fixed coefficient means different things under different reward models: the scores of a refined
reward model have another scale than those of its predecessor, and with raw Bradley-Terry scores
(spread of several units) the default ``kl_coef`` of 0.01 is too weak to hold the policy near SFT.
This is the proportional controller of Ziegler et al. (2019, "Fine-Tuning Language Models from
Human Preferences"), applied after every optimiser step, with the configured coefficient as its
floor::

    error = clip(KL / target - 1, -0.2, 1.0)
    coef  = max(floor, coef * (1 + error / horizon))

The floor makes the target a budget: below it the configured coefficient applies, above it the
penalty grows until the KL is back under it. The error is clipped at +1 rather than Ziegler's +0.2
so that the penalty can catch a runaway: with +0.2 and a horizon of 2 (10% a step) an rloo stage on
seed 2 went from KL 1 to 10 in 20 steps while its coefficient crept from 0.01 to 0.05 (README). Without a floor (the plain controller) a stage whose
KL stayed below the target drove the coefficient toward 0 and handed it on to the next iteration,
whose KL then exploded (embedded task, seed 1: rloo 0.38 -> 6.1 -> 13.9, ppo 1.1 -> 24.5; README).

``KL`` is the sequence-level KL to the SFT reference on the step's rollouts as the trainer itself
estimated it (RLOO: its per-token ``kl`` times ``completions/mean_length``; PPO:
``objective/kl``), ``horizon`` is in optimiser steps. The coefficient is written into each log row
(``kl_coef``), so it is in ``metrics.csv``, survives a resume (restored from the log history) and
carries over to the next iteration (:func:`previous_coefficient`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from workflow.io import read_table

COLUMN = "kl_coef"


@dataclass(frozen=True)
class KLTarget:
    """Settings of the controller: ``policy.kl_target``, ``policy.kl_horizon``, the configured
    coefficient as the floor and, for online DPO, ``policy.dpo_beta_max`` as the ceiling."""

    target: float
    horizon: float
    floor: float
    ceiling: float = math.inf

    def update(self, coef: float, kl: float) -> float:
        """The coefficient after one step whose rollouts had sequence-level KL ``kl``."""
        if not math.isfinite(kl):
            return coef
        error = min(1.0, max(-0.2, kl / self.target - 1.0))
        return min(self.ceiling, max(self.floor, coef * (1.0 + error / self.horizon)))


def sequence_kl(logs: dict[str, Any]) -> float | None:
    """Sequence-level KL to the reference in one trainer log row, or None when the row has none."""
    if "objective/kl" in logs:  # PPO, online DPO: summed over tokens, mean over rollouts
        return float(logs["objective/kl"])
    if "kl" in logs and "completions/mean_length" in logs:  # RLOO: mean per completion token
        return float(logs["kl"]) * float(logs["completions/mean_length"])
    return None


class AdaptiveKLCallback(TrainerCallback):
    """Adapts ``trainer.beta`` (RLOO, ZOPrO, online DPO) or ``trainer.args.kl_coef`` (PPO) after every
    logged step. Online DPO's beta is not a reward penalty but plays the same part: the larger it
    is, the closer DPO's implicit reward keeps the policy to the reference."""

    def __init__(self, control: KLTarget, initial: float):
        self.control = control
        self.initial = min(control.ceiling, max(control.floor, float(initial)))
        self.trainer = None

    def bind(self, trainer) -> AdaptiveKLCallback:
        """Attach the trainer whose coefficient this callback steers; sets the starting value."""
        self.trainer = trainer
        self._set(self.initial)
        return self

    def _get(self) -> float:
        return float(self.trainer.args.kl_coef if hasattr(self.trainer.args, "kl_coef") else self.trainer.beta)

    def _set(self, value: float) -> None:
        if hasattr(self.trainer.args, "kl_coef"):  # PPO reads args.kl_coef at every step
            self.trainer.args.kl_coef = float(value)
        elif hasattr(self.trainer, "_beta"):  # online DPO: beta is a read-only property over _beta
            self.trainer._beta = float(value)
        else:
            self.trainer.beta = float(value)

    def on_train_begin(self, args, state, control, **kwargs):
        """On a resume, continue from the coefficient of the last logged step."""
        logged = [row[COLUMN] for row in state.log_history if COLUMN in row]
        if logged:
            self._set(logged[-1])

    def on_log(self, args, state, control, logs=None, **kwargs):
        kl = sequence_kl(logs or {})
        if kl is None or not state.log_history:
            return
        coef = self.control.update(self._get(), kl)
        self._set(coef)
        state.log_history[-1][COLUMN] = coef


def previous_coefficient(stage_dir: str | os.PathLike, default: float) -> float:
    """The last ``kl_coef`` logged in ``stage_dir/metrics.csv`` (the previous iteration's policy
    stage), else ``default`` (iteration 0, whose predecessor is SFT, or a fixed coefficient)."""
    path = Path(stage_dir) / "metrics.csv"
    if not path.exists():
        return float(default)
    metrics = read_table(path)
    if COLUMN not in metrics:
        return float(default)
    values = metrics[COLUMN].dropna()
    return float(values.iloc[-1]) if len(values) else float(default)
