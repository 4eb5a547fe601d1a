"""Per-job runtime set-up: threads, seeds, caches, device and precision."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def configure(threads: int, seed: int, cache_dir: str | None = None) -> None:
    """Cap torch threads at the real CPU count, seed every RNG and point HF caches at ``cache_dir``.

    Snakemake does not cap ``--cores`` at the machine's cores, so ``threads`` may exceed them.
    """
    if cache_dir:
        cache = os.path.abspath(cache_dir)
        os.environ.setdefault("HF_HOME", cache)
        os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(cache, "datasets"))
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(max(1, min(int(threads), os.cpu_count() or 1)))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def device() -> torch.device:
    """The device training runs on: the first GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def processes():
    """The data-parallel state (``accelerate.PartialState``) as the Trainer will set it up: CPU
    processes join with gloo when there is no GPU (a plain ``PartialState()`` would then see one
    process), GPUs with NCCL; a single process outside ``accelerate launch``."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def use_bf16() -> bool:
    """bf16 on a GPU that supports it, fp32 everywhere else."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def require_gpus(requested: int) -> None:
    """Fail fast when a job asks for GPUs that this node does not have."""
    if requested <= 0:
        return
    found = torch.cuda.device_count()
    if found < requested:
        raise RuntimeError(
            f"this job requested {requested} GPU(s) (resources.gpu) but {found} are visible "
            "(CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); set resources.gpu: 0 to run on CPU"
        )
