# The tiny base causal LM of the embedded task (only built when config model.name is null;
# every stage takes it through base_inputs() / base_model_param in common.smk).


rule base_model:
    input:
        train=data_path("train"),
    output:
        model=directory("results/base"),
    log:
        "logs/base_model/base_model.log",
    benchmark:
        "results/benchmarks/base_model/base_model.tsv"
    conda:
        "../envs/train.yaml"
    threads: 2
    resources:
        **train_resources(data_parallel=False),
    params:
        settings=settings("base_model", "model.max_length", "precision"),
        code=stage_code("workflow.models.base_model"),
    script:
        "../scripts/base_model.py"
