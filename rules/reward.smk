# Reward model of iteration 0: a LoRA sequence-classification head on the base model,
# Bradley-Terry on chosen vs rejected (score regression for rows with a `score`, e.g. MT).
# Held-out pairwise accuracy on the test split is in metrics.csv (heldout_accuracy).
# Reward models 1..N-1 are refined per method in rules/loop.smk (workflow.train.reward.train_reward).


rule reward_initial:
    input:
        **base_inputs(),
        train=data_path("train"),
        test=data_path("test"),
    output:
        adapter=directory("results/reward/iter_0/adapter"),
        snapshots=directory("results/reward/iter_0/snapshots"),
        metrics=report(
            "results/reward/iter_0/metrics.csv",
            caption="../report/training.rst",
            category="Training",
            labels={"stage": "reward model 0", "file": "training metrics"},
        ),
    log:
        "logs/reward_initial/iter_0.log",
    benchmark:
        "results/benchmarks/reward_initial/iter_0.tsv"
    conda:
        "../envs/train.yaml"
    threads: 4
    resources:
        **train_resources(),
    params:
        processes=TRAIN_PROCESSES,
        base=base_model_param,
        settings=settings(
            "reward.epochs",
            "reward.learning_rate",
            "reward.batch_size",
            "reward.score_objective",
            "lora",
            "snapshots",
            *TRAIN_SETTINGS,
        ),
        code=stage_code("workflow.train.reward"),
    script:
        "../scripts/reward_initial.py"
