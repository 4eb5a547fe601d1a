# Paths and input functions shared by every stage. The results layout is documented in README.md.
import os

METHODS = ["ppo", "dpo", "rloo", "zorloo"]
DATASET = config["dataset"]["name"]
SPLITS = ["train", "test"]


wildcard_constraints:
    method="|".join(METHODS),
    i=r"\d+",
    split="|".join(SPLITS),
    dataset=r"[A-Za-z0-9_.-]+",


def data_path(split):
    """Extracted preference rows of the configured dataset."""
    return f"results/data/{DATASET}/{split}.parquet"


def builds_base_model():
    """True when no real model is configured and the tiny embedded model is built."""
    return not config["model"].get("name")


def base_model_path():
    """Folder or hub id every stage loads the base causal LM from."""
    return "results/base" if builds_base_model() else config["model"]["name"]


def base_model_input(wildcards=None):
    """The base-model folder as a rule input, only when the workflow builds it."""
    return "results/base" if builds_base_model() else []


def policy_dir(method, i):
    """Stage folder of policy iteration ``i`` (``-1`` is the SFT adapter)."""
    return "results/sft" if int(i) < 0 else f"results/{method}/iter_{int(i)}/policy"


def reward_dir(method, i):
    """Stage folder of reward model ``i`` (iteration 0 is shared by every method)."""
    return "results/reward/iter_0" if int(i) == 0 else f"results/{method}/iter_{int(i)}/reward"


def train_resources():
    """Resources of a training job (the SLURM profile overrides them per rule)."""
    res = config.get("resources", {})
    return dict(
        mem_mb=res.get("train_mem_mb", 4000),
        runtime=res.get("train_runtime", 60),
        gpu=res.get("gpus", 0),
    )
