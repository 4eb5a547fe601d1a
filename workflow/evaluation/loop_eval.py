"""Per-iteration evaluation of the loop and the per-method table ``results/{method}/evaluation.csv``.

``evaluate_iteration`` (rule of the same name): policy ``i`` answers the fixed evaluation prompts
(``workflow.evaluation.generate.evaluate``: ``evaluation.n_prompts`` test prompts, seeded sampling, gold and
reward scores). The reward column uses **reward model ``i``**, the one policy ``i`` was trained
against (reward model 0 for the SFT row), so ``reward_mean`` is what the policy optimised and
``gold_mean`` what it should have optimised. Every iteration samples with the same sampling seeds
(``workflow.evaluation.generate.sampling_seed``: the config's seed and the seed index only), and so do the SFT
and base-model evaluations, so the rows of any two policies are paired samples of one prompt set.

``kl``: mean over the evaluation samples of the sequence log-ratio
``log pi(answer | prompt) - log pi_SFT(answer | prompt)`` (a Monte Carlo estimate of the
sequence-level KL(pi || pi_SFT), the quantity the KL penalties constrain). The answers are
re-tokenised as assistant messages of the chat template, so the closing ``<|im_end|>`` is scored
too (for answers cut at ``model.generation_length`` that token was not generated: a small bias,
identical for every method). The SFT row (``results/sft/evaluation_summary.csv`` of rule
``evaluate_policy``: the same prompts, seed and reward model 0) has ``kl = 0`` by definition.

The table has one row per iteration (``-1`` = SFT) with ``gold_mean``, ``gold_stderr``,
``reward_mean``, ``reward_stderr``, ``kl``, ``reward_gold_accuracy`` (``workflow.evaluation.generate``: how often
reward model ``i`` orders two answers of policy ``i`` as gold does; its fall while ``reward_mean``
rises is reward hacking), ``wall_time_s`` and ``peak_mem_mb`` (seconds ``s``
and ``max_rss`` of the ``train_policy`` benchmark file of that iteration; NaN for SFT), and the
paired gains of gold (:data:`PAIRED_COLUMNS`, ``workflow.evaluation.generate.paired_difference``: mean and
standard error over (prompt, sampling seed) units of the difference of the two policies' scores):

* ``gold_gain_vs_previous``, ``gold_gain_vs_previous_stderr``: over the iteration before (SFT
  before iteration 0; NaN on the SFT row);
* ``gold_gain_vs_sft``, ``gold_gain_vs_sft_stderr``: over SFT (0 and 0 on the SFT row);
* ``gold_gain_vs_iter0``, ``gold_gain_vs_iter0_stderr``: over the method's iteration-0 policy (0 and 0
  on iteration 0, NaN on the SFT row).

Every paired column is NaN where there is no gold score (datasets other than the embedded one).
The win rates need no gold score: the configured judge (``judge.kind``: the gold function on the
embedded task, an LLM or a reward model elsewhere) compares each answer with the reference policy's
answer to the same prompt, sampling seed and sample (:func:`judged_against`), in both orders:

* ``win_rate_vs_sft``, ``win_rate_vs_sft_stderr``, ``ties_vs_sft``: against SFT (a win 1, a tie
  0.5, a loss 0; mean and standard error over (prompt, sampling seed) units; the fraction of
  ties: identical answers or a judge that prefers the same position in both orders). The SFT row
  has 0.5 by definition;
* ``win_rate_vs_previous``, ``win_rate_vs_previous_stderr``, ``ties_vs_previous``: against the
  iteration before (SFT before iteration 0);
* ``judge_drops``: answers without a verdict (unparseable LLM answers; NaN score), at most
  ``judge.max_drop_rate`` of them or the stage fails.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from workflow.io import DataFileError, read_table, reading, write_csv, write_parquet

if TYPE_CHECKING:
    from workflow.job import Job

SUMMARY_COLUMNS = ["gold_mean", "gold_stderr", "reward_mean", "reward_stderr", "kl", "reward_gold_accuracy"]
PAIRED_COLUMNS = [
    "gold_gain_vs_previous",
    "gold_gain_vs_previous_stderr",
    "gold_gain_vs_sft",
    "gold_gain_vs_sft_stderr",
    "gold_gain_vs_iter0",
    "gold_gain_vs_iter0_stderr",
]
WIN_COLUMNS = [
    "win_rate_vs_sft",
    "win_rate_vs_sft_stderr",
    "ties_vs_sft",
    "win_rate_vs_previous",
    "win_rate_vs_previous_stderr",
    "ties_vs_previous",
    "judge_drops",
]
TABLE_COLUMNS = ["iteration", *SUMMARY_COLUMNS, "wall_time_s", "peak_mem_mb", *PAIRED_COLUMNS, *WIN_COLUMNS]


@torch.no_grad()
def sequence_logprobs(model, tokenizer, prompts: list, answers: list[str], batch_size: int = 32) -> np.ndarray:
    """``log p(answer | prompt)`` summed over the answer tokens (chat template, answer + end token)."""
    from trl.trainer.utils import selective_log_softmax

    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        ids, masks = [], []
        for p, a in zip(prompts[start : start + batch_size], answers[start : start + batch_size]):
            prefix = tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(list(p) + [{"role": "assistant", "content": a}], tokenize=False)
            if not full.startswith(prefix):
                raise ValueError("chat template does not extend the generation prompt with the answer")
            p_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
            a_ids = tokenizer(full[len(prefix) :], add_special_tokens=False)["input_ids"]
            ids.append(p_ids + a_ids)
            masks.append([0] * len(p_ids) + [1] * len(a_ids))
        width = max(len(x) for x in ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
        attention = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
        answer_mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], device=device)
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
        logp = selective_log_softmax(logits, input_ids[:, 1:])  # no second (batch, length, vocab) tensor
        out.append((logp * answer_mask[:, 1:]).sum(-1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def sequence_kl(
    base: str, policy_adapter: str, sft_adapter: str, tokenizer, prompts: list, answers: list[str]
) -> np.ndarray:
    """Per-sample ``log pi - log pi_SFT`` of the answers (one model, two adapters)."""
    from workflow.models.loading import add_adapter, load_policy

    model = load_policy(base, policy_adapter, trainable=False, adapter_name="policy")
    add_adapter(model, sft_adapter, "sft")
    model.eval()
    model.set_adapter("policy")
    policy_lp = sequence_logprobs(model, tokenizer, prompts, answers)
    model.set_adapter("sft")
    sft_lp = sequence_logprobs(model, tokenizer, prompts, answers)
    return policy_lp - sft_lp


def run(job: Job) -> None:
    """Stage function of ``evaluate_iteration``.

    Inputs: ``policy`` adapter, ``sft`` adapter, ``reward`` adapter, ``test`` rows, and the
    evaluation samples of SFT (``sft_samples``) and of the policy before (``previous_samples``).
    Outputs: ``samples`` (parquet, one row per answer, with ``kl``, ``win_vs_sft`` and
    ``win_vs_previous``) and ``summary`` (CSV, one row).
    """
    from workflow.data.datasets import task_of
    from workflow.evaluation.generate import evaluate, evaluation_prompts, require_finite_rewards, summarise
    from workflow.models.loading import load_policy, load_reward_model, load_tokenizer, read_rows

    cfg = job.config
    task = task_of(cfg["dataset"]["name"])
    base = job.params["base"]
    tokenizer = load_tokenizer(job.input["policy"], task)
    policy = load_policy(base, job.input["policy"], trainable=False)
    reward_tokenizer = load_tokenizer(job.input["reward"], task)
    reward = load_reward_model(base, job.input["reward"], pad_token_id=reward_tokenizer.pad_token_id)
    prompts = evaluation_prompts(
        read_rows(job.input["test"]), cfg["evaluation"]["n_prompts"], tokenizer, cfg["model"], job.input["test"]
    )
    rows = evaluate(policy, tokenizer, reward, prompts, cfg, job.seed, reward_tokenizer=reward_tokenizer)
    require_finite_rewards(rows, job.input["reward"], job.output["samples"])
    del policy, reward  # the KL model and the judge load next: one model on the device at a time
    if Path(job.input["policy"]).resolve() == Path(job.input["sft"]).resolve():
        rows["kl"] = 0.0
    else:
        rows["kl"] = sequence_kl(
            base, job.input["policy"], job.input["sft"], tokenizer, list(rows["prompt"]), list(rows["answer"])
        )
    rows = judged_against(
        rows, {"sft": job.input["sft_samples"], "previous": job.input["previous_samples"]}, cfg, job.seed
    )
    summary = summarise(rows)
    summary["kl"] = float(rows["kl"].mean())
    summary["iteration"] = int(job.wildcards["i"])
    write_parquet(rows, job.output["samples"])
    write_csv(summary, job.output["summary"])
    print(summary.to_string(index=False))


def judged_against(rows: pd.DataFrame, references: dict[str, str], cfg: dict, seed: int) -> pd.DataFrame:
    """``rows`` with a column ``win_vs_<name>`` per reference evaluation (parquet path): the
    configured judge's verdict (``workflow.judges.pairwise.win_scores``) on each answer against the reference
    policy's answer to the same prompt with the same sampling seed and sample index."""
    from workflow.judges.pairwise import check_drop_rate, make_judge, win_scores

    judge = make_judge(cfg, seed)
    keys = ["prompt_index", "seed", "sample"]
    rows = rows.copy()
    for name, path in references.items():
        reference = read_table(path, [*keys, "answer"])[[*keys, "answer"]].rename(
            columns={"answer": "reference_answer"}
        )
        try:
            paired = rows[keys].merge(reference, on=keys, how="left", validate="one_to_one")
        except pd.errors.MergeError as err:
            raise DataFileError(f"{path}: more than one answer for a (prompt, seed, sample) ({err})") from err
        if paired["reference_answer"].isna().any():
            missing = paired.loc[paired["reference_answer"].isna(), keys].iloc[0].to_dict()
            raise ValueError(f"{path}: no answer for {missing}; evaluate both policies with the same settings")
        scores = win_scores(judge, list(rows["prompt"]), list(rows["answer"]), list(paired["reference_answer"]))
        check_drop_rate(
            [None if np.isnan(x) else 0 for x in scores], cfg["judge"]["max_drop_rate"], f"win rates against {path}"
        )
        rows[f"win_vs_{name}"] = scores
    return rows


def _iteration_of(path: str) -> int:
    match = re.search(r"iter_(\d+)", str(path))
    if not match:
        raise ValueError(f"cannot read the iteration from {path}")
    return int(match.group(1))


def benchmark_numbers(path: str | None) -> tuple[float, float]:
    """``(s, max_rss)`` of a Snakemake benchmark TSV (NaN when absent or without a row; an error
    naming it when it is damaged)."""
    if not path or not Path(path).exists():
        return math.nan, math.nan
    with reading(path, "Snakemake benchmark"):
        bench = pd.read_csv(path, sep="\t")
    if bench.empty:
        return math.nan, math.nan
    if "s" not in bench.columns:
        raise DataFileError(f"{path}: not a Snakemake benchmark (no column s)")
    rss = pd.to_numeric(bench.get("max_rss", pd.Series([math.nan])), errors="coerce")
    return float(pd.to_numeric(bench["s"], errors="coerce").iloc[-1]), float(rss.iloc[-1])


def paired_gains(rows: dict[int, pd.DataFrame]) -> dict[int, dict[str, float]]:
    """:data:`PAIRED_COLUMNS` per iteration from the evaluation samples of SFT (``-1``) and of each
    iteration; a gain whose reference has no samples is NaN."""
    from workflow.evaluation.generate import paired_difference

    def gain(i: int, reference: int) -> tuple[float, float]:
        if i not in rows or reference not in rows:
            return math.nan, math.nan
        return paired_difference(rows[i], rows[reference], "gold")

    out = {}
    for i in sorted(rows):
        values = {}
        for name, reference in (("previous", i - 1 if i > -1 else None), ("sft", -1), ("iter0", 0 if i >= 0 else None)):
            mean, stderr = gain(i, reference) if reference is not None else (math.nan, math.nan)
            values[f"gold_gain_vs_{name}"], values[f"gold_gain_vs_{name}_stderr"] = mean, stderr
        out[i] = values
    return out


def win_rates(rows: pd.DataFrame) -> dict[str, float]:
    """:data:`WIN_COLUMNS` of one evaluation: per reference, the mean of the judge's scores
    (``win_vs_<reference>``: 1 win, 0.5 tie, 0 loss) with its standard error over (prompt, sampling
    seed) units, the fraction of ties, and the answers the judge dropped (NaN where not judged)."""
    from workflow.evaluation.generate import mean_stderr, unit_columns

    out: dict[str, float] = {"judge_drops": 0.0}
    for name in ("sft", "previous"):
        column = f"win_vs_{name}"
        if column not in rows:
            out.update({f"win_rate_vs_{name}": math.nan, f"win_rate_vs_{name}_stderr": math.nan})
            out[f"ties_vs_{name}"], out["judge_drops"] = math.nan, math.nan
            continue
        mean, stderr = mean_stderr(rows[column], [rows[c] for c in unit_columns(rows)])
        out[f"win_rate_vs_{name}"], out[f"win_rate_vs_{name}_stderr"] = mean, stderr
        out[f"ties_vs_{name}"] = float((rows[column] == 0.5).sum() / max(1, rows[column].notna().sum()))
        out["judge_drops"] += float(rows[column].isna().sum())
    return out


def summary_row(path: str | Path) -> pd.Series:
    """The one row of an evaluation summary CSV; an error naming the file when it is damaged,
    lacks ``gold_mean`` or holds no row."""

    table = read_table(path, ("gold_mean",))
    if table.empty:
        raise DataFileError(f"{path}: an evaluation summary without a row; delete it and rerun the stage that wrote it")
    return table.iloc[0]


def evaluation_table(
    sft_summary: str, iteration_summaries: list[str], benchmarks: list[str], samples: dict[int, str] | None = None
) -> pd.DataFrame:
    """The per-method table (see the module docstring); benchmarks are matched by iteration.

    ``samples``: evaluation parquet per iteration (``-1`` = SFT) for the paired gains; without
    them the paired columns are NaN.
    """
    bench_by_iter = {int(re.search(r"_(\d+)\.tsv$", str(b)).group(1)): b for b in benchmarks}
    frames = {i: read_table(path) for i, path in (samples or {}).items()}  # read once
    gains = paired_gains(frames)
    wins = {i: win_rates(rows) for i, rows in frames.items() if i >= 0}
    nan_gains = dict.fromkeys(PAIRED_COLUMNS, math.nan)
    nan_wins = dict.fromkeys(WIN_COLUMNS, math.nan)
    sft_wins = {**nan_wins, "win_rate_vs_sft": 0.5, "win_rate_vs_sft_stderr": 0.0, "ties_vs_sft": 1.0}
    rows = []
    sft = summary_row(sft_summary)
    sft_values = {k: float(sft.get(k, 0.0 if k == "kl" else math.nan)) for k in SUMMARY_COLUMNS}
    rows.append(
        {
            "iteration": -1,
            **sft_values,
            "wall_time_s": math.nan,
            "peak_mem_mb": math.nan,
            **gains.get(-1, nan_gains),
            **sft_wins,
        }
    )
    for path in iteration_summaries:
        summary = summary_row(path)
        i = int(summary["iteration"]) if "iteration" in summary else _iteration_of(path)
        seconds, rss = benchmark_numbers(bench_by_iter.get(i))
        rows.append(
            {
                "iteration": i,
                **{k: float(summary.get(k, math.nan)) for k in SUMMARY_COLUMNS},
                "wall_time_s": seconds,
                "peak_mem_mb": rss,
                **gains.get(i, nan_gains),
                **wins.get(i, nan_wins),
            }
        )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS).sort_values("iteration").reset_index(drop=True)


def run_table(job: Job) -> None:
    """Stage function of rule ``evaluation_table``: inputs ``sft`` and ``iter_{i}`` (summaries),
    ``sft_samples`` and ``samples_{i}`` (evaluation parquet files, for the paired gains)."""

    summaries = [v for k, v in job.input.items() if k.startswith("iter_")]
    samples = {int(k.removeprefix("samples_")): v for k, v in job.input.items() if k.startswith("samples_")}
    samples[-1] = job.input["sft_samples"]
    benchmarks = list(job.params["benchmarks"])  # params, not inputs: written by Snakemake after each job
    table = evaluation_table(job.input["sft"], summaries, benchmarks, samples)
    write_csv(table, job.output["table"])
    print(table.to_string(index=False))
