"""Interplay metrics against hand-computed values on small known trajectories."""

import numpy as np
import pytest
from synthetic import write_stage

from workflow.analysis import interplay as ip
from workflow.analysis import trajectories as tj

KEYS = ("layers.0.a.lora_A.weight", "layers.0.a.lora_B.weight")


def stage(root, name, points, steps=None):
    """A stage whose snapshot j holds ``points[j]`` split over two 2-element tensors."""
    snaps = [{KEYS[0]: np.asarray(p[:2], float), KEYS[1]: np.asarray(p[2:], float)} for p in points]
    return str(write_stage(root / name, snaps, steps))


def walk(updates, start=(0, 0, 0, 0)):
    pts = [np.asarray(start, float)]
    for u in updates:
        pts.append(pts[-1] + np.asarray(u, float))
    return pts


def analyse(tmp_path, pol_iters, rew_iters, chunk=1, dim=3):
    pol = [stage(tmp_path, f"p{i}", pts) for i, pts in enumerate(pol_iters)]
    rew = [stage(tmp_path, f"r{i}", pts) for i, pts in enumerate(rew_iters)]
    P, R = tj.load_trajectory("policy", pol), tj.load_trajectory("reward", rew)
    keys = tj.shared_keys([P, R])
    al = ip.align(P, R)
    acc = ip.UpdateAccumulator(al, P, R)
    reduced = tj.stream({"policy": P, "reward": R}, keys, dim=dim, hooks=[acc], chunk=chunk)
    steps = ip.step_table(acc, P, R, reduced)
    return steps, ip.iteration_table(steps, acc, reduced)


E1, E2, E3 = (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0)


def test_orthogonal_and_parallel_updates(tmp_path):
    steps, _ = analyse(tmp_path, [walk([E1, E1, E1])], [walk([E2, E2, E2])])
    np.testing.assert_allclose(steps["angle_deg"], 90.0)
    np.testing.assert_allclose(steps["cosine"], 0.0, atol=1e-12)
    np.testing.assert_allclose(steps["policy_consecutive_cosine"][:2], 1.0)
    assert np.isnan(steps["policy_consecutive_cosine"].iloc[2])
    np.testing.assert_allclose(steps["policy_norm"], 1.0)
    steps, _ = analyse(tmp_path / "b", [walk([E1, E2])], [walk([(2, 0, 0, 0), (0, 3, 0, 0)])])
    np.testing.assert_allclose(steps["angle_deg"], 0.0, atol=1e-6)
    np.testing.assert_allclose(steps["reward_norm"], [2, 3])
    np.testing.assert_allclose(steps["policy_consecutive_cosine"][:1], 0.0, atol=1e-12)
    steps, _ = analyse(tmp_path / "c", [walk([E1])], [walk([(-1, 1, 0, 0)])])
    np.testing.assert_allclose(steps["angle_deg"], 135.0)


def test_obi_wan_pairs_reward_step_with_next_policy_step(tmp_path):
    # reward step t equals policy step t+1; direct pairs are orthogonal
    steps, _ = analyse(tmp_path, [walk([E1, E2, E3])], [walk([E2, E3, E1])])
    np.testing.assert_allclose(steps["cosine"], 0.0, atol=1e-12)
    np.testing.assert_allclose(steps["obi_wan_cosine"][:2], 1.0)
    np.testing.assert_allclose(steps["obi_wan_angle_deg"][:2], 0.0, atol=1e-6)
    assert np.isnan(steps["obi_wan_cosine"].iloc[2])


def test_pearson_of_weight_changes(tmp_path):
    # dP = [1, 2, 3, 4], dR = [2, 1, 4, 3]: deviations (-1.5,-.5,.5,1.5) and (-.5,-1.5,1.5,.5):
    # covariance sum 3, variance sums 5 and 5 -> r = 0.6 (cosine = 28/30)
    steps, _ = analyse(tmp_path, [walk([(1, 2, 3, 4)])], [walk([(2, 1, 4, 3)], start=(5, 5, 5, 5))])
    np.testing.assert_allclose(steps["pearson"], 0.6)
    np.testing.assert_allclose(steps["cosine"], 28 / 30)
    assert ip.pearson_from_sums(4, 10, 10, 30, 30, 28) == pytest.approx(0.6)


def test_alignment_with_different_counts_and_iterations(tmp_path):
    pol = [walk([E1] * 4), walk([E2] * 2, start=(4, 0, 0, 0))]
    rew = [walk([E1] * 2), walk([E3] * 2)]
    steps, iters = analyse(tmp_path, pol, rew)
    # iteration 0: 5 policy vs 3 reward snapshots -> grid of 3: policy rows 0, 2, 4
    assert list(steps["iteration"]) == [0, 0, 1, 1]
    assert list(steps["policy_step_from"]) == [0, 2, 0, 1]
    np.testing.assert_allclose(steps["policy_norm"], [2, 2, 1, 1])
    np.testing.assert_allclose(steps["angle_deg"], [0, 0, 90, 90], atol=1e-6)
    it = iters.set_index("scope")
    assert list(iters["scope"]) == ["iteration", "iteration", "trajectory"]
    np.testing.assert_allclose(iters["iteration_cosine"][:2], [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(iters["policy_momentum_cosine"][1], 0.0, atol=1e-12)
    np.testing.assert_allclose(it.loc["trajectory", "angle_deg"], 45.0)


def test_procrustes_and_distance_correlation_known_values():
    square = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], float)
    rhombus = np.array([[1, 0], [0, 2], [-1, 0], [0, -2]], float)
    # standardised: X/2 and Y/sqrt(10); X^T Y = diag(2, 4) -> singular values sum 3/sqrt(10)
    # disparity = 1 - 9/10
    assert ip.procrustes_disparity(square, rhombus) == pytest.approx(0.1)
    rot = np.array([[0, -1], [1, 0]], float)
    assert ip.procrustes_disparity(square, 3 * square @ rot + 5) == pytest.approx(0.0, abs=1e-12)
    x = np.arange(6, dtype=float)[:, None]
    assert ip.distance_correlation(x, 2 * x + 1) == pytest.approx(1.0)
    # two points: every distance correlation of non-degenerate pairs is 1
    assert ip.distance_correlation(np.array([[0.0], [1.0]]), np.array([[3.0], [-1.0]])) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 1)), rng.normal(size=(400, 1))
    assert ip.distance_correlation(a, b) < 0.15
    assert np.isnan(ip.procrustes_disparity(np.zeros((3, 2)), square[:3]))


def test_zero_updates_give_nan_not_errors(tmp_path):
    steps, iters = analyse(tmp_path, [walk([(0, 0, 0, 0), E1])], [walk([E2, E2])])
    assert np.isnan(steps["cosine"].iloc[0]) and steps["angle_deg"].iloc[1] == pytest.approx(90)
    assert ip.angle_deg(0.5) == pytest.approx(60)
