"""benchmarks/loop_dynamics.py: per-window reward score, gold and KL of policy stages, on fake stage folders."""

from __future__ import annotations

import pandas as pd
import pytest

from benchmarks import loop_dynamics


def _stage(root, method, iteration, kl_per_token):
    stage = root / "results" / method / f"iter_{iteration}" / "policy"
    stage.mkdir(parents=True)
    steps = [1, 2, 3, 4]
    pd.DataFrame(
        {
            "prompt": [[{"role": "user", "content": "q"}]] * 8,
            "completion": ["a"] * 8,
            "score": [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0],
            "gold": [0.1] * 4 + [0.3] * 4,
            "step": [s for s in steps for _ in range(2)],
        }
    ).to_parquet(stage / "samples.parquet")
    pd.DataFrame(
        {
            "step": steps + [4],
            "loss": [0.1] * 4 + [None],
            "kl": kl_per_token + [None],
            "completions/mean_length": [10.0] * 4 + [None],
            "kl_coef": [0.1, 0.2, 0.3, 0.4, None],
            "stage": [None] * 4 + ["policy"],
        }
    ).to_csv(stage / "metrics.csv", index=False)


def test_windows_average_rollouts_and_logged_kl(tmp_path):
    _stage(tmp_path, "rloo", 0, [0.0, 0.1, 0.2, 0.3])
    _stage(tmp_path, "ppo", 0, [0.0, 0.0, 0.0, 0.0])
    table = loop_dynamics.run_dynamics(tmp_path, ["rloo"], windows=2)
    assert list(table["method"].unique()) == ["rloo"] and len(table) == 2
    first, second = table.iloc[0], table.iloc[1]
    assert first["rollouts"] == second["rollouts"] == 4
    assert (first["reward_score"], second["reward_score"]) == (1.5, 3.5)
    assert (first["gold"], second["gold"]) == pytest.approx((0.1, 0.3))
    assert (first["seq_kl"], second["seq_kl"]) == pytest.approx((0.5, 2.5))  # per-token kl x mean length
    assert (first["kl_coef"], second["kl_coef"]) == pytest.approx((0.15, 0.35))
    with pytest.raises(SystemExit, match="no finished policy stage"):
        loop_dynamics.run_dynamics(tmp_path, ["dpo"], windows=2)
