"""Per-job runtime set-up: threads, seeds, caches, warnings, tracking, device and precision."""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from workflow.schema import default, schema_property, section

_precision: str | None = None  # config "precision" of this process (set_precision); None: not set yet
# trainer arguments of config "tracking" (set_tracking); the schema's default until a job sets it
_tracking: dict[str, Any] = {"report_to": default("tracking.report_to")}
# Warnings that every stage would print again and again (about 60 per policy stage) and that say
# nothing about the run: transformers 5 renaming gradient checkpointing, which trl calls every step.
KNOWN_NOISY_WARNINGS = (
    (FutureWarning, r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated and will be removed in v6"),
)
TENSORBOARD_DIR = "logs/tensorboard"  # event files of report_to tensorboard: one folder per job (set_tracking)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a SLURM allocation or ``taskset``), or
    ``os.cpu_count()`` where the platform does not say."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def torch_threads(threads: int) -> int:
    """Torch threads of this process for a job given ``threads``: at most the usable CPUs, shared
    among the job's data-parallel processes on this node (``LOCAL_WORLD_SIZE``, set by torchrun).

    Snakemake does not cap ``--cores`` at the machine's cores, so ``threads`` may exceed them.
    """
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(int(threads), usable_cpus()) // processes)


def configure(threads: int, seed: int, cache_dir: str | None = None, precision: str | None = None) -> None:
    """Set torch's threads (:func:`torch_threads`), seed every RNG, point HF caches at ``cache_dir``
    (:func:`use_cache_dir`) and set the process-wide ``precision`` (the job's ``config["precision"]``,
    see :func:`set_precision`)."""
    set_precision(precision)
    use_cache_dir(cache_dir)
    filter_known_warnings()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(torch_threads(threads))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def filter_known_warnings() -> None:
    """Hide exactly the :data:`KNOWN_NOISY_WARNINGS` (category and message); every other warning shows."""
    for category, message in KNOWN_NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def user_hf_home() -> str:
    """The user's own Hugging Face folder: ``$HF_HOME``, else ``$XDG_CACHE_HOME/huggingface``, else
    ``~/.cache/huggingface`` (as ``huggingface_hub`` resolves it)."""
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.expanduser(os.environ.get("HF_HOME", default))


def use_cache_dir(cache_dir: str | None) -> None:
    """Config ``cache_dir``: models and datasets are cached under this folder (``HF_HOME``), while
    the user's stored token (``hf auth login``) is still found (``HF_TOKEN_PATH``). ``None`` leaves
    the user's own Hugging Face cache and settings untouched. Variables the user set win."""
    if not cache_dir:
        return
    token = os.path.join(user_hf_home(), "token")
    cache = os.path.abspath(os.path.expanduser(str(cache_dir)))
    os.environ.setdefault("HF_TOKEN_PATH", token)
    os.environ.setdefault("HF_HOME", cache)
    os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(cache, "datasets"))


def set_tracking(tracking: dict[str, Any] | None, run_name: str) -> None:
    """Config ``tracking`` of this process's job, named ``run_name`` (``train_policy/rloo_1``): every
    trainer reports to ``tracking.report_to`` (transformers' ``report_to``: ``none``, ``tensorboard``,
    ``trackio``, ``wandb``, ... or a list) as run ``run_name`` of project ``tracking.project``
    (trackio's ``project``, ``WANDB_PROJECT`` unless set); tensorboard writes its event files to
    ``logs/tensorboard/<run_name>`` (``TENSORBOARD_LOGGING_DIR``, set per job)."""
    global _tracking
    tracking = section({"tracking": tracking}, "tracking")
    report_to = tracking["report_to"]
    _tracking = {
        "report_to": list(report_to) if isinstance(report_to, (list, tuple)) else str(report_to),
        "run_name": run_name,
    }
    if tracking.get("project"):
        _tracking["project"] = str(tracking["project"])
        os.environ.setdefault("WANDB_PROJECT", _tracking["project"])
    os.environ["TENSORBOARD_LOGGING_DIR"] = os.path.abspath(os.path.join(TENSORBOARD_DIR, run_name))


def tracking_args() -> dict[str, Any]:
    """Trainer arguments of the job's tracking (:func:`set_tracking`): ``report_to``, and once set,
    ``run_name`` and ``project``; the schema's ``report_to`` (none) until then."""
    return dict(_tracking)


def device() -> torch.device:
    """The device this process computes on: when there are GPUs, its own (``LOCAL_RANK`` of a
    data-parallel launch, else the first), otherwise the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def rng_snapshot() -> Callable[[], None]:
    """Capture torch's global random state, the CPU's and, once CUDA is initialised, every GPU's
    (sampling on a GPU draws from the GPU's); the returned function puts it back, as often as called."""
    cpu = torch.get_rng_state()
    gpus = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def restore() -> None:
        torch.set_rng_state(cpu)
        if gpus is not None:
            torch.cuda.set_rng_state_all(gpus)

    return restore


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run the block with torch's global RNG seeded with ``seed`` (``torch.manual_seed``: the CPU
    and every GPU), then give the caller back the random state it had (:func:`rng_snapshot`)."""
    restore = rng_snapshot()
    torch.manual_seed(int(seed))
    try:
        yield
    finally:
        restore()


def processes():
    """The data-parallel state (``accelerate.PartialState``) as the Trainer will set it up: CPU
    processes join with gloo when there is no GPU (a plain ``PartialState()`` would then see one
    process), GPUs with NCCL; a single process outside ``accelerate launch``."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def set_precision(precision: str | None) -> None:
    """Set the precision every stage of this process follows: ``auto``, ``fp32`` or ``bf16``
    (``None``: the schema's default)."""
    global _precision
    spec = schema_property("precision")
    value = spec["default"] if precision is None else str(precision)
    if value not in spec["enum"]:
        raise ValueError(f"precision must be one of {', '.join(spec['enum'])}, got {precision!r}")
    _precision = value


def precision() -> str:
    """The process-wide precision (the schema's default until :func:`set_precision` is called)."""
    if _precision is None:
        set_precision(None)
    return _precision


def use_bf16() -> bool:
    """Whether base models load in bf16 and trainers autocast to bf16: precision ``bf16`` (on any
    device, the CPU included), or ``auto`` on a GPU with native bf16 (not emulated: V100, T4); fp32
    otherwise."""
    choice = precision()
    if choice == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return choice == "bf16"


def require_gpus(requested: int) -> None:
    """Fail fast when a job asks for GPUs that this node does not have."""
    if requested <= 0:
        return
    found = torch.cuda.device_count()
    if found < requested:
        raise RuntimeError(
            f"this job requested {requested} GPU(s) (resources.gpu) but {found} are visible "
            "(CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); set the config's resources.gpus to 0 to run on CPUs"
        )
