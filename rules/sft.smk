# Supervised fine-tuning: a LoRA adapter on the base causal LM trained on prompt + chosen
# (loss on the answer tokens only). Stage folder results/sft (docs/design.md).


rule sft:
    input:
        train=data_path("train"),
        **base_inputs(),
    output:
        adapter=directory("results/sft/adapter"),
        snapshots=directory("results/sft/snapshots"),
        metrics="results/sft/metrics.csv",
    params:
        base=base_model_param,
        settings=settings("sft", "lora", "snapshots", *MODEL_SETTINGS),
        code=stage_code("workflow.sft"),
    log:
        "logs/sft/sft.log",
    benchmark:
        "results/benchmarks/sft/sft.tsv"
    threads: 4
    resources:
        **train_resources(),
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/train_sft.py"
