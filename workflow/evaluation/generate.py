"""Evaluation of a policy on a fixed set of held-out prompts, paired across policies.

For each of the first ``evaluation.n_prompts`` test prompts and each sampling seed ``s`` in
``0..evaluation.n_seeds - 1``, ``evaluation.samples_per_prompt`` answers are sampled
(``evaluation.temperature``, ``model.generation_length`` new tokens) with the torch seed
:func:`sampling_seed` ``(seed, s)``, which depends on the config's ``seed`` and ``s`` only, never on
the policy, method or iteration. Every policy is therefore evaluated with the same random numbers
(common random numbers): row ``(prompt_index, seed, sample)`` of two policies is a paired
observation, and the difference of two policies has a much smaller standard error than either
score (:func:`paired_difference`).

One row per sample (``prompt_index``, ``seed`` (the sampling seed's index ``s``), ``sample``,
``prompt`` messages, ``prompt_text``, ``answer``, ``gold``, ``reward``). The unit of a standard
error is a (prompt, sampling seed) pair: the mean of its samples. The summary has ``n``,
``gold_mean``, ``gold_stderr``, ``reward_mean``, ``reward_stderr`` (standard deviation of the unit
means / sqrt(units)) and ``reward_gold_accuracy``. A prompt's seeds count as independent units:
given the prompt set they are (the error is then, if anything, conservative); as the error for
prompts drawn afresh it leaves out part of the spread between prompts, most for one policy's own
mean, least for paired differences, where what a prompt adds to both policies cancels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from workflow.data.chat import last_user_text
from workflow.schema import section, setting
from workflow.train.sampling import sample_completions
from workflow.train.scoring import gold_scorer, reward_scores


def sampling_seed(seed: int, s: int) -> int:
    """Torch seed of sampling seed ``s`` of an evaluation under the config's ``seed``: a function of
    the two only, so that every policy of a run samples with the same random numbers."""
    return int(np.random.SeedSequence([int(seed), int(s)]).generate_state(1)[0])


def evaluate(
    policy_model,
    tokenizer,
    reward_model,
    prompts: list[list[dict[str, str]]],
    cfg: dict[str, Any],
    seed: int,
    reward_tokenizer=None,
    gold: Callable[[str, str], float] | None = None,
) -> pd.DataFrame:
    """Sample answers to ``prompts`` and score them; one row per (prompt, sampling seed, sample).

    ``seed`` is the config's seed (not a per-policy one): sampling seed ``s`` draws with
    :func:`sampling_seed` ``(seed, s)``. Settings the config lacks take the schema's defaults.
    ``reward_model=None`` leaves the reward column NaN; ``gold`` defaults to ``gold_scorer(cfg)``.
    """
    ecfg = section(cfg, "evaluation")
    k = int(ecfg["samples_per_prompt"])
    n_seeds = int(ecfg["n_seeds"])
    per_seed = [list(p) for p in prompts for _ in range(k)]
    expanded = per_seed * n_seeds
    answers: list[str] = []
    for s in range(n_seeds):
        sampled = sample_completions(
            policy_model,
            tokenizer,
            per_seed,
            cfg["model"]["generation_length"],
            ecfg["temperature"],
            sampling_seed(seed, s),
            batch_size=64,
        )
        answers += [a.strip() for a in sampled]
    gold = gold if gold is not None else gold_scorer(cfg)
    texts = [last_user_text(p) for p in expanded]
    gold_values = [float(gold(t, a)) if gold else math.nan for t, a in zip(texts, answers)]
    if reward_model is not None:
        rewards = reward_scores(
            reward_model, reward_tokenizer or tokenizer, expanded, answers, max_length=setting(cfg, "model.max_length")
        )
    else:
        rewards = np.full(len(answers), np.nan)
    return pd.DataFrame(
        {
            "prompt_index": [i for _ in range(n_seeds) for i in range(len(prompts)) for _ in range(k)],
            "seed": [s for s in range(n_seeds) for _ in range(len(prompts) * k)],
            "sample": [j for _ in range(n_seeds * len(prompts)) for j in range(k)],
            "prompt": expanded,
            "prompt_text": texts,
            "answer": answers,
            "gold": np.asarray(gold_values, dtype=float),
            "reward": np.asarray(rewards, dtype=float),
        }
    )


def require_finite_rewards(rows: pd.DataFrame, reward: str, output: str) -> None:
    """Raise when reward model ``reward`` scored an evaluation answer NaN or infinite (``summarise``
    would leave it out of ``reward_mean`` silently); ``output`` is the file being written."""
    bad = ~np.isfinite(rows["reward"].to_numpy(dtype=float))
    if bad.any():
        raise FloatingPointError(
            f"{output}: reward model {reward} produced non-finite scores for {int(bad.sum())} "
            f"of {len(bad)} evaluation answers; the reward adapter is broken (diverged "
            "training?): retrain it"
        )


def unit_columns(rows: pd.DataFrame) -> list[str]:
    """The columns whose values make one unit of a standard error: ``prompt_index`` and ``seed``
    (a (prompt, sampling seed) pair), or what of them ``rows`` has (rows written before sampling
    seeds: a prompt)."""
    return [c for c in ("prompt_index", "seed") if c in rows]


def _stderr(units: pd.Series) -> float:
    """Standard error of the mean of independent ``units`` (NaN with fewer than two)."""
    return float(units.std(ddof=1) / math.sqrt(len(units))) if len(units) > 1 else math.nan


def mean_stderr(values: pd.Series, clusters: list[pd.Series] | None = None) -> tuple[float, float]:
    """Mean and its standard error; with ``clusters`` (the unit columns of each sample) the error is
    that of the mean over units, since samples of one unit are not independent."""
    keep = values.notna()
    values = values[keep].astype(float)
    if len(values) == 0:
        return math.nan, math.nan
    units = values.groupby([c[keep] for c in clusters]).mean() if clusters else values
    return float(values.mean()), _stderr(units)


def unit_means(rows: pd.DataFrame, column: str = "gold") -> pd.Series:
    """Mean of ``column`` per unit (:func:`unit_columns`), NaN scores left out."""
    return rows.groupby(unit_columns(rows))[column].mean()


def paired_difference(rows: pd.DataFrame, reference: pd.DataFrame, column: str = "gold") -> tuple[float, float]:
    """Mean and paired standard error of ``column`` of ``rows`` minus that of ``reference``: two
    evaluations of policies on the same prompts with the same sampling seeds.

    The difference of the unit means (per (prompt, sampling seed)) is one observation; the error is
    its standard deviation / sqrt(units), so two identical policies give ``(0.0, 0.0)``. NaN, NaN
    without scores (no gold judge). Raises ``ValueError`` when the two evaluations do not have the
    same units or the same prompts, i.e. are not paired.
    """
    mine, theirs = unit_means(rows, column), unit_means(reference, column)
    if unit_columns(rows) != unit_columns(reference) or not mine.index.sort_values().equals(theirs.index.sort_values()):
        raise ValueError(
            f"not paired: the evaluations have different (prompt, seed) units "
            f"({len(mine)} and {len(theirs)} units); evaluate both with the same evaluation settings"
        )
    if "prompt_text" in rows and "prompt_text" in reference:
        texts = rows.groupby("prompt_index")["prompt_text"].first()
        other = reference.groupby("prompt_index")["prompt_text"].first().reindex(texts.index)
        if not texts.equals(other):
            first = texts.index[texts != other][0]
            raise ValueError(f"not paired: prompt {first} differs between the evaluations")
    diff = (mine - theirs.reindex(mine.index)).dropna()
    if diff.empty:
        return math.nan, math.nan
    return float(diff.mean()), _stderr(diff)


def reward_gold_accuracy(rows: pd.DataFrame) -> float:
    """How often the reward model orders two answers to one prompt as the gold judge does: over
    every pair of samples of a prompt whose gold scores differ, the fraction whose reward scores
    differ in the same direction (ties in reward count half). NaN without gold or pairs.

    On the policy's own answers this is the reward-hacking signal: a reward model that the policy
    has learnt to exploit still scores its answers higher while ranking them worse than gold.
    """
    if "prompt_index" not in rows or rows["gold"].isna().all() or rows["reward"].isna().all():
        return math.nan
    agree, total = 0.0, 0
    for _, group in rows.groupby("prompt_index"):
        gold, reward = group["gold"].to_numpy(float), group["reward"].to_numpy(float)
        for a in range(len(gold)):
            for b in range(a + 1, len(gold)):
                if gold[a] == gold[b] or not np.isfinite([gold[a], gold[b], reward[a], reward[b]]).all():
                    continue
                total += 1
                agree += 0.5 if reward[a] == reward[b] else float((gold[a] > gold[b]) == (reward[a] > reward[b]))
    return agree / total if total else math.nan


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """One-row summary: ``n``, gold and reward mean and standard error (over (prompt, sampling
    seed) units when ``rows`` has those columns: the mean of a unit's samples is one observation)
    and :func:`reward_gold_accuracy`."""
    clusters = [rows[c] for c in unit_columns(rows)] or None
    gold_mean, gold_stderr = mean_stderr(rows["gold"], clusters)
    reward_mean, reward_stderr = mean_stderr(rows["reward"], clusters)
    return pd.DataFrame(
        [
            {
                "n": len(rows),
                "gold_mean": gold_mean,
                "gold_stderr": gold_stderr,
                "reward_mean": reward_mean,
                "reward_stderr": reward_stderr,
                "reward_gold_accuracy": reward_gold_accuracy(rows),
            }
        ]
    )


def evaluation_prompts(
    test_rows: pd.DataFrame, n_prompts: int, tokenizer: Any, model: dict[str, Any], source: str
) -> list[list[dict[str, str]]]:
    """The fixed evaluation set: the first ``n_prompts`` held-out prompts of ``source`` that leave
    room for an answer (config ``model``'s ``max_length`` and ``generation_length``; the policy
    stages' rule, :func:`workflow.data.accounting.usable_rows`)."""
    from workflow.data.accounting import usable_rows

    usable, _ = usable_rows(
        test_rows, tokenizer, model["max_length"], "prompts", source, generation_length=model["generation_length"]
    )
    return [list(p) for p in usable["prompt"].iloc[: int(n_prompts)]]
