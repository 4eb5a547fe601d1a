"""Resuming a killed policy stage from its own trainer checkpoints (workflow/train/resume.py).

A stage is "killed" by an exception raised from the reward function in the middle of a step
(after a checkpoint was saved); rerunning the stage with the same config and inputs must resume
from that checkpoint and end exactly where an uninterrupted run ends.
"""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
from test_policy import CFG, train_stage

from workflow.models import lora
from workflow.models.snapshots import read_index
from workflow.train import policy, scoring


class Killed(KeyboardInterrupt):
    """Stands for the SIGINT / SIGKILL of a real run."""


def _cfg(**policy_overrides):
    cfg = copy.deepcopy(CFG)
    cfg["policy"].update(checkpoint_every=0.25, **policy_overrides)
    cfg["snapshots"]["every"] = 0.25
    return cfg


def _run(method, tiny_base, adapters, prompts, out, checkpoints, cfg):
    return train_stage(method, tiny_base, adapters, prompts, out, cfg, checkpoint_dir=checkpoints)


def _assert_same_stage(out, whole) -> None:
    """The stage in ``out`` ended where the uninterrupted one in ``whole`` did: every adapter tensor
    (to 1e-6) and the snapshot steps."""
    a, b = lora.adapter_state(whole / "adapter"), lora.adapter_state(out / "adapter")
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    assert read_index(out / "snapshots")["step"].tolist() == read_index(whole / "snapshots")["step"].tolist()


def _kill_at_step(monkeypatch, step: int) -> None:
    """Make the reward function raise while the trainer computes step ``step + 1``."""
    original = scoring.RewardFunction.__call__

    def call(self, prompts, completions, step_=None, **kwargs):
        state = kwargs.get("trainer_state")
        if state is not None and state.global_step == step:
            raise Killed(f"killed during step {step + 1}")
        return original(self, prompts, completions, step_, **kwargs)

    monkeypatch.setattr(scoring.RewardFunction, "__call__", call)


@pytest.mark.parametrize("method", ["rloo", "zorloo", "zorloo_reference", "dpo"])
def test_killed_stage_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_run(
    method, tiny_base, adapters, embedded_frames, tmp_path, monkeypatch
):
    # rloo/zorloo: 2 prompts per step (batch 4, k 2), dpo: 4 per step -> 8 steps each
    prompts = [list(p) for p in embedded_frames["train"]["prompt"].iloc[: 32 if method == "dpo" else 16]]
    whole = _run(method, tiny_base, adapters, prompts, tmp_path / "whole", tmp_path / "whole_ckpt", _cfg())
    assert whole["resumed_from_step"] == 0
    steps = whole["steps"]
    assert steps >= 6
    every = -(-steps // 4)  # checkpoint_every 0.25
    kill_step = 2 * every + 1  # one step after the second checkpoint

    out, ckpt = tmp_path / "killed", tmp_path / "killed_ckpt"
    with monkeypatch.context() as patch:
        _kill_at_step(patch, kill_step)
        with pytest.raises(Killed):
            _run(method, tiny_base, adapters, prompts, out, ckpt, _cfg())
    assert not (out / "adapter").exists() and not (out / "samples.parquet").exists()  # no half outputs
    assert (ckpt / "trainer" / f"checkpoint-{2 * every}" / "trainer_state.json").exists()
    assert read_index(ckpt / "snapshots")["step"].max() >= 2 * every

    resumed = _run(method, tiny_base, adapters, prompts, out, ckpt, _cfg())
    assert resumed["resumed_from_step"] == 2 * every
    assert resumed["steps"] == steps
    assert not ckpt.exists()  # the resumable state is removed once the outputs are written
    _assert_same_stage(out, tmp_path / "whole")
    samples_a = pd.read_parquet(tmp_path / "whole" / "samples.parquet")
    samples_b = pd.read_parquet(out / "samples.parquet")
    assert samples_b["step"].tolist() == samples_a["step"].tolist()
    assert samples_b["completion"].tolist() == samples_a["completion"].tolist()
    # the log history continues from the checkpoint: the same rows as the uninterrupted run's
    log_a, log_b = (pd.read_csv(tmp_path / d / "metrics.csv") for d in ("whole", "killed"))
    assert log_b["step"].tolist() == log_a["step"].tolist()


def test_changed_config_discards_the_saved_state(tiny_base, adapters, embedded_frames, tmp_path, monkeypatch):
    prompts = policy.iteration_prompts(embedded_frames["train"], 0, CFG, seed=0)[:16]
    ckpt = tmp_path / "ckpt"
    with monkeypatch.context() as patch:
        _kill_at_step(patch, 5)
        with pytest.raises(Killed):
            _run("rloo", tiny_base, adapters, prompts, tmp_path / "out", ckpt, _cfg())
    assert (ckpt / "trainer").exists()
    summary = _run("rloo", tiny_base, adapters, prompts, tmp_path / "out", ckpt, _cfg(learning_rate=5e-3))
    assert summary["resumed_from_step"] == 0


def test_killed_ppo_stage_restarts_its_iteration_and_ends_like_an_uninterrupted_run(
    tiny_base, adapters, embedded_frames, tmp_path, monkeypatch
):
    """trl's PPO cannot resume from a checkpoint: a killed PPO stage starts its iteration again."""
    from transformers import TrainerCallback

    from workflow.train import policy_trainers

    prompts = policy.iteration_prompts(embedded_frames["train"], 0, CFG, seed=0)[:8]
    whole = _run("ppo", tiny_base, adapters, prompts, tmp_path / "whole", tmp_path / "whole_ckpt", _cfg())
    assert whole["resumed_from_step"] == 0 and whole["steps"] >= 2

    class KillAfterFirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise Killed("killed after step 1")

    build_ppo = policy_trainers.BUILDERS["ppo"]

    def killed_build(stage):
        built = build_ppo(stage)
        built.trainer.add_callback(KillAfterFirstStep())
        return built

    out, ckpt = tmp_path / "killed", tmp_path / "killed_ckpt"
    with monkeypatch.context() as patch:
        patch.setitem(policy_trainers.BUILDERS, "ppo", killed_build)
        with pytest.raises(Killed):
            _run("ppo", tiny_base, adapters, prompts, out, ckpt, _cfg())
    assert not (out / "adapter").exists() and read_index(ckpt / "snapshots")["step"].max() >= 1

    again = _run("ppo", tiny_base, adapters, prompts, out, ckpt, _cfg())
    assert again["resumed_from_step"] == 0 and again["steps"] == whole["steps"]
    assert not ckpt.exists()
    _assert_same_stage(out, tmp_path / "whole")


def test_fingerprint_follows_config_inputs_and_code_but_not_plot_settings(tmp_path, monkeypatch):
    import os

    from workflow.train import resume

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    cfg = _cfg()
    base = resume.fingerprint(cfg, [adapter], method="rloo")
    assert resume.fingerprint(copy.deepcopy(cfg), [adapter], method="rloo") == base
    assert resume.fingerprint({**cfg, "plots": {"layer": 3}}, [adapter], method="rloo") == base
    assert resume.fingerprint(_cfg(learning_rate=0.5), [adapter], method="rloo") != base
    assert resume.fingerprint(cfg, [adapter], method="dpo") != base
    stat = (adapter / "adapter_model.safetensors").stat()
    os.utime(adapter / "adapter_model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten
    assert resume.fingerprint(cfg, [adapter], method="rloo") != base
    changed = resume.fingerprint(cfg, [adapter], method="rloo")
    original = resume.Path.read_bytes
    monkeypatch.setattr(resume.Path, "read_bytes", lambda self: original(self) + b"# edited")  # the code changed
    assert resume.fingerprint(cfg, [adapter], method="rloo") != changed


def test_a_cut_trainer_state_is_no_checkpoint_and_a_damaged_fingerprint_starts_afresh(tmp_path):
    """The Trainer writes a checkpoint's files in place: a kill or a full disk can cut
    ``trainer_state.json`` (written last); resuming from such a checkpoint would fail on its JSON."""
    import json

    from workflow.train import resume

    ckpt = tmp_path / "ckpt"
    trainer = ckpt / "trainer"

    def checkpoints():
        for step, state in ((2, '{"global_step": 2}'), (4, '{"global_st')):
            (trainer / f"checkpoint-{step}").mkdir(parents=True, exist_ok=True)
            (trainer / f"checkpoint-{step}" / "trainer_state.json").write_text(state)

    checkpoints()
    assert resume.complete_checkpoints(trainer) == [(2, trainer / "checkpoint-2")]
    (ckpt / "fingerprint.json").write_text(json.dumps({"fingerprint": "abc"}))
    state = resume.StageCheckpoints(ckpt, "abc")
    assert (state.step, state.checkpoint) == (2, trainer / "checkpoint-2")
    assert not (trainer / "checkpoint-4").exists()  # the cut one is deleted

    checkpoints()
    (ckpt / "fingerprint.json").write_text('{"fingerpr')
    state = resume.StageCheckpoints(ckpt, "abc")
    assert (state.step, state.checkpoint) == (0, None) and not trainer.exists()
    assert json.loads((ckpt / "fingerprint.json").read_text()) == {"fingerprint": "abc"}
