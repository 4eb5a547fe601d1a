# Paths and input functions shared by every stage. The results layout is documented in README.md.
from workflow.rerun import code_hash, stage_settings
from workflow.schema import METHODS, ZO_METHODS, setting

# ZOPrO methods share rloo's iteration 0 (the same job: same seed and settings) and the reward
# model refined from it (reward model 1)
LOOP_ITERATIONS = int(config["loop"]["iterations"])
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
    return not setting(config, "model.name")


def base_inputs():
    """``{"base": "results/base"}`` as named rule inputs when the workflow builds the base model, else ``{}``."""
    return {"base": "results/base"} if builds_base_model() else {}


def chain_owner(method, i):
    """The method whose folders hold iteration ``i`` of ``method``: rloo's for a ZOPrO method's
    iteration 0 (shared, see ZO_METHODS), else its own."""
    return "rloo" if method in ZO_METHODS and int(i) == 0 else method


def iteration_dir(method, i):
    """Folder of iteration ``i`` of ``method`` (policy, its evaluation and pairs)."""
    return f"results/{chain_owner(method, i)}/iter_{int(i)}"


def policy_dir(method, i):
    """Stage folder of policy iteration ``i`` (``-1`` is the SFT adapter)."""
    return "results/sft" if int(i) < 0 else f"{iteration_dir(method, i)}/policy"


def reward_dir(method, i):
    """Stage folder of reward model ``i`` (iteration 0 is shared by every method; reward model i is
    refined on the pairs of policy i - 1, so it lives with that policy's owner)."""
    i = int(i)
    return "results/reward/iter_0" if i == 0 else f"results/{chain_owner(method, i - 1)}/iter_{i}/reward"


def train_resources(data_parallel=True):
    """Resources of a job that loads models (the SLURM profile overrides mem_mb and runtime per rule).
    A training stage (``data_parallel``) runs in ``processes`` processes (workflow.job): one per GPU,
    ``resources.gpus`` of them, or ``resources.cpu_processes`` on CPUs; a job that runs in one
    process (base model, pairs, evaluations) gets at most one GPU."""
    gpus = setting(config, "resources.gpus")
    return dict(
        mem_mb=setting(config, "resources.train_mem_mb"),
        runtime=setting(config, "resources.train_runtime"),
        gpu=gpus if data_parallel else min(gpus, 1),
        processes=(gpus or setting(config, "resources.cpu_processes")) if data_parallel else 1,
    )


# The process count of a training stage, passed as a param: each process trains on batches of its
# own (policy.batch_size, sft.batch_size, ... per process), so the count changes what a stage
# computes and reruns it, unlike the job's other resources (workflow/rerun.py, RUNTIME_KEYS).
TRAIN_PROCESSES = train_resources()["processes"]


def nested_run_resources():
    """Resources of a study seed's job: the jobs of its nested run share its GPUs (``resources.gpus``);
    the job itself is one process."""
    return train_resources() | dict(processes=1)


# Params of every stage besides its own, see workflow/rerun.py. `settings` holds the config values
# the stage reads (its job gets them as its config), `code` a hash of the Python it runs; a change
# to either reruns the stage and everything downstream (Snakemake's params trigger). TRAIN_SETTINGS:
# what the SFT and reward-model stages read besides their own sections; EVAL_SETTINGS: the evaluations'.
TRAIN_SETTINGS = ("model.name", "model.max_length", "dataset.name", "precision", "activation_checkpointing")
EVAL_SETTINGS = ("evaluation", "model", "dataset.name", "precision")


def settings(*keys):
    """The config values of ``keys`` (sections or dotted paths) a stage reads, ``seed`` included."""
    return stage_settings(config, ("seed", *keys))


def stage_code(module):
    """Hash of the stage's module, the job bridge and the workflow modules they import."""
    return code_hash(module, "workflow.job")


def policy_settings(wildcards):
    """Settings of train_policy: ``zopro`` only where ZOPrO trains (ZO_METHODS, iteration >= 1)."""
    zopro = ("zopro",) if wildcards.method in ZO_METHODS and int(wildcards.i) >= 1 else ()
    return settings(
        "policy",
        "loop.intraepoch",
        "loop.iteration_fraction",
        "snapshots",
        "model",
        "dataset.name",
        "precision",
        "activation_checkpointing",
        *zopro,
    )


def base_model_param(wildcards, input):
    """What stages load the base model from: the built folder (an input) or the configured model."""
    return input.base if "base" in input.keys() else config["model"]["name"]


# Extraction (rules/data.smk)
def _dataset_option(wildcards, key):
    """``dataset.<key>`` when ``wildcards.dataset`` is the configured dataset, else None."""
    own = wildcards.dataset == setting(config, "dataset.name")
    return setting(config, f"dataset.{key}") if own else None


def _split_file(wildcards):
    """The local file configured for this split (``dataset.files.<split>``), or None."""
    return _dataset_option(wildcards, f"files.{wildcards.split}")


def _extract_inputs(wildcards):
    """The split's local file as a named input, so that changing the file reruns the extraction."""
    path = _split_file(wildcards)
    return {"file": path} if path else {}


def _embedded_rows(wildcards):
    if wildcards.dataset != "embedded":
        return None
    return setting(config, f"embedded.{wildcards.split}_rows")


# Plots (rules/plots.smk)
# files of a plots folder shown in the report (the 3D HTML stay beside them: each embeds plotly.js)
REPORT_PLOT_FILES = ["{name}.png", "{name}.csv"]


def trajectory_inputs(method, k):
    """Snapshots folders of policy and reward iterations 0..k-1 of ``method``."""
    return dict(
        policy=[f"{policy_dir(method, i)}/snapshots" for i in range(int(k))],
        reward=[f"{reward_dir(method, i)}/snapshots" for i in range(int(k))],
    )


def plots_resources():
    return dict(mem_mb=2000, runtime=60)
