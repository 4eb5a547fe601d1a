"""Atomic writes, the job bridge and its data-parallel launch path."""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap

import pandas as pd
import pytest
import torch
from smk import REPO, pythonpath

from workflow import io, runtime
from workflow import job as jobmod


def test_atomic_path_keeps_previous_file_on_error(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    target = tmp_path / "adapter"
    with io.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(ValueError):
        with io.atomic_dir(target) as tmp:
            (tmp / "b.txt").write_text("2")
            raise ValueError
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    with io.atomic_dir(target) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_link_tree_fills_a_folder_and_keeps_the_source(tmp_path):
    """A policy stage commits its snapshots with link_tree: a kill before the commit leaves the
    resumable state's snapshots whole (they were moved out of it before)."""
    source = tmp_path / "checkpoints" / "snapshots"
    source.mkdir(parents=True)
    (source / "index.csv").write_text("step\n0\n")
    (source / "step_0000000.safetensors").write_bytes(b"weights")
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_dir(tmp_path / "snapshots") as snaps:
            io.link_tree(source, snaps)
            assert (snaps / "step_0000000.safetensors").read_bytes() == b"weights"
            raise KeyboardInterrupt  # killed before the commit
    assert not (tmp_path / "snapshots").exists()
    assert sorted(p.name for p in source.iterdir()) == ["index.csv", "step_0000000.safetensors"]
    with io.atomic_dir(tmp_path / "snapshots") as snaps:
        io.link_tree(source, snaps)
    committed = tmp_path / "snapshots" / "step_0000000.safetensors"
    assert committed.stat().st_ino == (source / "step_0000000.safetensors").stat().st_ino  # linked, not copied
    shutil.rmtree(source)
    assert committed.read_bytes() == b"weights"


def test_a_folder_left_between_the_two_renames_is_put_back(tmp_path):
    """A run killed after moving the old folder aside and before moving the new one in leaves
    ``.adapter.old`` and no ``adapter``: the next run puts it back, so a failure keeps it."""
    target = tmp_path / "adapter"
    old = io.hidden_sibling(target, "old")
    old.mkdir()
    (old / "a.txt").write_text("1")
    with pytest.raises(ValueError):
        with io.atomic_dir(target) as tmp:
            (tmp / "b.txt").write_text("2")
            raise ValueError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"] and (target / "a.txt").read_text() == "1"


def test_stale_scratch_of_a_killed_run_is_removed_by_the_next_run(tmp_path):
    """SIGKILL inside ``atomic_dir``/``scratch_dir``/``atomic_path`` leaves ``.adapter.tmp``,
    ``.trainer.tmp``, ``.metrics.csv.tmp`` (fixed names); the next run starts from empty folders,
    overwrites the file and leaves only its outputs."""
    import signal
    import subprocess

    target, trainer, metrics = tmp_path / "adapter", tmp_path / "trainer", tmp_path / "metrics.csv"
    code = textwrap.dedent(f"""
        import sys, time
        from workflow import io
        with io.atomic_dir({str(target)!r}) as tmp, io.scratch_dir({str(trainer)!r}) as scratch, \\
                io.atomic_path({str(metrics)!r}) as half:
            (tmp / "half.bin").write_bytes(b"x")
            half.write_text("step,lo")
            (scratch / "checkpoint").mkdir()
            print("ready", flush=True)
            time.sleep(60)
    """)
    env = {**os.environ, "PYTHONPATH": pythonpath(REPO)}
    killed = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert killed.stdout.readline().strip() == "ready"
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".adapter.tmp", ".metrics.csv.tmp", ".trainer.tmp"]
    with io.atomic_dir(target) as tmp, io.scratch_dir(trainer) as scratch:
        assert (tmp.name, scratch.name) == (".adapter.tmp", ".trainer.tmp")
        assert not any(tmp.iterdir()) and not any(scratch.iterdir())
        (tmp / "adapter.bin").write_bytes(b"y")
    io.write_csv(pd.DataFrame({"step": [1]}), metrics)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "metrics.csv"]
    assert metrics.read_text() == "step\n1\n"
    assert [p.name for p in target.iterdir()] == ["adapter.bin"]


def test_scratch_names_differ_per_data_parallel_rank(tmp_path, monkeypatch):
    assert io.hidden_sibling(tmp_path / "adapter", "tmp") == tmp_path / ".adapter.tmp"
    monkeypatch.setenv("RANK", "1")
    assert io.hidden_sibling(tmp_path / "adapter", "tmp") == tmp_path / ".adapter.rank1.tmp"
    with io.atomic_dir(tmp_path / "adapter") as tmp:
        assert tmp.name == ".adapter.rank1.tmp"


def test_write_parquet_and_csv_roundtrip(tmp_path):
    df = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    io.write_parquet(df, tmp_path / "d" / "x.parquet")
    io.write_csv(df, tmp_path / "x.csv")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "d" / "x.parquet"), df)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "x.csv"), df)


def test_require_gpus_fails_fast_without_gpu():
    runtime.require_gpus(0)
    with pytest.raises(RuntimeError, match=r"requested \d+ GPU.*resources.gpus to 0"):
        runtime.require_gpus(torch.cuda.device_count() + 1)


def test_each_data_parallel_process_computes_on_its_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert runtime.device() == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert runtime.device() == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.device() == torch.device("cpu")


def _write_probe_module(tmp_path):
    (tmp_path / "probe_stage.py").write_text(
        textwrap.dedent(
            """
        import json, os
        import torch

        def run(job):
            rank = int(os.environ.get("RANK", 0))
            world = int(os.environ.get("WORLD_SIZE", 1))
            os.makedirs(job.output["folder"], exist_ok=True)
            out = os.path.join(job.output["folder"], f"rank{rank}.json")
            json.dump({"rank": rank, "world": world, "threads": torch.get_num_threads(),
                       "seed": job.seed, "wildcards": job.wildcards}, open(out, "w"))
        """
        )
    )


@pytest.mark.parametrize("processes", [1, 2])
def test_run_job_launches_data_parallel_processes(tmp_path, monkeypatch, processes):
    _write_probe_module(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", pythonpath(tmp_path, os.getcwd()))
    out = tmp_path / "out"
    out.mkdir()
    job = jobmod.Job(
        input={},
        output={"folder": str(out)},
        params={},
        config={"seed": 7},
        wildcards={"method": "zorloo"},
        threads=4,
        resources={"processes": processes},  # rules/common.smk: train_resources()
    )
    scratch = tmp_path / "scratch"
    monkeypatch.setenv("ZOPRO_RANK_SCRATCH", str(scratch))
    jobmod.run_job(job, "probe_stage:run")
    # Only rank 0 writes the real output; other ranks write the same names under the scratch folder.
    assert sorted(p.name for p in out.iterdir()) == ["rank0.json"]
    files = [out / "rank0.json"] + [
        scratch / f"rank{r}" / os.path.relpath(out, "/") / f"rank{r}.json" for r in range(1, processes)
    ]
    records = [json.loads(p.read_text()) for p in files]
    assert [r["rank"] for r in records] == list(range(processes))
    assert all(r["world"] == processes and r["seed"] == 7 for r in records)
    assert all(r["wildcards"] == {"method": "zorloo"} for r in records)
    # the job's threads, at most the usable CPUs, shared among its processes (no oversubscription)
    assert all(r["threads"] == max(1, min(4, runtime.usable_cpus()) // processes) for r in records)


def test_torch_threads_share_the_usable_cpus_among_a_jobs_processes(monkeypatch):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert [runtime.torch_threads(t) for t in (1, 8, 64)] == [1, 8, 16]  # --cores 64 on 16 CPUs
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 processes of the job on this node
    assert [runtime.torch_threads(t) for t in (1, 8, 64)] == [1, 2, 4]
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # a 2-CPU allocation
    assert runtime.torch_threads(8) == 1


def test_log_to_captures_stdout_and_logging(tmp_path):
    import logging

    log = tmp_path / "logs" / "x.log"
    with jobmod.log_to(str(log)):
        print("hello from stdout")
        print("progress", file=sys.stderr)
        logging.getLogger("t").info("logged line")
    text = log.read_text()
    assert "hello from stdout" in text and "progress" in text and "logged line" in text
