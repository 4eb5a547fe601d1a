"""Pairwise judges: rule (gold), llm (tiny local causal LM), reward_model (tiny sequence classifier)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workflow.data.embedded_task import gold_score
from workflow.judges import pairwise

PROMPT = [{"role": "user", "content": "Tell me about the garden."}]
GOOD = "The garden is lovely and bright."
BAD = "the river is awful awful"


def test_rule_judge_uses_the_gold_function():
    judge = pairwise.make_judge({"dataset": {"name": "embedded"}, "judge": {"kind": "rule"}}, seed=0)
    assert gold_score("Tell me about the garden.", GOOD) > gold_score("Tell me about the garden.", BAD)
    assert judge.judge([PROMPT, PROMPT], [GOOD, BAD], [BAD, GOOD]) == [0, 1]


def test_rule_judge_refuses_non_embedded_data():
    with pytest.raises(pairwise.JudgeError, match="embedded"):
        pairwise.make_judge({"dataset": {"name": "hh-rlhf"}, "judge": {"kind": "rule"}}, seed=0)


def test_model_judges_need_a_model():
    with pytest.raises(pairwise.JudgeError, match="judge.model"):
        pairwise.make_judge({"dataset": {"name": "hh-rlhf"}, "judge": {"kind": "llm", "model": None}}, seed=0)


@pytest.mark.parametrize(
    "text,expected", [("0", 0), (" 1", 1), ("1\n", 1), ("", None), ("01", None), ("yes", None), ("2", None)]
)
def test_parse_verdict(text, expected):
    assert pairwise.parse_verdict(text) == expected


class ScriptedLLM(pairwise.LLMJudge):
    """The real LLMJudge with ``ask`` replaced: answers like an oracle that knows the GOOD answer."""

    def __init__(self, policy, seed=0):
        self.seed, self.calls, self.batch_size = seed, 0, 8
        self.policy = policy
        self.tokenizer = None

    def question(self, prompt, first, second):
        return f"{first}\x00{second}"

    def ask(self, texts):
        return [self.policy(*t.split("\x00")) for t in texts]


def test_llm_judge_undoes_the_order_swap():
    n = 64
    oracle = ScriptedLLM(lambda first, second: "0" if first == GOOD else "1", seed=3)
    a = [GOOD if k % 2 else BAD for k in range(n)]
    b = [BAD if k % 2 else GOOD for k in range(n)]
    verdicts = oracle.judge([PROMPT] * n, a, b)
    assert verdicts == [0 if k % 2 else 1 for k in range(n)]  # always points at GOOD
    assert 0 < sum(oracle.last_swapped) < n  # and some pairs were swapped
    # a judge that always says "the first answer shown" reveals the swaps exactly
    first = ScriptedLLM(lambda first, second: "0", seed=3)
    verdicts = first.judge([PROMPT] * n, a, b)
    assert verdicts == [1 if s else 0 for s in first.last_swapped]
    # seeded: the same swaps again for a judge with the same seed, different ones for another seed
    assert ScriptedLLM(lambda f, s: "0", seed=3).judge([PROMPT] * n, a, b) == verdicts
    assert ScriptedLLM(lambda f, s: "0", seed=4).judge([PROMPT] * n, a, b) != verdicts


def test_llm_judge_drops_unparseable_answers_and_enforces_the_limit():
    replies = iter(["0", "maybe", "1", "", "0", "x"])
    judge = ScriptedLLM(lambda f, s: next(replies))
    verdicts = judge.judge([PROMPT] * 6, [GOOD] * 6, [BAD] * 6)
    assert [v is None for v in verdicts] == [False, True, False, True, False, True]
    assert pairwise.drop_rate(verdicts) == pytest.approx(0.5)
    assert pairwise.check_drop_rate(verdicts, 0.5, "pairs.parquet") == pytest.approx(0.5)
    with pytest.raises(pairwise.JudgeError, match=r"pairs\.parquet.*3 of 6.*max_drop_rate"):
        pairwise.check_drop_rate(verdicts, 0.4, "pairs.parquet")


def test_llm_judge_with_a_real_tiny_model(tiny_base):
    """tiny_base is no instruction-tuned judge: whatever it generates is parsed, mapped back or dropped."""
    judge = pairwise.make_judge(
        {"dataset": {"name": "embedded"}, "judge": {"kind": "llm", "model": tiny_base, "batch_size": 4}}, seed=0
    )
    assert isinstance(judge, pairwise.LLMJudge)
    verdicts = judge.judge([PROMPT] * 5, [GOOD] * 5, [BAD] * 5)
    assert len(verdicts) == 5 and len(judge.last_raw) == 5
    for raw, swapped, verdict in zip(judge.last_raw, judge.last_swapped, verdicts):
        shown = pairwise.parse_verdict(raw)
        assert verdict == (None if shown is None else (1 - shown if swapped else shown))
    # greedy: asking the same questions again gives the same raw answers
    texts = [judge.question(PROMPT, GOOD, BAD)] * 2
    assert judge.ask(texts) == judge.ask(texts)


@pytest.fixture(scope="module")
def tiny_seq_cls(tiny_base, tmp_path_factory):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("seqcls") / "rm"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_reward_model_judge_prefers_the_higher_score(tiny_seq_cls):
    judge = pairwise.make_judge(
        {
            "dataset": {"name": "hh-rlhf"},
            "model": {"max_length": 64},
            "judge": {"kind": "reward_model", "model": tiny_seq_cls, "batch_size": 2},
        },
        seed=0,
    )
    answers = [GOOD, BAD, "The garden is calm.", "Nice."]
    scores = judge.scores([PROMPT] * 4, answers)
    assert np.isfinite(scores).all() and len(set(np.round(scores, 6))) == 4
    a, b = answers[:2] + answers[2:], answers[2:] + answers[:2]
    verdicts = judge.judge([PROMPT] * 4, a, b)
    sa, sb = judge.scores([PROMPT] * 4, a), judge.scores([PROMPT] * 4, b)
    assert verdicts == [0 if x >= y else 1 for x, y in zip(sa, sb)]
    assert judge.judge([PROMPT] * 4, b, a) == [1 - v for v in verdicts]  # no ties here: swapping flips
    with torch.no_grad():
        judge.model.score.weight.fill_(float("nan"))
    assert judge.judge([PROMPT], [GOOD], [BAD]) == [None]


def test_judges_load_as_frozen_models_do_under_each_precision(set_precision, tiny_base, tiny_seq_cls):
    """The LLM judge follows ``precision`` with fp32 logits, as the policy's base; the reward-model
    judge scores in fp32 whatever the precision, as every frozen reward model."""
    from workflow.models.loading import FP32Head

    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        set_precision(precision)
        llm = pairwise.LLMJudge.from_path(tiny_base, batch_size=2, seed=0).model
        assert llm.get_input_embeddings().weight.dtype == dtype and isinstance(llm.lm_head, FP32Head)
        reward = pairwise.RewardModelJudge.from_path(tiny_seq_cls, batch_size=2, max_length=None).model
        assert {p.dtype for p in reward.parameters()} == {torch.float32} and isinstance(reward.score, FP32Head)


def test_a_chat_model_is_refused_as_the_reward_model_judge(tiny_base):
    with pytest.raises(pairwise.JudgeError, match=r"is not a reward model.*LlamaForCausalLM"):
        pairwise.RewardModelJudge.from_path(tiny_base, batch_size=2, max_length=None)


def test_reward_model_without_a_chat_template_reads_the_conversation_as_plain_text(tiny_seq_cls):
    from workflow.data.chat import as_messages, conversation_text

    judge = pairwise.RewardModelJudge.from_path(tiny_seq_cls, batch_size=2, max_length=None)
    judge.tokenizer.chat_template = None  # an external reward model's tokenizer
    scores = judge.scores([PROMPT] * 2, [GOOD, BAD])
    device = next(judge.model.parameters()).device
    for answer, score in zip([GOOD, BAD], scores):
        text = conversation_text(as_messages(PROMPT) + [{"role": "assistant", "content": answer}])
        enc = judge.tokenizer([text], return_tensors="pt", add_special_tokens=True).to(device)
        with torch.no_grad():
            assert score == pytest.approx(float(judge.model(**enc).logits[0, 0]), abs=1e-5)


class _ScriptedJudge(pairwise.Judge):
    """Answers with the verdicts it was given, in call order."""

    def __init__(self, *calls):
        self.calls = list(calls)

    def judge(self, prompts, answers_a, answers_b):
        return self.calls.pop(0)


def test_win_scores_judge_both_orders():
    """Consistent verdicts win or lose; a judge that prefers one position both times, and identical
    answers, tie; a dropped verdict in either order is NaN."""
    from workflow.judges.pairwise import win_scores

    first = [0, 1, 0, None, 1]  # answers first
    second = [1, 0, 0, 1, 0]  # references first
    scores = win_scores(_ScriptedJudge(first, second), ["p"] * 5, ["a", "b", "c", "d", "same"], ["x"] * 4 + ["same"])
    assert scores[:3].tolist() == [1.0, 0.0, 0.5] and np.isnan(scores[3]) and scores[4] == 0.5
