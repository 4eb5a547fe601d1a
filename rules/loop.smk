# The RLHF loop, one rule instance per (method, iteration), chained by files:
#
#   policy i-1 (SFT for i = 0) --+
#   reward i ---------------------+--> train_policy  -> results/{method}/iter_{i}/policy/{adapter,snapshots,metrics.csv,samples.parquet}
#                                                           |
#   reward i + policy i samples ---> collect_pairs   -> results/{method}/iter_{i}/pairs.parquet
#                                                           |
#   reward i + pairs i -----------> refine_reward    -> results/{method}/iter_{i+1}/reward/{adapter,snapshots,metrics.csv}
#
# Reward model 0 is shared (results/reward/iter_0, rules/reward.smk); reward models 1..N-1 are
# refined per method. zorloo at i >= 1 also reads policy i-2 (SFT for i = 1) and reward i-1, the
# two ends of its mu and v directions. Evaluation: evaluate_iteration per policy (same prompts, seed
# and scorer as evaluate_policy's SFT row in rules/evaluate.smk), evaluation_table per method
# (workflow/loop_eval.py).
LOOP_ITERATIONS = int(config["loop"]["iterations"])
SFT_ADAPTER = "results/sft/adapter"


def _check_iteration(i, first=0):
    i = int(i)
    if not first <= i < LOOP_ITERATIONS:
        raise ValueError(
            f"iteration {i} is outside the loop: policies 0..{LOOP_ITERATIONS - 1} and reward models "
            f"1..{LOOP_ITERATIONS - 1} are trained (loop.iterations = {LOOP_ITERATIONS})"
        )
    return i


def _train_data():
    return {"train": data_path("train"), **({"base": base_model_input()} if base_model_input() else {})}


def train_policy_inputs(wildcards):
    i = _check_iteration(wildcards.i)
    inputs = dict(
        prev_policy=f"{policy_dir(wildcards.method, i - 1)}/adapter",
        sft=SFT_ADAPTER,
        reward=f"{reward_dir(wildcards.method, i)}/adapter",
        **_train_data(),
    )
    if wildcards.method == "zorloo" and i >= 1:
        inputs["policy_prev2"] = f"{policy_dir(wildcards.method, i - 2)}/adapter"
        inputs["reward_prev"] = f"{reward_dir(wildcards.method, i - 1)}/adapter"
    return inputs


rule train_policy:
    input:
        unpack(train_policy_inputs),
    output:
        adapter=directory("results/{method}/iter_{i}/policy/adapter"),
        snapshots=directory("results/{method}/iter_{i}/policy/snapshots"),
        metrics="results/{method}/iter_{i}/policy/metrics.csv",
        samples="results/{method}/iter_{i}/policy/samples.parquet",
    params:
        base=base_model_path(),
    log:
        "logs/train_policy/{method}_{i}.log",
    benchmark:
        "results/benchmarks/train_policy/{method}_{i}.tsv"
    threads: 4
    resources:
        **train_resources(),
    script:
        "../scripts/train_policy.py"


def collect_pairs_inputs(wildcards):
    i = _check_iteration(wildcards.i)
    if i >= LOOP_ITERATIONS - 1:
        raise ValueError(f"pairs {i} would refine reward model {i + 1}, past loop.iterations = {LOOP_ITERATIONS}")
    return dict(
        policy=f"{policy_dir(wildcards.method, i)}/adapter",
        samples=f"{policy_dir(wildcards.method, i)}/samples.parquet",
        reward=f"{reward_dir(wildcards.method, i)}/adapter",
        **({"base": base_model_input()} if base_model_input() else {}),
    )


rule collect_pairs:
    input:
        unpack(collect_pairs_inputs),
    output:
        pairs="results/{method}/iter_{i}/pairs.parquet",
    params:
        base=base_model_path(),
    log:
        "logs/collect_pairs/{method}_{i}.log",
    benchmark:
        "results/benchmarks/collect_pairs/{method}_{i}.tsv"
    threads: 4
    resources:
        **train_resources(),
    script:
        "../scripts/collect_pairs.py"


def refine_reward_inputs(wildcards):
    i = _check_iteration(wildcards.i, first=1)
    return dict(
        reward=f"{reward_dir(wildcards.method, i - 1)}/adapter",
        pairs=f"results/{wildcards.method}/iter_{i - 1}/pairs.parquet",
        test=data_path("test"),
        **({"base": base_model_input()} if base_model_input() else {}),
    )


rule refine_reward:
    input:
        unpack(refine_reward_inputs),
    output:
        adapter=directory("results/{method}/iter_{i}/reward/adapter"),
        snapshots=directory("results/{method}/iter_{i}/reward/snapshots"),
        metrics="results/{method}/iter_{i}/reward/metrics.csv",
    params:
        base=base_model_path(),
    log:
        "logs/refine_reward/{method}_{i}.log",
    benchmark:
        "results/benchmarks/refine_reward/{method}_{i}.tsv"
    threads: 4
    resources:
        **train_resources(),
    script:
        "../scripts/refine_reward.py"


def evaluate_iteration_inputs(wildcards):
    i = _check_iteration(wildcards.i)
    return dict(
        policy=f"{policy_dir(wildcards.method, i)}/adapter",
        sft=SFT_ADAPTER,
        reward=f"{reward_dir(wildcards.method, i)}/adapter",
        test=data_path("test"),
        **({"base": base_model_input()} if base_model_input() else {}),
    )


rule evaluate_iteration:
    input:
        unpack(evaluate_iteration_inputs),
    output:
        samples="results/{method}/iter_{i}/evaluation.parquet",
        summary="results/{method}/iter_{i}/evaluation_summary.csv",
    params:
        base=base_model_path(),
        iteration=lambda wc: int(wc.i),
    log:
        "logs/evaluate_iteration/{method}_{i}.log",
    benchmark:
        "results/benchmarks/evaluate_iteration/{method}_{i}.tsv"
    threads: 4
    resources:
        **train_resources(),
    script:
        "../scripts/evaluate_iteration.py"


rule evaluation_table:
    input:
        sft="results/sft/evaluation_summary.csv",  # rule evaluate_policy (rules/evaluate.smk)
        **{f"iter_{i}": f"results/{{method}}/iter_{i}/evaluation_summary.csv" for i in range(LOOP_ITERATIONS)},
    output:
        table="results/{method}/evaluation.csv",
    params:
        benchmarks=lambda wc: [f"results/benchmarks/train_policy/{wc.method}_{i}.tsv" for i in range(LOOP_ITERATIONS)],
    log:
        "logs/evaluation_table/{method}.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../scripts/evaluation_table.py"
