"""Preference pairs after policy iteration ``i`` (reference section 2, steps 4-5).

1. Take the policy's own rollouts (``results/{method}/iter_{i}/policy/samples.parquet``: prompt
   messages, completion text, score by reward model ``i`` recorded during training).
2. Re-score them with reward model ``i`` (PPO's samples were re-sampled, the others come from the
   trainer; re-scoring makes the column uniform and catches a NaN-producing reward model) and keep
   the ``loop.uncertain_fraction`` most uncertain ones: **score closest to 0**, as the reference
   does. A Bradley-Terry reward model is trained on score *differences*, so 0 is its decision
   boundary only up to an offset; the reference's choice is kept so results are comparable, and
   the kept scores are written next to the pairs (``score_a``) so the choice can be audited.
   Exact duplicate samples (same prompt and completion) count once; a prompt may appear in
   several pairs (templated prompts repeat, and RLOO samples k answers per prompt).
3. Sample a second answer from policy ``i`` for each kept prompt (``loop.pair_temperature``,
   ``model.generation_length`` new tokens, seeded).
4. Ask the judge (``workflow.judges.pairwise``); pairs without a usable verdict are dropped, and the drop
   rate must not exceed ``judge.max_drop_rate``. Pairs whose two answers are identical carry no
   preference and are dropped too (counted separately).
5. Rows: ``prompt``, ``chosen``, ``rejected`` (dataset row format: ``chosen``/``rejected`` are
   one-message assistant lists) plus metadata columns ``answer_a`` (the policy sample),
   ``answer_b`` (the new sample), ``score_a``, ``verdict`` (0 = a better), ``judge``,
   ``judge_drop_rate``, ``identical_dropped``, ``candidates`` (pairs asked).

An empty pair set is an error that names the file and the iteration (never an empty parquet).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from workflow.judges.pairwise import Judge, check_drop_rate
from workflow.schema import setting

if TYPE_CHECKING:
    from workflow.job import Job


class PairsError(RuntimeError):
    """No usable preference pairs."""


def select_uncertain(samples: pd.DataFrame, fraction: float) -> pd.DataFrame:
    """The ``fraction`` most uncertain samples (|score| smallest), at least one; exact duplicates
    (same prompt and same completion, e.g. RLOO's k samples agreeing) count once."""
    if samples.empty:
        return samples
    frame = samples.copy()
    frame["_key"] = [
        repr([(m["role"], m["content"]) for m in p]) + "\x00" + str(c)
        for p, c in zip(frame["prompt"], frame["completion"])
    ]
    frame["_abs"] = frame["score"].abs()
    frame = frame.sort_values(["_abs", "_key"], kind="stable").drop_duplicates("_key", keep="first")
    n = max(1, math.ceil(float(fraction) * len(frame) - 1e-9))
    return frame.head(n).drop(columns=["_key", "_abs"]).reset_index(drop=True)


def build_pairs(
    prompts: list,
    answers_a: list[str],
    answers_b: list[str],
    scores_a: np.ndarray,
    verdicts: list[int | None],
    judge_kind: str,
    drop_rate: float,
) -> pd.DataFrame:
    """Pair rows (see module docstring) from judged answers; drops ``None`` and identical pairs."""
    rows = []
    identical = 0
    for p, a, b, s, v in zip(prompts, answers_a, answers_b, scores_a, verdicts):
        if v is None:
            continue
        if a.strip() == b.strip():
            identical += 1
            continue
        chosen, rejected = (a, b) if v == 0 else (b, a)
        rows.append(
            {
                "prompt": list(p),
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "answer_a": a,
                "answer_b": b,
                "score_a": float(s),
                "verdict": int(v),
            }
        )
    frame = pd.DataFrame(rows, columns=["prompt", "chosen", "rejected", "answer_a", "answer_b", "score_a", "verdict"])
    frame["judge"] = judge_kind
    frame["judge_drop_rate"] = float(drop_rate)
    frame["identical_dropped"] = identical
    frame["candidates"] = len(verdicts)
    return frame


def collect_pairs(
    samples: pd.DataFrame, policy_model, tokenizer, reward_fn, judge: Judge, cfg: dict[str, Any], seed: int, where: str
) -> pd.DataFrame:
    """Uncertain samples -> second answers -> judged pairs (see module docstring).

    ``reward_fn``: a :class:`workflow.train.scoring.RewardFunction` of reward model ``i`` (raises on NaN);
    ``where``: the output file and iteration, used in error messages.
    """
    from workflow.train.sampling import sample_completions

    if samples.empty:
        raise PairsError(f"{where}: the policy wrote no samples to collect pairs from")
    samples = samples.reset_index(drop=True).copy()
    samples["prompt"] = [list(p) for p in samples["prompt"]]
    samples["score"] = reward_fn.score(list(samples["prompt"]), list(samples["completion"].astype(str)))
    kept = select_uncertain(samples, cfg["loop"]["uncertain_fraction"])
    prompts = list(kept["prompt"])
    answers_a = [str(c).strip() for c in kept["completion"]]
    answers_b = [
        c.strip()
        for c in sample_completions(
            policy_model, tokenizer, prompts, cfg["model"]["generation_length"], cfg["loop"]["pair_temperature"], seed
        )
    ]
    verdicts = judge.judge(prompts, answers_a, answers_b)
    if len(verdicts) != len(prompts):
        raise PairsError(f"{where}: the judge returned {len(verdicts)} verdicts for {len(prompts)} pairs")
    bad = [v for v in verdicts if v not in (0, 1, None)]
    if bad:
        raise PairsError(f"{where}: the judge returned invalid verdicts {bad[:5]} (expected 0, 1 or None)")
    rate = check_drop_rate(verdicts, setting(cfg, "judge.max_drop_rate"), where)
    pairs = build_pairs(prompts, answers_a, answers_b, kept["score"].to_numpy(), verdicts, judge.kind, rate)
    if pairs.empty:
        identical = sum(a.strip() == b.strip() for a, b in zip(answers_a, answers_b))
        raise PairsError(
            f"{where}: no preference pairs left out of {len(prompts)} candidates "
            f"({sum(v is None for v in verdicts)} dropped by the judge, {identical} with identical answers); "
            "raise loop.uncertain_fraction / loop.pair_temperature or train on more prompts per iteration"
        )
    return pairs


def run(job: Job) -> None:
    """Stage function of rule ``collect_pairs``."""
    from workflow.data.datasets import task_of
    from workflow.io import read_table, write_parquet
    from workflow.judges.pairwise import make_judge
    from workflow.models.loading import load_policy, load_reward_model, load_tokenizer
    from workflow.train.scoring import RewardFunction

    cfg = job.config
    method, iteration = job.wildcards["method"], int(job.wildcards["i"])
    task = task_of(cfg["dataset"]["name"])
    base = job.params["base"]
    out = job.output["pairs"]
    where = f"{out} ({method} iteration {iteration})"
    seed = job.stage_seed("pairs")
    tokenizer = load_tokenizer(job.input["policy"], task)
    policy_model = load_policy(base, job.input["policy"], trainable=False)
    reward_tokenizer = load_tokenizer(job.input["reward"], task)
    reward = load_reward_model(base, job.input["reward"], pad_token_id=reward_tokenizer.pad_token_id)
    reward_fn = RewardFunction(
        reward,
        reward_tokenizer,
        name=f"{job.input['reward']} (iteration {iteration})",
        max_length=int(cfg["model"]["max_length"]),
    )
    samples = read_table(job.input["samples"], ("prompt", "completion"))
    judge = make_judge(cfg, seed=seed)
    pairs = collect_pairs(samples, policy_model, tokenizer, reward_fn, judge, cfg, seed, where)
    write_parquet(pairs, out)
    print(
        f"{where}: {len(pairs)} pairs, judge drop rate {pairs['judge_drop_rate'].iloc[0]:.3f}, "
        f"chosen == policy sample in {float((pairs['verdict'] == 0).mean()):.2f}"
    )
