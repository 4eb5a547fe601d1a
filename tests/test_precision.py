"""Config ``precision``: the bf16 path (a bf16 base with autocast, as on a GPU) run on any device.

Under ``precision: bf16`` the LoRA weights and output heads stay fp32, the PPO-clip ratio at the
first update of a rollout batch is 1, and frozen reward models score as in fp32 (README, "Precision").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_policy import CFG

from workflow import runtime
from workflow.models.loading import FP32Head, load_policy, load_reward_model, load_sequence_classifier, load_tokenizer
from workflow.schema import SCHEMA
from workflow.train import policy, policy_trainers, scoring

# |score(bf16) - score(fp32)|: both load the frozen reward model in fp32 (0 measured on CPU; a bf16
# reward model was off by up to 12% of the scores' spread, benchmarks/precision.py)
REWARD_TOLERANCE = 1e-5
# |ratio - 1| at the first update of a rollout batch: float rounding of sequence log-prob sums
RATIO_TOLERANCE = 1e-4


def test_precision_comes_from_the_job_config_with_the_schema_default(monkeypatch, set_precision):
    from snakemake.utils import validate

    from workflow import job as jobmod

    monkeypatch.setattr(jobmod, "resolve", lambda target: lambda job: (runtime.precision(), runtime.use_bf16()))

    def run(config):
        job = jobmod.Job(input={}, output={}, params={}, config=config, wildcards={}, threads=torch.get_num_threads())
        return jobmod.run_job(job, "stage:run")

    assert run({"precision": "bf16"}) == ("bf16", True)
    assert run({"precision": "fp32"}) == ("fp32", False)
    native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    assert run({}) == ("auto", native)
    # auto on GPUs: bf16 where it is native, fp32 where torch would only emulate it (V100, T4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for native in (True, False):
        monkeypatch.setattr(
            torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native: n or including_emulation
        )
        assert run({}) == ("auto", native)
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        run({"precision": "fp16"})
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    validate(config, str(SCHEMA))
    assert config["precision"] == "auto"


def test_lora_weights_and_heads_stay_fp32_on_a_bf16_base(set_precision, tiny_base, adapters):
    from peft import get_peft_model

    from workflow.models.lora import lora_config

    set_precision("bf16")
    tokenizer = load_tokenizer(tiny_base, "chat")
    models = {
        "policy": load_policy(tiny_base, adapters["sft"], trainable=True),
        "reward (refined)": load_reward_model(tiny_base, adapters["reward"], trainable=True),
        "reward (fresh)": get_peft_model(
            load_sequence_classifier(tiny_base, tokenizer.pad_token_id), lora_config(CFG, "SEQ_CLS")
        ),
    }
    for name, model in models.items():
        params = dict(model.named_parameters())
        base = {p.dtype for n, p in params.items() if "lora_" not in n and "score" not in n}
        assert base == {torch.bfloat16}, name
        assert {p.dtype for p in params.values() if p.requires_grad} == {torch.float32}, name
        assert {p.dtype for n, p in params.items() if "lora_" in n or "score" in n} == {torch.float32}, name
    frozen = load_reward_model(tiny_base, adapters["reward"])  # scoring: fp32 whatever the precision
    assert {p.dtype for p in frozen.parameters()} == {torch.float32}


def test_logits_are_fp32_inside_bf16_autocast(set_precision, tiny_base, adapters):
    set_precision("bf16")
    model = load_policy(tiny_base, adapters["sft"]).eval()
    head = model.get_output_embeddings()
    assert isinstance(head, FP32Head) and head.weight.dtype == torch.bfloat16
    ids = torch.tensor(
        [load_tokenizer(tiny_base, "chat").encode("Tell me about the river.")], device=head.weight.device
    )
    with torch.no_grad(), torch.autocast(ids.device.type, dtype=torch.bfloat16):
        out = model(input_ids=ids, output_hidden_states=True)
    assert out.logits.dtype == torch.float32  # and not bf16-rounded (8 significant bits) on the way:
    torch.testing.assert_close(out.logits, out.hidden_states[-1].float() @ head.weight.float().T, rtol=1e-5, atol=1e-6)


def test_rloo_first_update_ratio_is_one_under_bf16(set_precision, tiny_base, adapters, embedded_frames, tmp_path):
    """Each rollout batch is used for one update, so new and old log-probs must agree."""
    set_precision("bf16")
    tokenizer = load_tokenizer(tiny_base, "chat")
    tokenizer.padding_side = "left"
    model = load_policy(tiny_base, adapters["sft2"], trainable=True)
    reward = load_reward_model(tiny_base, adapters["reward"])
    reward_fn = scoring.RewardFunction(reward, load_tokenizer(adapters["reward"], "chat"), name="rm")
    prompts = policy.iteration_prompts(embedded_frames["train"], 0, CFG, seed=0)[:4]
    stage = policy_trainers.PolicyStage(
        model, tokenizer, reward_fn, prompts, CFG, str(tmp_path), 0, [], tiny_base, adapters["sft"]
    )
    trainer = policy_trainers.build_rloo(stage).trainer
    assert trainer.args.bf16 and model.get_input_embeddings().weight.dtype == torch.bfloat16
    logps_of, loss_of = trainer._get_per_token_logps_and_entropies, trainer._compute_loss
    last, log_ratios = {}, []

    def recording(*args, **kwargs):
        out = logps_of(*args, **kwargs)
        last["logps"] = out[0].detach()
        return out

    def loss(model, inputs):
        value = loss_of(model, inputs)  # its forward is the last one recorded
        log_ratios.append((last["logps"] * inputs["completion_mask"]).sum(1) - inputs["old_logps"])
        return value

    trainer._get_per_token_logps_and_entropies, trainer._compute_loss = recording, loss
    trainer.train()
    assert len(log_ratios) == 2
    ratio = torch.cat(log_ratios).exp()
    assert (ratio - 1).abs().max().item() <= RATIO_TOLERANCE


@pytest.mark.parametrize("variant", ["guarded", "reference"])
def test_both_zopro_variants_compute_in_fp32_on_a_bf16_base(
    variant, set_precision, tiny_base, adapters, embedded_frames, tmp_path
):
    """Finite differences at eps 1e-3 are below bf16 resolution (tests/test_zopro_guarded.py): the
    paper's variant computes in fp32 as the guarded one does, without autocast, on bf16 storage."""
    set_precision("bf16")
    tokenizer = load_tokenizer(tiny_base, "chat")
    tokenizer.padding_side = "left"
    model = load_policy(tiny_base, adapters["sft2"], trainable=True)
    reward_fn = scoring.RewardFunction(
        load_reward_model(tiny_base, adapters["reward1"]), load_tokenizer(adapters["reward1"], "chat"), name="rm"
    )
    prompts = policy.iteration_prompts(embedded_frames["train"], 1, CFG, seed=0)[:4]
    direction = {
        "policy_prev": adapters["sft2"],
        "policy_prev2": adapters["sft"],
        "reward": adapters["reward1"],
        "reward_prev": adapters["reward"],
    }
    stage = policy_trainers.PolicyStage(
        model, tokenizer, reward_fn, prompts, CFG, str(tmp_path), 0, [], tiny_base, adapters["sft"], variant, direction
    )
    trainer = policy_trainers.build_zorloo(stage).trainer
    assert not trainer.args.bf16 and model.get_input_embeddings().weight.dtype == torch.bfloat16
    ids = torch.tensor([tokenizer.encode("Tell me about the river.")], device=runtime.device())
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert {h.dtype for h in hidden} == {torch.float32}


def test_reward_scores_under_bf16_match_fp32(set_precision, tiny_base, adapters, embedded_frames):
    from workflow.train.scoring import reward_scores

    rows = embedded_frames["test"].head(8)
    tokenizer = load_tokenizer(adapters["reward"], "chat")

    def scores(precision: str) -> np.ndarray:
        set_precision(precision)
        model = load_reward_model(tiny_base, adapters["reward"], pad_token_id=tokenizer.pad_token_id)
        return reward_scores(model, tokenizer, list(rows["prompt"]), list(rows["chosen"]))

    exact = scores("fp32")
    assert np.ptp(exact) > 0
    np.testing.assert_allclose(scores("bf16"), exact, rtol=0, atol=REWARD_TOLERANCE)
