# Input functions and constants of rules/loop.smk (kept apart: Snakemake lint wants rules and
# functions in separate files).
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
