"""One policy iteration per method on the tiny base, against a tiny LoRA reward model.

The SFT adapter gets random (non-zero) LoRA B matrices so that "SFT" differs from the bare base:
that is what makes the reference checks meaningful.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from workflow import runtime
from workflow.models import lora
from workflow.train import policy, policy_trainers, scoring

CFG = {
    "seed": 0,
    "dataset": {"name": "embedded"},
    "model": {"max_length": 128, "generation_length": 8},
    "lora": {"r": 4, "alpha": None, "dropout": 0.0, "target_modules": "all-linear"},
    "snapshots": {"every": 0.5},
    "loop": {"intraepoch": True, "iteration_fraction": 0.25, "uncertain_fraction": 0.5, "pair_temperature": 0.7},
    "policy": {
        "learning_rate": 1e-2,
        "batch_size": 4,
        "epochs": 1,
        "kl_coef": 0.05,
        "temperature": 1.0,
        "rloo_k": 2,
        "clip_range": 0.2,
        "ppo_epochs": 1,
        "checkpoint_every": 0,
        "kl_target": None,  # fixed coefficients (policy.kl_coef for every method)
        "ppo_kl_coef": None,
        "dpo_beta": None,
        "dpo_beta_max": None,
    },
    "zopro": {
        "variant": "guarded",
        "step_size": 1e-3,
        "eps": 1e-3,
        "n_perturbations": 2,
        "updates_per_batch": 2,
        "momentum_kl": 0.5,
        "momentum_prompts": 4,
        "known_base": True,
        "reference": {
            "learning_rate": 1e-3,
            "eps": 1e-3,
            "gamma_start": 0.999,
            "gamma_schedule": "linear",
            "n_perturbations": 1,
            "two_sided": True,
            "known_base": True,
            "weight_decay": 0.0,
        },
    },
    "reward": {"batch_size": 4, "refine_epochs": 1, "refine_learning_rate": 1e-3},
    "judge": {"kind": "rule", "max_drop_rate": 0.5, "batch_size": 4},
}


def test_iteration_chunks_are_seeded_disjoint_and_wrap():
    loop = {"intraepoch": True, "iteration_fraction": 0.3}
    chunks = [policy.iteration_indices(10, i, loop, seed=5) for i in range(4)]
    assert all(len(c) == 3 for c in chunks)
    assert len(set(np.concatenate(chunks[:3]))) == 9  # the first three chunks are disjoint
    assert set(chunks[3]) & set(np.concatenate(chunks[:3]))  # the fourth wraps around
    assert np.array_equal(chunks[1], policy.iteration_indices(10, 1, loop, seed=5))
    assert not np.array_equal(chunks[0], policy.iteration_indices(10, 0, loop, seed=6))
    assert np.array_equal(policy.iteration_indices(10, 2, {"intraepoch": False}, 0), np.arange(10))


def test_reward_function_raises_on_nan(tiny_base, adapters):
    from workflow.models.loading import load_reward_model, load_tokenizer

    tok = load_tokenizer(adapters["reward"], "chat")
    model = load_reward_model(tiny_base, adapters["reward"])
    fn = scoring.RewardFunction(model, tok, name="rm-test")
    prompt = [{"role": "user", "content": "Tell me about the garden."}]
    scores = fn([prompt, prompt], [[{"role": "assistant", "content": "The garden is calm."}], "Nice."])
    assert len(scores) == 2 and np.isfinite(scores).all()
    assert len(fn.samples()) == 2
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "score" in name:
                p.fill_(float("nan"))
    with pytest.raises(scoring.RewardNaNError, match="rm-test"):
        fn([prompt], ["x"])


def _sft_logits(tiny_base, adapter, ids, autocast=False):
    """The SFT policy's logits (``autocast``: under bf16 autocast, as trainers prepared for bf16
    mixed precision run their reference models)."""
    from workflow.models.loading import load_policy

    with torch.no_grad(), torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        return load_policy(tiny_base, adapter).eval()(ids).logits


def _is_sft(logits, tiny_base, adapter, ids) -> bool:
    """Whether ``logits`` are the SFT policy's, computed as is or, with bf16 precision, under autocast."""
    return any(
        torch.allclose(logits, _sft_logits(tiny_base, adapter, ids, autocast), atol=1e-5)
        for autocast in {False, runtime.use_bf16()}
    )


def test_rloo_reference_is_the_sft_adapter(tiny_base, adapters, tmp_path):
    """The trainer's frozen ``ref`` adapter computes exactly the SFT policy (not policy i-1, not the base)."""
    from workflow.models.loading import load_policy, load_reward_model, load_tokenizer

    tok = load_tokenizer(tiny_base, "chat")
    model = load_policy(tiny_base, adapters["sft2"], trainable=True)  # "policy i-1"
    rm = load_reward_model(tiny_base, adapters["reward"])
    fn = scoring.RewardFunction(rm, load_tokenizer(adapters["reward"], "chat"), name="rm")
    prompts = [[{"role": "user", "content": f"Tell me about the river {k}."}] for k in range(4)]
    stage = policy_trainers.PolicyStage(model, tok, fn, prompts, CFG, str(tmp_path), 0, [], tiny_base, adapters["sft"])
    trainer = policy_trainers.build_rloo(stage).trainer
    ids = torch.tensor([tok.encode("Tell me about the river.")], device=runtime.device())
    with torch.no_grad():
        trainer.model.set_adapter("ref")
        ref = trainer.model.eval()(ids).logits
        trainer.model.set_adapter("default")
        cur = trainer.model(ids).logits
    assert torch.allclose(ref, _sft_logits(tiny_base, adapters["sft"], ids), atol=1e-5)
    assert not torch.allclose(ref, cur, atol=1e-3)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)


def stage_inputs(method: str, adapters: dict) -> tuple[int, str, str, dict | None]:
    """``(iteration, previous policy, reward model, zorloo mu/v inputs)`` of a test stage: zorloo
    runs its zeroth-order iteration 1, the other methods iteration 0."""
    if method not in policy.ZO_METHODS:
        return 0, adapters["sft"], adapters["reward"], None
    direction = {
        "policy_prev": adapters["sft2"],
        "policy_prev2": adapters["sft"],
        "reward": adapters["reward1"],
        "reward_prev": adapters["reward"],
    }
    return 1, adapters["sft2"], adapters["reward1"], direction


def train_stage(method: str, tiny_base: str, adapters: dict, prompts: list, out, cfg: dict, **kwargs) -> dict:
    """``policy.train_policy`` of the test stage of ``method`` (:func:`stage_inputs`), seed 0."""
    iteration, prev, reward, direction = stage_inputs(method, adapters)
    return policy.train_policy(
        method,
        iteration,
        tiny_base,
        prev,
        adapters["sft"],
        reward,
        prompts,
        out,
        cfg,
        seed=0,
        task="chat",
        direction_inputs=direction,
        **kwargs,
    )


@pytest.mark.parametrize("method", ["rloo", "dpo", "ppo", "zorloo", "zorloo_reference"])
def test_one_policy_iteration(method, tiny_base, adapters, embedded_frames, tmp_path, monkeypatch):
    from workflow.models.snapshots import read_index
    from workflow.train import policy_trainers

    trainers = []
    for kind, build in list(policy_trainers.BUILDERS.items()):
        monkeypatch.setitem(
            policy_trainers.BUILDERS, kind, lambda stage, build=build: trainers.append(build(stage)) or trainers[-1]
        )
    iteration, prev, reward, direction = stage_inputs(method, adapters)
    prompts = policy.iteration_prompts(embedded_frames["train"], iteration, CFG, seed=0)[:8]
    before = lora.adapter_state(prev)
    rm_before = lora.adapter_state(reward)
    summary = train_stage(method, tiny_base, adapters, prompts, tmp_path, copy.deepcopy(CFG))
    assert summary["steps"] >= 1
    # no gradient checkpointing (trl's default) unless the config's activation_checkpointing asks for it
    assert [built.trainer.args.activation_checkpointing for built in trainers] == [False]
    assert summary["trainer"] == ("zopro" if method in policy.ZO_METHODS else method)
    if method in policy.ZO_METHODS:
        assert summary["zopro_variant"] == {"zorloo": "guarded", "zorloo_reference": "reference"}[method]
    after = lora.adapter_state(tmp_path / "adapter")
    assert set(after) == set(before)  # only the policy adapter is saved
    assert any(not torch.equal(after[k], before[k]) for k in after)
    # the reward model is never changed by policy training
    assert all(torch.equal(v, lora.adapter_state(reward)[k]) for k, v in rm_before.items())
    index = read_index(tmp_path / "snapshots")
    assert len(index) >= 2 and index["step"].iloc[0] == 0
    from safetensors.torch import load_file

    snap = load_file(str(tmp_path / "snapshots" / index["file"].iloc[-1]))
    assert set(snap) == set(after)  # no value model, no ref adapter
    samples = pd.read_parquet(tmp_path / "samples.parquet")
    assert {"prompt", "completion", "score"} <= set(samples.columns) and len(samples) >= len(prompts)
    assert np.isfinite(samples["score"]).all()
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert metrics["method"].iloc[-1] == method


def test_unknown_method_is_a_config_error(tiny_base, adapters, tmp_path):
    with pytest.raises(policy.PolicyConfigError, match="unknown policy method"):
        policy.train_policy(
            "sgd",
            0,
            tiny_base,
            adapters["sft"],
            adapters["sft"],
            adapters["reward"],
            [[{"role": "user", "content": "hi"}]],
            tmp_path,
            CFG,
            0,
            "chat",
        )


# --------------------------------------------------------------------------------------------
# pairs, refinement, evaluation table
# --------------------------------------------------------------------------------------------
def _samples(rows, n=8):
    prompts = [list(p) for p in rows["prompt"].iloc[:n]]
    return pd.DataFrame(
        {
            "prompt": prompts,
            "completion": [c[0]["content"] for c in rows["chosen"].iloc[:n]],
            "score": np.zeros(n),
            "step": 0,
        }
    )


def _pair_inputs(tiny_base, adapters):
    from workflow.models.loading import load_policy, load_reward_model, load_tokenizer

    tok = load_tokenizer(adapters["sft"], "chat")
    model = load_policy(tiny_base, adapters["sft"])
    rm = load_reward_model(tiny_base, adapters["reward"])
    return model, tok, scoring.RewardFunction(rm, load_tokenizer(adapters["reward"], "chat"), name="rm0")


def test_collect_pairs_keeps_the_uncertain_and_orders_by_the_judge(tiny_base, adapters, embedded_frames):
    from workflow.data.embedded_task import gold_prefers
    from workflow.judges import pairs as pairs_mod
    from workflow.judges.pairwise import RuleJudge

    model, tok, fn = _pair_inputs(tiny_base, adapters)
    samples = _samples(embedded_frames["train"])
    out = pairs_mod.collect_pairs(samples, model, tok, fn, RuleJudge(), CFG, seed=0, where="p.parquet (it 0)")
    assert 1 <= len(out) <= 4  # uncertain_fraction 0.5 of 8 prompts
    assert set(out["judge"]) == {"rule"} and (out["judge_drop_rate"] == 0).all()
    for _, row in out.iterrows():
        text = row["prompt"][-1]["content"]
        assert gold_prefers(text, row["chosen"][0]["content"], row["rejected"][0]["content"]) == 0
        assert row["chosen"][0]["role"] == "assistant"
    scored = fn.score(list(samples["prompt"]), list(samples["completion"]))
    assert np.abs(out["score_a"]).max() <= np.sort(np.abs(scored))[len(out) - 1] + 1e-6


def test_collect_pairs_errors_name_the_file(tiny_base, adapters, embedded_frames):
    from workflow.judges import pairs as pairs_mod
    from workflow.judges import pairwise

    model, tok, fn = _pair_inputs(tiny_base, adapters)

    class Mute(pairwise.Judge):
        kind = "llm"

        def judge(self, prompts, a, b):
            return [None] * len(prompts)

    class Garbage(pairwise.Judge):
        kind = "llm"

        def judge(self, prompts, a, b):
            return [7] * len(prompts)

    samples = _samples(embedded_frames["train"])
    with pytest.raises(pairwise.JudgeError, match=r"results/x/iter_3/pairs\.parquet"):
        pairs_mod.collect_pairs(samples, model, tok, fn, Mute(), CFG, 0, "results/x/iter_3/pairs.parquet")
    lenient = copy.deepcopy(CFG)
    lenient["judge"]["max_drop_rate"] = 1.0
    with pytest.raises(pairs_mod.PairsError, match="no preference pairs left"):
        pairs_mod.collect_pairs(samples, model, tok, fn, Mute(), lenient, 0, "results/x/iter_3/pairs.parquet")
    with pytest.raises(pairs_mod.PairsError, match="invalid verdicts"):
        pairs_mod.collect_pairs(samples, model, tok, fn, Garbage(), CFG, 0, "p")
    with pytest.raises(pairs_mod.PairsError, match="no samples"):
        pairs_mod.collect_pairs(samples.iloc[:0], model, tok, fn, Mute(), CFG, 0, "p")


def test_refine_reward_with_keep_rm_close(tiny_base, adapters, embedded_frames, tmp_path):
    from workflow.io import write_parquet
    from workflow.models.snapshots import read_index
    from workflow.train import reward as reward_mod

    rows = embedded_frames["train"].iloc[:8].copy()
    write_parquet(rows, tmp_path / "pairs.parquet")
    cfg = copy.deepcopy(CFG)
    plain = reward_mod.refine_reward(
        tiny_base,
        adapters["reward"],
        str(tmp_path / "pairs.parquet"),
        None,
        str(tmp_path / "plain"),
        cfg,
        0,
        "chat",
        "w",
    )
    cfg["loop"].update(keep_rm_close=True, keep_rm_alpha=0.25)
    close = reward_mod.refine_reward(
        tiny_base,
        adapters["reward"],
        str(tmp_path / "pairs.parquet"),
        None,
        str(tmp_path / "close"),
        cfg,
        0,
        "chat",
        "w",
    )
    assert plain["steps"] == close["steps"] >= 1
    prev = lora.adapter_state(adapters["reward"])
    new = lora.adapter_state(tmp_path / "plain" / "adapter")
    mixed = lora.adapter_state(tmp_path / "close" / "adapter")
    for k in prev:
        assert torch.allclose(mixed[k], 0.25 * prev[k] + 0.75 * new[k], atol=1e-6)
    assert len(read_index(tmp_path / "close" / "snapshots")) >= 2
    assert not list(tmp_path.glob(".*refine*"))  # scratch removed
    empty = rows.iloc[:0]
    write_parquet(empty, tmp_path / "empty.parquet")
    with pytest.raises(reward_mod.RefineError, match="no pairs"):
        reward_mod.refine_reward(
            tiny_base,
            adapters["reward"],
            str(tmp_path / "empty.parquet"),
            None,
            str(tmp_path / "e"),
            cfg,
            0,
            "chat",
            "results/rloo/iter_1/reward",
        )


def test_sequence_kl_is_zero_for_the_same_adapter_and_positive_otherwise(tiny_base, adapters):
    from workflow.evaluation.loop_eval import sequence_kl
    from workflow.models.loading import load_tokenizer

    tok = load_tokenizer(adapters["sft"], "chat")
    prompts = [[{"role": "user", "content": "Tell me about the garden."}]] * 2
    answers = ["The garden is calm.", "Nice garden."]
    same = sequence_kl(tiny_base, adapters["sft"], adapters["sft"], tok, prompts, answers)
    assert np.allclose(same, 0, atol=1e-5)
    other = sequence_kl(tiny_base, adapters["sft2"], adapters["sft"], tok, prompts, answers)
    assert np.abs(other).max() > 1e-3


def test_sequence_logprobs_are_the_answer_tokens_log_likelihood(tiny_base, adapters):
    """Against the model's own loss on the answer tokens (labels -100 on the prompt), batch of two
    answers of different lengths (padding)."""
    from workflow.evaluation.loop_eval import sequence_logprobs
    from workflow.models.loading import load_policy, load_tokenizer

    tok = load_tokenizer(adapters["sft"], "chat")
    model = load_policy(tiny_base, adapters["sft"])
    prompts = [[{"role": "user", "content": "Tell me about the garden."}]] * 2
    answers = ["The garden is calm and green.", "Nice."]
    got = sequence_logprobs(model, tok, prompts, answers)
    for prompt, answer, value in zip(prompts, answers, got):
        prefix = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=False)
        p_ids = tok(prefix, add_special_tokens=False)["input_ids"]
        a_ids = tok(full[len(prefix) :], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + a_ids], device=model.device)
        labels = torch.tensor([[-100] * len(p_ids) + a_ids], device=model.device)
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss.item()
        assert value == pytest.approx(-loss * len(a_ids), rel=1e-5, abs=1e-4)


def test_evaluation_table(tmp_path):
    from workflow.evaluation.loop_eval import TABLE_COLUMNS, evaluation_table

    def summary(path, gold, i):
        pd.DataFrame(
            [
                {
                    "n": 4,
                    "gold_mean": gold,
                    "gold_stderr": 0.1,
                    "reward_mean": gold * 2,
                    "reward_stderr": 0.2,
                    "kl": 0.5 * (i + 1),
                    "iteration": i,
                }
            ]
        ).to_csv(path, index=False)
        return str(path)

    (tmp_path / "iter_0").mkdir()
    (tmp_path / "iter_1").mkdir()
    sft = summary(tmp_path / "sft.csv", 0.3, -1)
    its = [summary(tmp_path / f"iter_{i}" / "evaluation_summary.csv", 0.4 + i / 10, i) for i in (1, 0)]
    bench = tmp_path / "rloo_0.tsv"
    bench.write_text("s\th:m:s\tmax_rss\n12.5\t0:00:12\t850.25\n")
    table = evaluation_table(sft, its, [str(bench), str(tmp_path / "rloo_1.tsv")])
    assert list(table.columns) == TABLE_COLUMNS
    assert list(table["iteration"]) == [-1, 0, 1]
    assert table["wall_time_s"].iloc[1] == 12.5 and table["peak_mem_mb"].iloc[1] == 850.25
    assert np.isnan(table["wall_time_s"].iloc[2])
    assert table["gold_mean"].tolist() == pytest.approx([0.3, 0.4, 0.5])


def test_ppo_and_dpo_references_are_the_sft_adapter(tiny_base, adapters, tmp_path):
    from workflow.models.loading import load_policy, load_reward_model, load_tokenizer

    tok = load_tokenizer(tiny_base, "chat")
    tok.padding_side = "left"
    ids = torch.tensor([tok.encode("Tell me about the river.")], device=runtime.device())
    sft_logits = _sft_logits(tiny_base, adapters["sft"], ids)
    prompts = [[{"role": "user", "content": f"Tell me about the river {k}."}] for k in range(4)]
    # PPO: the SFT adapter is the second adapter "ref" of the policy model

    def stage(scratch: str):
        fn = scoring.RewardFunction(
            load_reward_model(tiny_base, adapters["reward"]), load_tokenizer(adapters["reward"], "chat"), name="rm"
        )
        model = load_policy(tiny_base, adapters["sft2"], trainable=True)
        return policy_trainers.PolicyStage(
            model, tok, fn, prompts, CFG, str(tmp_path / scratch), 0, [], tiny_base, adapters["sft"]
        )

    trainer = policy_trainers.build_ppo(stage("ppo")).trainer
    with torch.no_grad(), trainer.null_ref_context():
        ref = trainer.model.policy.eval()(ids).logits
    with torch.no_grad():
        cur = trainer.model.policy(ids).logits
    assert _is_sft(ref, tiny_base, adapters["sft"], ids) and not torch.allclose(cur, sft_logits, atol=1e-3)
    # online DPO: an explicit frozen base + SFT model
    trainer = policy_trainers.build_dpo(stage("dpo")).trainer
    with torch.no_grad():
        assert _is_sft(trainer.ref_model(ids).logits, tiny_base, adapters["sft"], ids)
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())


def test_ppo_scores_rollouts_where_the_reward_model_was_trained(tiny_base, adapters, tmp_path):
    """PPO's reward (trl ``get_reward`` on left-padded query + response ids) equals ``reward_scores``
    on the chat rendering, for a stopped response followed by padding and for a truncated one."""
    from trl.experimental.utils import get_reward

    from workflow.models.loading import load_policy, load_reward_model, load_tokenizer
    from workflow.train.scoring import reward_scores

    tok = load_tokenizer(tiny_base, "chat")
    tok.padding_side = "left"
    prompts = [
        [{"role": "user", "content": "Tell me about the river."}],
        [{"role": "user", "content": "What is the old garden like?"}],
    ]
    answers = ["The river is calm and bright.", "It is lovely"]
    fn = scoring.RewardFunction(
        load_reward_model(tiny_base, adapters["reward"]), load_tokenizer(adapters["reward"], "chat"), name="rm"
    )
    model = load_policy(tiny_base, adapters["sft2"], trainable=True)
    stage = policy_trainers.PolicyStage(
        model, tok, fn, prompts, CFG, str(tmp_path / "ppo"), 0, [], tiny_base, adapters["sft"]
    )
    trainer = policy_trainers.build_ppo(stage).trainer
    rm = fn.model.eval()  # reward model 1, merged
    queries = [
        tok.apply_chat_template(p, tokenize=True, add_generation_prompt=True, return_dict=False) for p in prompts
    ]
    queries = [list(q["input_ids"]) if isinstance(q, dict) else list(q) for q in queries]
    responses = [
        tok(answers[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id],  # stopped
        tok(answers[1], add_special_tokens=False)["input_ids"],
    ]  # truncated
    width_q, width_r = max(map(len, queries)), max(map(len, responses)) + 2
    ids = torch.tensor(
        [
            [tok.pad_token_id] * (width_q - len(q)) + q + r + [tok.pad_token_id] * (width_r - len(r))
            for q, r in zip(queries, responses)
        ],
        device=runtime.device(),
    )
    with torch.no_grad():
        _, got, _ = get_reward(trainer.reward_model, ids, tok.pad_token_id, width_q)
    want = reward_scores(rm, tok, prompts, answers)
    assert got.cpu().numpy() == pytest.approx(want, abs=1e-4)
    with torch.no_grad():  # the bare model reads the stop token and does not agree
        _, bare, _ = get_reward(rm, ids, tok.pad_token_id, width_q)
    assert abs(float(bare[0]) - float(want[0])) > 1e-3


def test_select_uncertain_keeps_scores_closest_to_zero_and_drops_exact_duplicates():
    from workflow.judges.pairs import select_uncertain

    p = [{"role": "user", "content": "q"}]
    samples = pd.DataFrame(
        {"prompt": [p] * 6, "completion": ["a", "a", "b", "c", "d", "e"], "score": [0.1, 0.1, -0.2, 3.0, -0.05, 1.0]}
    )
    kept = select_uncertain(samples, 0.6)  # 5 distinct samples -> 3 kept
    assert list(kept["completion"]) == ["d", "a", "b"]
