"""Adaptive KL control: the controller's update, its reading of trl's logs, and a real policy stage."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
from test_policy import CFG, stage_inputs, train_stage

from workflow.train import policy, policy_trainers
from workflow.train.kl_control import KLTarget, previous_coefficient, sequence_kl


def test_update_is_proportional_clipped_floored_and_ignores_nan():
    control = KLTarget(target=2.0, horizon=10, floor=0.05)
    assert control.update(0.1, 2.0) == pytest.approx(0.1)  # on target: unchanged
    assert control.update(0.1, 2.2) == pytest.approx(0.1 * 1.01)  # 10% over: +1%
    assert control.update(0.1, 3.0) == pytest.approx(0.1 * 1.05)  # 50% over: +5%
    assert control.update(0.1, 50.0) == pytest.approx(0.1 * 1.1)  # clipped at +100% / horizon
    assert control.update(0.1, 0.0) == pytest.approx(0.1 * 0.98)  # clipped at -20% / horizon
    assert control.update(0.05, 0.0) == 0.05  # never below the floor
    assert KLTarget(2.0, 10, floor=0.05, ceiling=0.1).update(0.1, 50.0) == 0.1  # nor above a ceiling
    assert control.update(0.1, float("nan")) == 0.1


def test_sequence_kl_of_each_trainer_log():
    assert sequence_kl({"objective/kl": 3.5}) == 3.5  # PPO
    assert sequence_kl({"kl": 0.25, "completions/mean_length": 12.0}) == 3.0  # RLOO per token
    assert sequence_kl({"loss": 1.0}) is None


def test_previous_coefficient(tmp_path):
    assert previous_coefficient(tmp_path, 0.01) == 0.01  # no metrics (SFT)
    pd.DataFrame({"step": [1, 2, 3], "kl_coef": [0.02, 0.03, None]}).to_csv(tmp_path / "metrics.csv")
    assert previous_coefficient(tmp_path, 0.01) == 0.03
    pd.DataFrame({"step": [1]}).to_csv(tmp_path / "metrics.csv")
    assert previous_coefficient(tmp_path, 0.01) == 0.01


def test_zeroth_order_stages_keep_the_configured_coefficient(tmp_path):
    """ZOPrO stages get no adaptive controller, even with a KL budget set: a zeroth-order policy
    cannot answer a growing coefficient (measured: beta 1e7 within 40 steps); iteration 0 of the
    ZOPrO methods is first-order RLOO and keeps it."""
    cfg = copy.deepcopy(CFG)
    cfg["policy"].update(kl_target=1.0, kl_horizon=2)
    assert policy_trainers.kl_controller("zopro", cfg, str(tmp_path / "adapter")) is None
    assert policy_trainers.kl_controller("rloo", cfg, str(tmp_path / "adapter")) is not None


def test_guarded_stage_can_carry_the_previous_coefficient_fixed(tmp_path):
    """``zopro.carry_kl_coef``: the guarded variant keeps the coefficient the previous iteration
    ended with, whatever its KL, and logs it for the next iteration; the paper's variant does not."""
    from types import SimpleNamespace

    previous = tmp_path / "iter_0" / "policy"
    previous.mkdir(parents=True)
    pd.DataFrame({"step": [1, 2], "kl_coef": [0.1, 0.3]}).to_csv(previous / "metrics.csv", index=False)
    cfg = copy.deepcopy(CFG)
    cfg["policy"].update(kl_target=1.0, kl_horizon=2)
    cfg["zopro"]["carry_kl_coef"] = True
    adapter = str(previous / "adapter")
    assert policy_trainers.kl_controller("zopro", cfg, adapter, "reference") is None
    callback = policy_trainers.kl_controller("zopro", cfg, adapter, "guarded")
    trainer = _Trainer(SimpleNamespace(beta=cfg["policy"]["kl_coef"]))
    callback.bind(trainer)
    assert trainer.beta == 0.3
    for kl in (0.0, 50.0):
        state = SimpleNamespace(log_history=[{"kl": kl, "completions/mean_length": 8}])
        callback.on_log(None, state, None, logs=state.log_history[-1])
        assert trainer.beta == 0.3 and state.log_history[-1]["kl_coef"] == 0.3
    cfg["zopro"]["carry_kl_coef"] = False
    assert policy_trainers.kl_controller("zopro", cfg, adapter, "guarded") is None


@pytest.mark.parametrize(("cap", "carried"), [(1.0, 1.0), (None, 14.9), (0.01, 0.05)])
def test_carried_coefficient_is_capped(cap, carried, tmp_path):
    """``zopro.kl_coef_max`` caps the carried coefficient (iteration 0 ended at 14.9 on seed 2), never
    below the configured ``policy.kl_coef`` (0.05); null carries it whole."""
    from types import SimpleNamespace

    previous = tmp_path / "iter_0" / "policy"
    previous.mkdir(parents=True)
    pd.DataFrame({"step": [1, 2], "kl_coef": [3.0, 14.9]}).to_csv(previous / "metrics.csv", index=False)
    cfg = copy.deepcopy(CFG)
    cfg["policy"].update(kl_target=1.0, kl_horizon=2, kl_coef=0.05)
    cfg["zopro"].update(carry_kl_coef=True, kl_coef_max=cap)
    trainer = _Trainer(SimpleNamespace(beta=0.05))
    policy_trainers.kl_controller("zopro", cfg, str(previous / "adapter"), "guarded").bind(trainer)
    assert trainer.beta == pytest.approx(carried)


@pytest.mark.parametrize("method", ["rloo", "ppo", "dpo"])
def test_stage_steers_the_coefficient(method, tiny_base, adapters, embedded_frames, tmp_path, set_precision):
    """Every logged coefficient is the controller's update of the one before with that step's KL,
    starting from the configured coefficient, which is also its floor: a target far above the
    rollouts' KL keeps the configured value, a target far below raises it at exactly the steps whose
    KL is above it. The KL is an estimate from a handful of rollouts and can be negative (PPO's sum
    of log-ratios: -0.027 after one update at learning rate 0.01 under bf16 on an H200), so the
    stage runs in fp32 with a learning rate that moves the policy well past that noise, for 4 steps."""
    set_precision("fp32")
    iteration = stage_inputs(method, adapters)[0]
    prompts = policy.iteration_prompts(embedded_frames["train"], iteration, CFG, seed=0)[:16]
    for target in (1e-6, 1e6):
        cfg = copy.deepcopy(CFG)
        cfg["policy"].update(kl_target=target, kl_horizon=2, ppo_kl_coef=None, dpo_beta=None, learning_rate=0.1)
        out = tmp_path / f"{target}"
        train_stage(method, tiny_base, adapters, prompts, out, cfg)
        rows = pd.read_csv(out / "metrics.csv")
        rows = rows[rows["kl_coef"].notna()].to_dict("records")
        assert len(rows) >= 4
        floor = cfg["policy"]["kl_coef"]
        control, coef = KLTarget(target, 2, floor=floor), floor
        kls = [sequence_kl({k: v for k, v in row.items() if pd.notna(v)}) for row in rows]
        for row, kl in zip(rows, kls):
            coef = control.update(coef, kl)
            assert row["kl_coef"] == pytest.approx(coef, rel=1e-9)
        coefs = np.array([floor] + [row["kl_coef"] for row in rows])
        assert (coefs >= floor).all()
        raised = coefs[1:] > coefs[:-1]
        np.testing.assert_array_equal(raised, np.array(kls) > target)
        assert raised.any() == (target == 1e-6)


class _Trainer:
    def __init__(self, args):
        self.args, self.beta = args, 0.01


def test_callback_sets_the_coefficient_each_trainer_reads():
    from types import SimpleNamespace

    from workflow.train.kl_control import AdaptiveKLCallback

    rloo = _Trainer(SimpleNamespace(beta=0.01))
    AdaptiveKLCallback(KLTarget(1.0, 10, 0.01), 0.3).bind(rloo)
    assert rloo.beta == 0.3  # RLOO and ZOPrO read trainer.beta
    ppo = _Trainer(SimpleNamespace(kl_coef=0.2))
    callback = AdaptiveKLCallback(KLTarget(1.0, 10, 0.01), 0.3).bind(ppo)
    assert ppo.args.kl_coef == 0.3  # PPO reads args.kl_coef every step
    dpo = _Trainer(SimpleNamespace(beta=[0.1]))
    dpo._beta = [0.1]
    AdaptiveKLCallback(KLTarget(1.0, 10, 0.01), 0.3).bind(dpo)
    assert dpo._beta == 0.3  # online DPO's beta property reads _beta
    state = SimpleNamespace(log_history=[{"step": 1, "kl_coef": 0.7}])
    callback.on_train_begin(None, state, None)  # a resume continues the logged value
    assert ppo.args.kl_coef == 0.7


def test_fixed_coefficient_has_no_controller_and_budget_needs_a_positive_one(adapters):
    cfg = copy.deepcopy(CFG)
    assert policy_trainers.kl_controller("rloo", cfg, adapters["sft"]) is None
    cfg["policy"].update(kl_target=1.0, kl_horizon=10)
    for method in ("rloo", "ppo", "dpo"):
        assert policy_trainers.kl_controller(method, cfg, adapters["sft"]) is not None
    cfg["policy"]["dpo_beta_max"] = 0.3
    assert policy_trainers.kl_controller("dpo", cfg, adapters["sft"]).control.ceiling == 0.3
    assert policy_trainers.kl_controller("rloo", cfg, adapters["sft"]).control.ceiling == float("inf")
    cfg["policy"]["kl_coef"] = 0.0
    with pytest.raises(policy.PolicyConfigError, match="policy.kl_coef"):
        policy_trainers.kl_controller("rloo", cfg, adapters["sft"])
