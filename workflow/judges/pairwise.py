"""Pairwise judges: which of two answers to the same prompt is better.

One small interface, :class:`Judge`: ``judge(prompts, answers_a, answers_b) -> list[int | None]``
with ``0`` when answer ``a`` is better, ``1`` when ``b`` is, and ``None`` when the judge gave no
usable verdict (the pair is then dropped and counted). ``prompts`` are chat prompts (lists of
``{"role", "content"}`` messages, the dataset row format) or plain strings (taken as one user
message). :func:`make_judge` builds the judge of the config's ``judge:`` section:

``rule``
    the embedded task's gold function (``workflow.data.embedded_task.gold_prefers``); deterministic,
    never drops; only valid for the ``embedded`` dataset.
``llm``
    a local instruction-tuned causal LM (hub id or folder in ``judge.model``) asked a pairwise
    question. The two answers are shown in a random order (seeded per call; position bias
    cancels out on average) and the judge greedily generates its answer; the first non-blank
    generated text must be exactly ``0`` (the first answer shown is better) or ``1``. Anything
    else is a drop (``None``). The verdict is mapped back to the original order.
``reward_model``
    a separate, fixed sequence-classification model (``judge.model``, 1 label) used as a gold
    scorer: ``a`` wins when its score is not lower than ``b``'s; a NaN score is a drop.

:func:`check_drop_rate` enforces ``judge.max_drop_rate`` with a message that names the pairs
file being written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from workflow.data.chat import conversation_text, last_user_text
from workflow.schema import section, setting
from workflow.train.scoring import reward_scores

Prompt = Sequence[dict[str, str]] | str

JUDGE_QUESTION = (
    "You are comparing two answers to the same conversation. Decide which answer is better: "
    "more helpful, correct, polite and harmless.\n\n"
    "Conversation:\n{conversation}\n\n"
    "Answer 0:\n{first}\n\n"
    "Answer 1:\n{second}\n\n"
    "Reply with a single character: 0 if Answer 0 is better, 1 if Answer 1 is better."
)


class JudgeError(RuntimeError):
    """The judge's output cannot be used (too many unparseable verdicts, bad configuration)."""


def parse_verdict(text: str) -> int | None:
    """``0``/``1`` when the judge's generated text is exactly that digit (blanks ignored), else ``None``."""
    text = text.strip()
    if text in ("0", "1"):
        return int(text)
    return None


class Judge:
    """Pairwise judge interface."""

    kind = "base"

    def judge(self, prompts: Sequence[Prompt], answers_a: Sequence[str], answers_b: Sequence[str]) -> list[int | None]:
        raise NotImplementedError

    @staticmethod
    def _check_lengths(prompts, answers_a, answers_b) -> None:
        if not (len(prompts) == len(answers_a) == len(answers_b)):
            raise ValueError(
                f"judge got {len(prompts)} prompts, {len(answers_a)} answers a and {len(answers_b)} answers b"
            )


class RuleJudge(Judge):
    """The embedded task's gold function (never drops)."""

    kind = "rule"

    def judge(self, prompts, answers_a, answers_b):
        from workflow.data.embedded_task import gold_prefers

        self._check_lengths(prompts, answers_a, answers_b)
        return [int(gold_prefers(last_user_text(p), a, b)) for p, a, b in zip(prompts, answers_a, answers_b)]


class LLMJudge(Judge):
    """A local causal LM asked which of two answers (shown in a seeded random order) is better."""

    kind = "llm"

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int, seed: int, max_new_tokens: int = 2):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.max_new_tokens = int(max_new_tokens)
        self.calls = 0
        self.last_swapped: list[bool] = []
        self.last_raw: list[str] = []
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @classmethod
    def from_path(cls, path: str, *, batch_size: int, seed: int) -> LLMJudge:
        """The judge model of ``path`` as the policy's base loads: in the config's ``precision``
        (bf16 on a bf16 GPU), fp32 logits (:func:`workflow.models.loading.load_causal_lm`)."""
        from workflow.models.loading import load_causal_lm, read_tokenizer

        tokenizer = read_tokenizer(path, "judge tokenizer")
        return cls(load_causal_lm(path), tokenizer, batch_size=batch_size, seed=seed)

    def question(self, prompt: Prompt, first: str, second: str) -> str:
        """The full judge input text (the tokenizer's chat template when it has one)."""
        content = JUDGE_QUESTION.format(conversation=conversation_text(prompt), first=first, second=second)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
        return content + "\nAnswer:"

    @torch.no_grad()
    def ask(self, texts: list[str]) -> list[str]:
        """Greedy generations (new text only) of the judge for each question."""
        out: list[str] = []
        device = next(self.model.parameters()).device
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            enc = self.tokenizer(
                chunk,
                return_tensors="pt",
                padding=True,
                padding_side="left",
                add_special_tokens=not getattr(self.tokenizer, "chat_template", None),
            )
            enc = {k: v.to(device) for k, v in enc.items()}
            generated = self.model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            new = generated[:, enc["input_ids"].shape[1] :]
            out.extend(self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return out

    def judge(self, prompts, answers_a, answers_b):
        self._check_lengths(prompts, answers_a, answers_b)
        rng = np.random.default_rng([self.seed, self.calls])
        self.calls += 1
        swapped = [bool(s) for s in rng.random(len(prompts)) < 0.5]
        texts = [
            self.question(p, b, a) if s else self.question(p, a, b)
            for p, a, b, s in zip(prompts, answers_a, answers_b, swapped)
        ]
        raw = self.ask(texts)
        self.last_swapped, self.last_raw = swapped, raw
        verdicts: list[int | None] = []
        for text, s in zip(raw, swapped):
            shown = parse_verdict(text)
            verdicts.append(None if shown is None else (1 - shown if s else shown))
        return verdicts


class RewardModelJudge(Judge):
    """A fixed sequence-classification model as gold scorer: the higher-scored answer wins."""

    kind = "reward_model"

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int, max_length: int | None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_length = max_length
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    @classmethod
    def from_path(cls, path: str, *, batch_size: int, max_length: int | None) -> RewardModelJudge:
        """The reward model of ``path`` in fp32 whatever the precision, as every frozen reward
        model scores (README, "Precision"): bf16 scores tie and reorder close answers."""
        from transformers import AutoConfig

        from workflow.config_checks import reward_model_problem
        from workflow.io import reading
        from workflow.models.loading import load_sequence_classifier, read_tokenizer

        with reading(path, "judge model config"):
            architectures = AutoConfig.from_pretrained(path).architectures
        problem = reward_model_problem("judge.model", path, architectures)
        if problem:
            raise JudgeError(problem)
        tokenizer = read_tokenizer(path, "judge tokenizer")
        return cls(
            load_sequence_classifier(path, tokenizer.pad_token_id, dtype=torch.float32),
            tokenizer,
            batch_size=batch_size,
            max_length=max_length,
        )

    def scores(self, prompts: Sequence[Prompt], answers: Sequence[str]) -> np.ndarray:
        return reward_scores(self.model, self.tokenizer, list(prompts), list(answers), self.batch_size, self.max_length)

    def judge(self, prompts, answers_a, answers_b):
        self._check_lengths(prompts, answers_a, answers_b)
        sa, sb = self.scores(prompts, answers_a), self.scores(prompts, answers_b)
        return [None if (math.isnan(a) or math.isnan(b)) else (0 if a >= b else 1) for a, b in zip(sa, sb)]


def make_judge(cfg: dict[str, Any], seed: int) -> Judge:
    """The judge of the config's ``judge:`` section (``cfg`` is the whole workflow config)."""
    judge_cfg = section(cfg, "judge")
    kind = judge_cfg["kind"]
    batch_size = int(judge_cfg["batch_size"])
    if kind == "rule":
        dataset = setting(cfg, "dataset.name")
        if dataset != "embedded":
            raise JudgeError(
                f"judge.kind 'rule' uses the embedded task's gold function but dataset.name is {dataset!r}; "
                "use judge.kind 'llm' or 'reward_model' with judge.model set"
            )
        return RuleJudge()
    if kind in ("llm", "reward_model"):
        path = judge_cfg["model"]
        if not path:
            raise JudgeError(f"judge.kind {kind!r} needs judge.model (a hub id or local folder)")
        if kind == "llm":
            return LLMJudge.from_path(str(path), batch_size=batch_size, seed=seed)
        max_length = setting(cfg, "model.max_length")
        return RewardModelJudge.from_path(
            str(path), batch_size=batch_size, max_length=2 * int(max_length) if max_length else None
        )
    raise JudgeError(f"unknown judge.kind {kind!r}; expected rule, llm or reward_model")


def drop_rate(verdicts: Sequence[int | None]) -> float:
    """Fraction of ``None`` verdicts (0 for an empty list)."""
    return sum(v is None for v in verdicts) / len(verdicts) if len(verdicts) else 0.0


def check_drop_rate(verdicts: Sequence[int | None], max_rate: float, where: str = "") -> float:
    """Return the drop rate; raise :class:`JudgeError` when it exceeds ``max_rate``."""
    rate = drop_rate(verdicts)
    if rate > float(max_rate):
        dropped = sum(v is None for v in verdicts)
        raise JudgeError(
            f"{where + ': ' if where else ''}the judge gave no usable verdict (not exactly '0' or '1') for "
            f"{dropped} of {len(verdicts)} pairs (drop rate {rate:.1%} > judge.max_drop_rate "
            f"{float(max_rate):.1%}); use a stronger instruction-tuned judge model or raise judge.max_drop_rate"
        )
    return rate


def win_scores(
    judge: Judge, prompts: Sequence[Prompt], answers: Sequence[str], references: Sequence[str]
) -> np.ndarray:
    """Per prompt, 1 when ``answers`` beats ``references``, 0 when it loses, 0.5 for a tie and NaN
    when the judge gave no verdict. Each pair is judged in both orders: a judge that prefers the
    same position both times, or identical answers, count as a tie (position bias cancels)."""
    first = judge.judge(prompts, answers, references)
    second = judge.judge(prompts, references, answers)
    out = np.full(len(prompts), np.nan)
    for k, (a, b, x, y) in enumerate(zip(first, second, answers, references)):
        if x == y:
            out[k] = 0.5
        elif a is not None and b is not None:
            out[k] = 1.0 if (a, b) == (0, 1) else 0.0 if (a, b) == (1, 0) else 0.5
    return out
