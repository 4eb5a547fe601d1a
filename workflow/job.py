"""The bridge between a Snakemake ``script:`` job and the stage functions of this package.

A stage function takes one :class:`Job` (plain, JSON-serialisable data) so that it can run
in-process, or in several processes under ``accelerate launch`` when a rule asks for more
than one GPU.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from workflow import runtime
from workflow.io import subprocess_stream
from workflow.rerun import RUNTIME_KEYS
from workflow.schema import setting

# the random-number streams of a loop iteration (Job.stage_seed); never change an offset silently
SEED_OFFSETS = {"policy": 0, "pairs": 17, "refine": 31, "ppo_records": 7919}


@dataclasses.dataclass
class Job:
    """Inputs, outputs, params and resources of one rule instance."""

    input: dict[str, Any]
    output: dict[str, Any]
    params: dict[str, Any]
    config: dict[str, Any]
    wildcards: dict[str, str]
    threads: int = 1
    resources: dict[str, Any] = dataclasses.field(default_factory=dict)
    log: str | None = None

    @classmethod
    def from_snakemake(cls, smk: Any) -> Job:
        """Build a job from the ``snakemake`` object of a ``script:`` directive (named items only).

        The job's ``config`` is the rule's ``settings`` param (the values the stage reads, see
        :mod:`workflow.rerun`) plus the :data:`workflow.rerun.RUNTIME_KEYS`; the ``settings`` and ``code`` params
        are not repeated in ``params``.
        """
        resources = {k: v for k, v in smk.resources.items() if not k.startswith("_")}
        params = dict(smk.params.items())
        settings = params.pop("settings", None)
        params.pop("code", None)
        config = (
            dict(smk.config)
            if settings is None
            else {**{k: smk.config[k] for k in RUNTIME_KEYS if k in smk.config}, **settings}
        )
        return cls(
            input=dict(smk.input.items()),
            output=dict(smk.output.items()),
            params=params,
            config=config,
            wildcards=dict(smk.wildcards.items()),
            threads=int(smk.threads),
            resources=resources,
            log=smk.log[0] if len(smk.log) else None,
        )

    @property
    def seed(self) -> int:
        return int(setting(self.config, "seed"))

    def stage_seed(self, purpose: str) -> int:
        """The seed of ``purpose`` (:data:`SEED_OFFSETS`) in this job's loop iteration (wildcard ``i``):
        config ``seed`` + 1009 x iteration + the purpose's offset, so that no two stages or
        iterations draw the same random numbers."""
        return self.seed + 1009 * int(self.wildcards.get("i", 0)) + SEED_OFFSETS[purpose]

    @property
    def stage_dir(self) -> str:
        """The one folder that holds every output of a training stage (adapter/, snapshots/, ...)."""
        parents = {os.path.dirname(os.path.normpath(str(path))) for path in self.output.values()}
        if len(parents) != 1:
            raise ValueError(f"outputs of a stage must share one folder, got {sorted(parents)}")
        return parents.pop()

    @property
    def run_name(self) -> str:
        """The job's name in experiment tracking: the last folder and the name of its log without the
        suffix (``logs/train_policy/rloo_1.log``: ``train_policy/rloo_1``), else ``job``."""
        if not self.log:
            return "job"
        path = Path(self.log)
        return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem

    @property
    def gpus(self) -> int:
        return int(self.resources.get("gpu", 0) or 0)

    @property
    def processes(self) -> int:
        """Processes the job runs in (resource ``processes``; above 1, data-parallel under
        accelerate): the rules give more than one to training stages only, one per GPU or
        ``resources.cpu_processes`` on CPUs (``train_resources`` in ``rules/common.smk``)."""
        return int(self.resources.get("processes", 1) or 1)


@contextlib.contextmanager
def log_to(path: str | None) -> Iterator[None]:
    """Send stdout, stderr (progress bars included) and ``logging`` to ``path``."""
    if not path:
        yield
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a", buffering=1) as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        root = logging.getLogger()
        handler = logging.StreamHandler(handle)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            yield
        finally:
            root.removeHandler(handler)


def resolve(target: str) -> Callable[[Job], Any]:
    """Import ``"package.module:function"``."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def run_job(job: Job, target: str) -> Any:
    """Set up the runtime and run ``target`` on ``job``; with more than one GPU, under accelerate."""
    runtime.require_gpus(job.gpus)
    if job.processes > 1:
        return _launch_distributed(job, target, job.processes)
    configure(job)
    return resolve(target)(job)


def configure(job: Job) -> None:
    """Set up this process for ``job`` (:func:`workflow.runtime.configure`, and its tracking)."""
    runtime.configure(job.threads, job.seed, job.config.get("cache_dir"), job.config.get("precision"))
    runtime.set_tracking(job.config.get("tracking"), job.run_name)


def _launch_distributed(job: Job, target: str, processes: int) -> None:
    """Run ``target`` in ``processes`` data-parallel processes with ``accelerate launch``.

    accelerate's multi-GPU launcher is torchrun; on a machine without CUDA the same launch
    gives CPU processes that torch.distributed joins with the gloo backend.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as spec:
        json.dump({"job": dataclasses.asdict(job), "target": target}, spec)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    cmd += ["--multi_gpu", "-m", "workflow.job", spec.name]
    # CPU processes (resources.gpus 0) stay on the CPU on a GPU machine too: hidden GPUs make
    # accelerate join them with gloo rather than give each a GPU that may not exist
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if job.gpus == 0 else None
    try:
        subprocess.run(
            cmd, check=True, stdout=subprocess_stream(sys.stdout), stderr=subprocess_stream(sys.stderr), env=env
        )
    finally:
        os.unlink(spec.name)


def run_script(smk: Any, target: str) -> Any:
    """Entry point for thin ``scripts/``: log to the rule's log and run ``target``."""
    job = Job.from_snakemake(smk)
    with log_to(job.log):
        return run_job(job, target)


def rank_outputs(outputs: dict[str, Any], rank: int, scratch: str) -> dict[str, Any]:
    """Outputs of data-parallel process ``rank``: the real ones on rank 0, else the same names
    under ``scratch/rank{rank}`` (every process then runs the same code, and only rank 0's
    results land in the workflow's outputs)."""
    if rank == 0:
        return outputs
    base = os.path.join(scratch, f"rank{rank}")
    return {name: os.path.join(base, os.path.relpath(os.path.abspath(path), "/")) for name, path in outputs.items()}


def _die_with_launcher() -> None:
    """Ask Linux to send this worker SIGTERM when its launcher dies.

    torchrun starts workers in sessions of their own, so a launcher killed outright (SIGKILL, a
    crashed job script) would otherwise leave them training on and writing outputs after the
    job has failed.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    launcher = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != launcher:  # it died before the request
        os.kill(os.getpid(), signal.SIGTERM)


def _main(spec_path: str) -> None:
    """Worker entry of a distributed launch: ``python -m workflow.job SPEC.json``.

    Processes other than rank 0 write their outputs under ``$ZOPRO_RANK_SCRATCH`` (default: a
    temporary folder removed at exit). Each worker dies with its launcher.
    """
    _die_with_launcher()
    with open(spec_path) as handle:
        spec = json.load(handle)
    job = Job(**spec["job"])
    rank = int(os.environ.get("RANK", "0"))
    scratch = os.environ.get("ZOPRO_RANK_SCRATCH")
    if rank > 0 and not scratch:
        scratch = tempfile.mkdtemp(prefix=f"zopro-rank{rank}-")
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    if rank > 0:
        job = dataclasses.replace(job, output=rank_outputs(job.output, rank, scratch))
    if torch.cuda.is_available():  # before any model loads: this process's own GPU, not the first
        torch.cuda.set_device(runtime.device())
    configure(job)
    resolve(spec["target"])(job)


if __name__ == "__main__":
    _main(sys.argv[1])
