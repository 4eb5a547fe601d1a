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
# refined per method. zorloo and zorloo_reference at i >= 1 also read policy i-2 (SFT for i = 1)
# and reward i-1, the two ends of their mu and v directions; their iteration 0 (first-order RLOO)
# and reward model 1 are rloo's (rules/common.smk, chain_owner). Evaluation: evaluate_iteration per
# policy (same prompts and sampling seeds as evaluate_policy's SFT row in rules/evaluate.smk),
# evaluation_table per method (workflow/evaluation/loop_eval.py: scores and paired gains over SFT, the
# iteration before and iteration 0).


rule train_policy:
    input:
        unpack(train_policy_inputs),
    output:
        adapter=directory("results/{method}/iter_{i}/policy/adapter"),
        snapshots=directory("results/{method}/iter_{i}/policy/snapshots"),
        metrics="results/{method}/iter_{i}/policy/metrics.csv",
        samples="results/{method}/iter_{i}/policy/samples.parquet",
    log:
        "logs/train_policy/{method}_{i}.log",
    benchmark:
        "results/benchmarks/train_policy/{method}_{i}.tsv"
    conda:
        "../envs/train.yaml"
    threads: 4
    resources:
        **train_resources(),
    params:
        processes=TRAIN_PROCESSES,
        base=base_model_param,
        settings=policy_settings,
        code=stage_code("workflow.train.policy"),
        # resumable state of a killed stage (not an output: it survives the kill; workflow/train/resume.py)
        checkpoints="results/{method}/iter_{i}/policy/checkpoints",
    script:
        "../scripts/train_policy.py"


rule collect_pairs:
    input:
        unpack(collect_pairs_inputs),
    output:
        pairs="results/{method}/iter_{i}/pairs.parquet",
    log:
        "logs/collect_pairs/{method}_{i}.log",
    benchmark:
        "results/benchmarks/collect_pairs/{method}_{i}.tsv"
    conda:
        "../envs/train.yaml"
    threads: 1  # forward passes only: the same numbers with 1 thread, and jobs run side by side
    resources:
        **train_resources(data_parallel=False),
    params:
        base=base_model_param,
        settings=settings(
            "loop.uncertain_fraction", "loop.pair_temperature", "judge", "model", "dataset.name", "precision"
        ),
        code=stage_code("workflow.judges.pairs"),
    script:
        "../scripts/collect_pairs.py"


rule refine_reward:
    input:
        unpack(refine_reward_inputs),
    output:
        adapter=directory("results/{method}/iter_{i}/reward/adapter"),
        snapshots=directory("results/{method}/iter_{i}/reward/snapshots"),
        metrics="results/{method}/iter_{i}/reward/metrics.csv",
    log:
        "logs/refine_reward/{method}_{i}.log",
    benchmark:
        "results/benchmarks/refine_reward/{method}_{i}.tsv"
    conda:
        "../envs/train.yaml"
    threads: 4
    resources:
        **train_resources(),
    params:
        processes=TRAIN_PROCESSES,
        base=base_model_param,
        settings=settings(
            "reward.refine_epochs",
            "reward.refine_learning_rate",
            "reward.batch_size",
            "reward.score_objective",
            "loop.keep_rm_close",
            "loop.keep_rm_alpha",
            "snapshots",
            *TRAIN_SETTINGS,
        ),
        code=stage_code("workflow.train.reward"),
    script:
        "../scripts/refine_reward.py"


rule evaluate_iteration:
    input:
        unpack(evaluate_iteration_inputs),
    output:
        samples="results/{method}/iter_{i}/evaluation.parquet",
        summary="results/{method}/iter_{i}/evaluation_summary.csv",
    log:
        "logs/evaluate_iteration/{method}_{i}.log",
    benchmark:
        "results/benchmarks/evaluate_iteration/{method}_{i}.tsv"
    conda:
        "../envs/train.yaml"
    threads: 1  # forward passes only: the same numbers with 1 thread, and jobs run side by side
    resources:
        **train_resources(data_parallel=False),
    params:
        base=base_model_param,
        settings=settings(*EVAL_SETTINGS, "judge"),
        code=stage_code("workflow.evaluation.loop_eval"),
    script:
        "../scripts/evaluate_iteration.py"


rule evaluation_table:
    input:
        unpack(lambda wc: evaluation_inputs(wc.method)),  # SFT's from rule evaluate_policy (rules/evaluate.smk)
    output:
        table=report(
            "results/{method}/evaluation.csv",
            caption="../report/evaluation.rst",
            category="Evaluation",
            labels={"method": "{method}"},
        ),
    log:
        "logs/evaluation_table/{method}.log",
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        benchmarks=policy_benchmarks,
        settings=settings(),
        code=stage_code("workflow.evaluation.loop_eval"),
    script:
        "../scripts/evaluation_table.py"
