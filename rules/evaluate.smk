# Evaluation of the SFT policy and of the untrained base model on the first
# evaluation.n_prompts held-out test prompts: sampled answers scored by the gold judge
# (embedded task) and by reward model 0. One row per sample + a summary with standard errors.
# workflow.evaluation.evaluate_policy.run takes named inputs test, reward and (optional) adapter: any rule with
# those inputs and outputs samples/summary can reuse scripts/evaluate_policy.py.


rule evaluate_policy:
    input:
        **base_inputs(),
        adapter="results/sft/adapter",
        reward="results/reward/iter_0/adapter",
        test=data_path("test"),
    output:
        samples="results/sft/evaluation.parquet",
        summary=report(
            "results/sft/evaluation_summary.csv",
            caption="../report/training.rst",
            category="Training",
            labels={"stage": "SFT", "file": "evaluation"},
        ),
    log:
        "logs/evaluate_policy/sft.log",
    benchmark:
        "results/benchmarks/evaluate_policy/sft.tsv"
    conda:
        "../envs/train.yaml"
    threads: 1  # forward passes only: the same numbers with 1 thread, and jobs run side by side
    resources:
        **train_resources(data_parallel=False),
    params:
        base=base_model_param,
        settings=settings(*EVAL_SETTINGS),
        code=stage_code("workflow.evaluation.evaluate_policy"),
    script:
        "../scripts/evaluate_policy.py"


rule evaluate_base:
    input:
        **base_inputs(),
        reward="results/reward/iter_0/adapter",
        test=data_path("test"),
    output:
        samples="results/base_eval/evaluation.parquet",
        summary="results/base_eval/evaluation_summary.csv",
    log:
        "logs/evaluate_base/base.log",
    benchmark:
        "results/benchmarks/evaluate_base/base.tsv"
    conda:
        "../envs/train.yaml"
    threads: 1  # forward passes only: the same numbers with 1 thread, and jobs run side by side
    resources:
        **train_resources(data_parallel=False),
    params:
        base=base_model_param,
        settings=settings(*EVAL_SETTINGS),
        code=stage_code("workflow.evaluation.evaluate_policy"),
    script:
        "../scripts/evaluate_policy.py"
