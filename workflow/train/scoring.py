"""Scores of answers: the reward model's (batched), the dataset's gold function where it has one,
and the reward callable the policy trainers and the pair collection share."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from workflow.data.chat import answer_text, as_messages, conversation_text, last_user_text
from workflow.schema import setting


class RewardNaNError(FloatingPointError):
    """The reward model produced a non-finite score."""


def gold_scorer(config: dict[str, Any]) -> Callable[[str, str], float] | None:
    """The gold judge ``(prompt_text, answer_text) -> float`` of the configured dataset, or ``None``.

    The embedded task has an exact gold function. Other datasets have no gold judge here, so
    their gold scores are NaN; a configured external judge can be plugged in at this hook.
    """
    if setting(config, "dataset.name") == "embedded":
        from workflow.data.embedded_task import gold_score

        return gold_score
    return None


def _texts(tokenizer, prompts, answers) -> list[str]:
    """The chat template's rendering of each conversation, else ``Human: ... / Assistant: ...`` lines."""
    conversations = [as_messages(p) + as_messages(a, role="assistant") for p, a in zip(prompts, answers)]
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    return [conversation_text(c) for c in conversations]


@torch.no_grad()
def reward_scores(
    model, tokenizer, prompts: list, answers: list, batch_size: int = 32, max_length: int | None = None
) -> np.ndarray:
    """Reward of each ``prompt + answer`` (message lists or strings: a string prompt is one user
    message, a string answer one assistant message). A tokenizer without a chat template (an
    external reward model) reads the conversation as plain text with its own special tokens."""
    texts = _texts(tokenizer, prompts, answers)
    special = not getattr(tokenizer, "chat_template", None)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    out = []
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[start : start + batch_size],
                add_special_tokens=special,
                padding=True,
                truncation=max_length is not None,
                max_length=max_length,
                return_tensors="pt",
            )
            logits = model(
                input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)
            ).logits
            out.append(logits.squeeze(-1).float().cpu())
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0)


class RewardFunction:
    """Reward callable for trl: LoRA reward model scores, NaN check, rollout recording."""

    def __init__(
        self,
        model,
        tokenizer,
        name: str,
        batch_size: int = 32,
        max_length: int | None = None,
        gold: Callable[[str, str], float] | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = int(batch_size)
        self.max_length = max_length
        self.gold = gold  # the task's gold judge (prompt text, answer) -> float, recorded beside the score
        self.records: list[dict[str, Any]] = []
        self.__name__ = "reward_model"

    def score(self, prompts: Sequence[Sequence[dict]], completions: Sequence[str]) -> np.ndarray:
        if not len(prompts):
            return np.zeros(0)
        scores = reward_scores(
            self.model,
            self.tokenizer,
            [list(p) for p in prompts],
            list(completions),
            batch_size=self.batch_size,
            max_length=self.max_length,
        )
        bad = ~np.isfinite(scores)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise RewardNaNError(
                f"reward model {self.name} produced a non-finite score ({scores[k]}) for {int(bad.sum())} of "
                f"{len(scores)} completions, e.g. prompt {list(prompts[k])[-1]['content']!r} -> "
                f"{completions[k]!r}; the reward adapter is broken (diverged training?): retrain it"
            )
        return scores

    def __call__(self, prompts, completions, step: int | None = None, **kwargs) -> list[float]:
        texts = [answer_text(c) for c in completions]
        scores = self.score(prompts, texts)
        state = kwargs.get("trainer_state")
        step = int(getattr(state, "global_step", 0)) if state is not None else (step or 0)
        for p, c, s in zip(prompts, texts, scores):
            gold = float(self.gold(last_user_text(list(p)), c.strip())) if self.gold else math.nan
            self.records.append({"prompt": list(p), "completion": c, "score": float(s), "gold": gold, "step": step})
        return [float(s) for s in scores]

    def samples(self, every_process: bool = False) -> pd.DataFrame:
        """The recorded rollouts: this process's, or with ``every_process`` those of every
        data-parallel process, rank 0's first (each process scores its own share of a batch; every
        process must then call it)."""
        records = self.records
        if every_process:
            from accelerate.utils import gather_object

            records = gather_object(records)
        return pd.DataFrame(records, columns=["prompt", "completion", "score", "gold", "step"])


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
        last_at, stopped_at = last.tolist(), stopped.tolist()  # one read from the device each
        tails = [self.end_ids[1:] if ends_with_stop and s else self.end_ids for s in stopped_at]
        extra = max(len(t) for t in tails)
        ids = torch.zeros((n, width + extra), dtype=input_ids.dtype, device=input_ids.device)
        new_mask = torch.zeros_like(ids, dtype=torch.bool)
        ids[:, :width] = input_ids
        new_mask[:, :width] = attention_mask.bool()
        end = list(last_at)
        for row, tail in enumerate(tails):
            if tail:
                pos = last_at[row] + 1
                ids[row, pos : pos + len(tail)] = torch.tensor(tail, dtype=ids.dtype, device=ids.device)
                new_mask[row, pos : pos + len(tail)] = True
                end[row] = pos + len(tail) - 1
        positions = new_mask.long().cumsum(1) - new_mask.long()
        out = getattr(self.reward_model, self.reward_model.base_model_prefix)(
            input_ids=ids,
            attention_mask=new_mask,
            position_ids=positions,
            return_dict=True,
            use_cache=False,
        )
        hidden = out.last_hidden_state
        read = hidden[:, :width].clone()
        read[torch.arange(n), last] = hidden[torch.arange(n), torch.tensor(end)]
        return SimpleNamespace(hidden_states=(read,))
