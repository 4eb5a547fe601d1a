"""Streaming trajectories: reading, validation, subsampling, keep_rm replay, projection."""

import sys
import types

import numpy as np
import pytest
from synthetic import write_stage

from workflow.analysis import projections as proj
from workflow.analysis import trajectories as tj

SHAPES = {"layers.0.q.lora_A.weight": (3, 5), "layers.0.q.lora_B.weight": (5, 3), "layers.1.v.lora_A.weight": (2, 7)}


def make_run(root, n_iter=2, n_snap=(5, 4), seed=0, reward_extra=True):
    rng = np.random.default_rng(seed)
    pol, rew = [], []
    for i in range(n_iter):
        for name, dirs, n in (("policy", pol, n_snap[0]), ("reward", rew, n_snap[1])):
            snaps = [{k: rng.normal(size=s) for k, s in SHAPES.items()} for _ in range(n)]
            if name == "reward" and reward_extra:
                for s in snaps:
                    s["score.weight"] = rng.normal(size=(1, 4))
            dirs.append(str(write_stage(root / f"iter_{i}" / name, snaps, steps=range(0, 3 * n, 3))))
    return pol, rew


def flat(traj, keys):
    """In-memory reference: every snapshot flattened over ``keys`` (small cases only)."""
    from safetensors.numpy import load_file

    return np.stack([np.concatenate([load_file(str(f))[k].ravel() for k in keys]) for f in traj.files])


def test_streaming_projection_matches_in_memory(tmp_path):
    pol, rew = make_run(tmp_path)
    trajs = {"policy": tj.load_trajectory("policy", pol), "reward": tj.load_trajectory("reward", rew)}
    keys = tj.shared_keys(trajs.values())
    assert "score.weight" not in keys and list(keys) == sorted(SHAPES)
    seen = []
    reduced = tj.stream(trajs, keys, dim=6, seed=3, chunk=4, hooks=[lambda k, c, d: seen.append((k, c))])
    g = tj.dense_projection(keys, 6, seed=3, chunk=4)
    assert g.shape == (sum(np.prod(s) for s in SHAPES.values()), 6)
    for name, t in trajs.items():
        np.testing.assert_allclose(reduced[name], flat(t, keys) @ g, rtol=1e-5, atol=1e-5)
    assert len(seen) == sum(-(-int(np.prod(s)) // 4) for s in SHAPES.values())
    # blocks are a function of (seed, key, chunk) only: reproducible, and another seed differs
    np.testing.assert_array_equal(tj.projection_block(3, "k", 0, 4, 6), tj.projection_block(3, "k", 0, 4, 6))
    assert not np.allclose(tj.projection_block(3, "k", 0, 4, 6), tj.projection_block(4, "k", 0, 4, 6))


def test_projection_roughly_preserves_distances(tmp_path):
    rng = np.random.default_rng(1)
    snaps = [{"layers.0.w": rng.normal(size=(40, 100))} for _ in range(12)]
    d = str(write_stage(tmp_path / "a", snaps))
    t = tj.load_trajectory("a", [d])
    keys = tj.shared_keys([t])
    y = tj.stream({"a": t}, keys, dim=200, seed=0)["a"]
    x = np.stack([s["layers.0.w"].ravel() for s in snaps])
    from scipy.spatial.distance import pdist

    ratio = pdist(y) / pdist(x)
    assert abs(ratio.mean() - 1) < 0.1
    assert ratio.min() > 0.7 and ratio.max() < 1.3


def test_layer_filter_and_subsample(tmp_path):
    pol, rew = make_run(tmp_path, n_snap=(9, 9))
    trajs = [tj.load_trajectory("policy", pol, max_snapshots=8), tj.load_trajectory("reward", rew)]
    assert list(tj.shared_keys(trajs, layer=1)) == ["layers.1.v.lora_A.weight"]
    p = trajs[0]
    assert len(p) == 8 and p.boundaries == [0, 4]
    assert list(p.snapshot[:4]) == [0, 3, 5, 8]  # first and last of each iteration kept
    assert list(tj.subsample(10, 4)) == [0, 3, 6, 9]
    assert list(tj.subsample(3, None)) == [0, 1, 2]


def test_keep_rm_replay(tmp_path):
    s = [{"layers.0.w": np.full((2,), v, dtype=float)} for v in (0.0, 2.0)]
    s1 = [{"layers.0.w": np.full((2,), v, dtype=float)} for v in (2.0, 6.0)]
    s2 = [{"layers.0.w": np.full((2,), v, dtype=float)} for v in (4.0, 8.0)]
    dirs = [str(write_stage(tmp_path / f"r{i}", x)) for i, x in enumerate((s, s1, s2))]
    t = tj.load_trajectory("reward", dirs)
    keys = tj.shared_keys([t])
    x = tj.read_chunk(t, "layers.0.w", 0, 2, keep_rm_alpha=0.5)[:, 0]
    # iteration 0 as is; iteration 1: 0.5*2 + 0.5*s; iteration 2: 0.5*4 + 0.5*s (prev = replayed last)
    np.testing.assert_allclose(x, [0, 2, 2, 4, 4, 6])
    assert tj.stream({"reward": t}, keys, dim=2, keep_rm={"reward": 0.5})["reward"].shape == (6, 2)


def test_validate_names_missing_and_partial_iterations(tmp_path):
    pol, _ = make_run(tmp_path, n_iter=3)
    tj.validate(pol, "policy")
    (tmp_path / "iter_1" / "policy" / "snapshots" / "step_0000003.safetensors").unlink()
    (tmp_path / "iter_2" / "policy" / "snapshots" / "index.csv").unlink()
    with pytest.raises(tj.IncompleteTrajectoryError) as err:
        tj.validate(pol + [str(tmp_path / "iter_3" / "policy")], "policy")
    msg = str(err.value)
    assert "policy iteration 0" not in msg
    assert "policy iteration 1" in msg and "step_0000003.safetensors" in msg and "partial" in msg
    assert "policy iteration 2" in msg and "index.csv is missing" in msg
    assert "policy iteration 3" in msg and "folder is missing" in msg


def test_embed_few_points():
    x = np.random.default_rng(0).normal(size=(7, 10))
    for method in ("pca", "tsne"):
        for k in (2, 3):
            assert proj.embed(x, method, k).shape == (7, k)
    assert proj.embed(x[:2, :1], "pca", 3).shape == (2, 3)


def test_umap_is_dropped_only_when_it_is_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # import umap raises ImportError
    assert proj.available_projections(["pca", "umap", "tsne"]) == ["pca", "tsne"]
    monkeypatch.setitem(sys.modules, "umap", types.ModuleType("umap"))
    assert proj.available_projections(["pca", "umap", "tsne"]) == ["pca", "umap", "tsne"]


def test_reads_files_written_by_workflow_snapshots(tmp_path):
    import torch

    from workflow.models import snapshots

    state = {"layers.0.q.lora_A.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    snapshots.save_snapshot(state, tmp_path / "snapshots", 0)
    snapshots.save_snapshot({k: v + 1 for k, v in state.items()}, tmp_path / "snapshots", 5)
    t = tj.load_trajectory("policy", [tmp_path])
    np.testing.assert_array_equal(tj.read_chunk(t, "layers.0.q.lora_A.weight", 1, 4), [[1, 2, 3], [2, 3, 4]])
    assert list(t.steps) == [0, 5]
