# The config's validation and checks, and every input function, path and constant of the rules
# (rules/<stage>.smk hold rules only). The results layout is documented in README.md.
from snakemake.utils import validate

from workflow.config_checks import check_config, expand_home
from workflow.evaluation.study import nested_run_settings, workflow_hash
from workflow.rerun import code_hash, stage_settings
from workflow.schema import METHODS, ZO_METHODS, setting

validate(config, "../workflow/schemas/config.schema.yaml")
expand_home(config)  # ~ in the model, judge and data paths
check_config(config)  # settings that clash (workflow/config_checks.py), before any job

# ZOPrO methods share rloo's iteration 0 (the same job: same seed and settings) and the reward
# model refined from it (reward model 1)
LOOP_ITERATIONS = int(config["loop"]["iterations"])
LOOP_METHODS = list(config["loop"]["methods"])
DATASET = config["dataset"]["name"]
SPLITS = ["train", "test"]


wildcard_constraints:
    method="|".join(METHODS),
    i=r"\d+",
    k=r"\d+",
    seed=r"\d+",
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


# The loop (rules/loop.smk)
SFT_ADAPTER = "results/sft/adapter"
SFT_SAMPLES = "results/sft/evaluation.parquet"  # the SFT policy's evaluation answers (rule evaluate_policy)


def _check_iteration(i, first=0):
    i = int(i)
    if not first <= i < LOOP_ITERATIONS:
        raise ValueError(
            f"iteration {i} is outside the loop: policies 0..{LOOP_ITERATIONS - 1} and reward models "
            f"1..{LOOP_ITERATIONS - 1} are trained (loop.iterations = {LOOP_ITERATIONS})"
        )
    return i


def _check_owner(method, i, path):
    """Refuse to build a ZOPrO method's shared iteration-0 outputs twice (they are rloo's)."""
    if chain_owner(method, i) != method:
        raise ValueError(
            f"{method}'s iteration 0 is first-order RLOO, shared with rloo: its files are "
            f"{iteration_dir(method, 0)} and {reward_dir(method, 1)}; {path} is not built"
        )


def train_policy_inputs(wildcards):
    i = _check_iteration(wildcards.i)
    _check_owner(wildcards.method, i, f"results/{wildcards.method}/iter_{i}/policy")
    inputs = dict(
        policy_prev=f"{policy_dir(wildcards.method, i - 1)}/adapter",
        sft=SFT_ADAPTER,
        reward=f"{reward_dir(wildcards.method, i)}/adapter",
        train=data_path("train"),
        **base_inputs(),
    )
    if wildcards.method in ZO_METHODS and i >= 1:
        inputs["policy_prev2"] = f"{policy_dir(wildcards.method, i - 2)}/adapter"
        inputs["reward_prev"] = f"{reward_dir(wildcards.method, i - 1)}/adapter"
    return inputs


def collect_pairs_inputs(wildcards):
    i = _check_iteration(wildcards.i)
    if i >= LOOP_ITERATIONS - 1:
        raise ValueError(f"pairs {i} would refine reward model {i + 1}, past loop.iterations = {LOOP_ITERATIONS}")
    _check_owner(wildcards.method, i, f"results/{wildcards.method}/iter_{i}/pairs.parquet")
    return dict(
        policy=f"{policy_dir(wildcards.method, i)}/adapter",
        samples=f"{policy_dir(wildcards.method, i)}/samples.parquet",
        reward=f"{reward_dir(wildcards.method, i)}/adapter",
        **base_inputs(),
    )


def refine_reward_inputs(wildcards):
    i = _check_iteration(wildcards.i, first=1)
    _check_owner(wildcards.method, i - 1, f"results/{wildcards.method}/iter_{i}/reward")
    return dict(
        reward=f"{reward_dir(wildcards.method, i - 1)}/adapter",
        pairs=f"{iteration_dir(wildcards.method, i - 1)}/pairs.parquet",
        test=data_path("test"),
        **base_inputs(),
    )


def evaluate_iteration_inputs(wildcards):
    i = _check_iteration(wildcards.i)
    _check_owner(wildcards.method, i, f"results/{wildcards.method}/iter_{i}/evaluation.parquet")
    return dict(
        policy=f"{policy_dir(wildcards.method, i)}/adapter",
        sft=SFT_ADAPTER,
        reward=f"{reward_dir(wildcards.method, i)}/adapter",
        test=data_path("test"),
        sft_samples=SFT_SAMPLES,
        previous_samples=f"{iteration_dir(wildcards.method, i - 1)}/evaluation.parquet" if i > 0 else SFT_SAMPLES,
        **base_inputs(),
    )


def evaluation_inputs(method):
    """Named inputs of evaluation_table: the summaries (``sft``, ``iter_{i}``) and the samples
    (``sft_samples``, ``samples_{i}``; for the paired gains) of SFT and of every iteration."""
    inputs = dict(sft="results/sft/evaluation_summary.csv", sft_samples=SFT_SAMPLES)
    for i in range(LOOP_ITERATIONS):
        inputs[f"iter_{i}"] = f"{iteration_dir(method, i)}/evaluation_summary.csv"
        inputs[f"samples_{i}"] = f"{iteration_dir(method, i)}/evaluation.parquet"
    return inputs


def policy_benchmarks(wildcards):
    """The train_policy benchmark file of each iteration (wall time and memory in the table)."""
    return [
        f"results/benchmarks/train_policy/{chain_owner(wildcards.method, i)}_{i}.tsv" for i in range(LOOP_ITERATIONS)
    ]


# The multi-seed study (rules/study.smk)
STUDY_SEEDS = [int(s) for s in setting(config, "study.seeds")]


def study_dir(seed):
    """Working folder of ``seed``'s chain: ``results/study/seed_<s>``, or the main one (``""``) for the
    config's own seed, whose chain is the one under ``results/``."""
    return "" if int(seed) == int(config["seed"]) else f"results/study/seed_{int(seed)}/"


def study_runs():
    """``[seed, method]`` of every chain of the study, in the order of :func:`study_evaluations`."""
    return [[s, m] for s in STUDY_SEEDS for m in LOOP_METHODS]


def study_evaluations():
    """``evaluation.csv`` of every (seed, method) of the study: the main run's for the config's seed."""
    return [f"{study_dir(s)}results/{m}/evaluation.csv" for s, m in study_runs()]
