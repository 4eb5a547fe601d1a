"""Diagnostic: how well does the ZOPrO update point along the true policy gradient?

Runs the real zorloo iteration-1 policy stage of the reference variant (same trainer, prompts, reward model and ``mu``/``v``
as the workflow) for ``--steps`` updates and, at every update, also computes the exact gradient
``G`` of the RLOO loss on the same rollout batch with autograd. It then records:

* ``cos_mu``: cosine between ``-G`` (the descent direction) and ``mu`` (the previous policy update);
* ``cos_est``: cosine between ``-G`` and the q-SPSA update direction ``-(1/q) sum_j (G . z_j) z_j``
  built from exact directional derivatives, for several ``gamma`` and ``q``: the best alignment an
  estimate along these directions can have (no finite-difference error);
* ``fd_rel_err``: relative error of the two-point finite difference ``(L(+eps z) - L(-eps z)) / 2 eps``
  against the exact ``G . z`` for several ``eps`` (float32 rounding, curvature).

    .venv/bin/snakemake --cores all results/rloo/iter_1/reward/metrics.csv   # the inputs (zorloo shares them)
    .venv/bin/python benchmarks/zopro_alignment.py --out results/benchmarks/zopro_alignment.csv

Prints the per-setting means; one row per (step, setting) goes to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from workflow.io import write_csv  # noqa: E402

GAMMAS = (0.999, 0.9, 0.5, 0.0)
QS = (1, 4, 16, 64)
EPSILONS = (1e-4, 1e-3, 1e-2)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else math.nan


def probe_step(trainer, inputs, step: int) -> list[dict]:
    """Alignment and finite-difference rows of one rollout batch (parameters are left unchanged)."""
    engine = trainer.build_engine()
    params, direction = engine.params, engine.direction

    def loss_fn():
        with trainer.compute_loss_context_manager():
            return trainer._compute_loss(trainer.model, inputs)

    with torch.enable_grad():
        grad = _flat(torch.autograd.grad(loss_fn(), params))
    rows = [{"step": step, "setting": "cos_mu", "value": _cos(-grad, direction.mu.double())}]
    seed, update_step = engine.config.seed, engine.state.step
    for gamma in GAMMAS:
        zs = [direction.z(seed, update_step, j, gamma).double() for j in range(max(QS))]
        for q in QS:
            update = -sum(float(grad @ z) * z for z in zs[:q]) / q
            rows.append({"step": step, "setting": f"cos_est gamma={gamma} q={q}", "value": _cos(-grad, update)})
    # direction 0 at gamma 0 (pure noise), the hardest case for a finite difference
    z0 = direction.z(seed, update_step, 0, 0.0)
    exact = float(grad @ z0.double())
    with torch.no_grad():
        for eps in EPSILONS:
            engine.flat.add_(z0, eps)
            plus = float(loss_fn())
            engine.flat.add_(z0, -2 * eps)
            minus = float(loss_fn())
            engine.flat.add_(z0, eps)
            estimate = (plus - minus) / (2 * eps)
            rows.append(
                {
                    "step": step,
                    "setting": f"fd_rel_err eps={eps:g}",
                    "value": abs(estimate - exact) / abs(exact) if exact else math.nan,
                }
            )
    return rows


def main() -> None:
    from workflow import runtime
    from workflow.models.loading import load_policy, load_reward_model, load_tokenizer, read_rows
    from workflow.train import policy, policy_trainers, scoring

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results")
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="results/benchmarks/zopro_alignment.csv")
    args = parser.parse_args()
    res = Path(args.results)
    cfg = yaml.safe_load(Path(args.config).read_text())
    runtime.configure(threads=2, seed=int(cfg["seed"]), cache_dir=cfg.get("cache_dir"))
    base = cfg["model"]["name"] or str(res / "base")
    # zorloo's iteration 0 and reward model 1 are rloo's (rules/common.smk, chain_owner)
    inputs = {
        "policy_prev": res / "rloo/iter_0/policy/adapter",
        "policy_prev2": res / "sft/adapter",
        "reward": res / "rloo/iter_1/reward/adapter",
        "reward_prev": res / "reward/iter_0/adapter",
    }
    missing = [str(p) for p in inputs.values() if not p.exists()]
    if missing:
        raise SystemExit(f"missing inputs {missing}: run the snakemake command in this script's docstring first")
    inputs = {k: str(v) for k, v in inputs.items()}
    seed = int(cfg["seed"]) + 1009  # the stage seed of iteration 1 (workflow.train.policy.run)
    prompts = policy.iteration_prompts(read_rows(str(res / "data/embedded/train.parquet")), 1, cfg, int(cfg["seed"]))
    tokenizer = load_tokenizer(base, "chat")
    tokenizer.padding_side = "left"
    reward_tokenizer = load_tokenizer(inputs["reward"], "chat")
    model = load_policy(base, inputs["policy_prev"], trainable=True)
    reward = load_reward_model(base, inputs["reward"], pad_token_id=reward_tokenizer.pad_token_id)
    reward_fn = scoring.RewardFunction(reward, reward_tokenizer, "reward 1", max_length=cfg["model"]["max_length"])
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        stage = policy_trainers.PolicyStage(
            model,
            tokenizer,
            reward_fn,
            prompts,
            cfg,
            scratch,
            seed,
            [],
            base,
            str(res / "sft/adapter"),
            variant="reference",
            direction_inputs=inputs,
        )
        trainer = policy_trainers.build_zorloo(stage).trainer
        trainer.args.max_steps = args.steps
        original = trainer.training_step

        def training_step(model, batch, num_items_in_batch=None):
            prepared = trainer._prepare_inputs(batch)
            rows.extend(probe_step(trainer, prepared, trainer.state.global_step))
            trainer._prepare_inputs = lambda _: prepared  # the real update uses the same rollouts
            try:
                return original(model, batch, num_items_in_batch)
            finally:
                del trainer._prepare_inputs

        trainer.training_step = training_step
        trainer.train()
    table = pd.DataFrame(rows)
    write_csv(table, args.out)
    summary = table.groupby("setting", sort=False)["value"].agg(["mean", "std", "count"])
    print(f"trainable parameters: {sum(p.numel() for p in trainer.build_engine().params)}")
    print(summary.to_string(float_format=lambda x: f"{x:.4f}"))


if __name__ == "__main__":
    main()
