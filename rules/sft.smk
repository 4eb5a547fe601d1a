# Supervised fine-tuning: a LoRA adapter on the base causal LM trained on prompt + chosen
# (loss on the answer tokens only). Stage folder results/sft (docs/design.md).


rule sft:
    input:
        **base_inputs(),
        train=data_path("train"),
    output:
        adapter=directory("results/sft/adapter"),
        snapshots=directory("results/sft/snapshots"),
        metrics=report(
            "results/sft/metrics.csv",
            caption="../report/training.rst",
            category="Training",
            labels={"stage": "SFT", "file": "training metrics"},
        ),
    log:
        "logs/sft/sft.log",
    benchmark:
        "results/benchmarks/sft/sft.tsv"
    conda:
        "../envs/train.yaml"
    threads: 4
    resources:
        **train_resources(),
    params:
        processes=TRAIN_PROCESSES,
        base=base_model_param,
        settings=settings("sft", "lora", "snapshots", *TRAIN_SETTINGS),
        code=stage_code("workflow.train.sft"),
    script:
        "../scripts/sft.py"
