# The tiny base causal LM of the embedded task (only built when config model.name is null;
# every stage takes it through base_inputs() / base_model_param in common.smk).


rule base_model:
    input:
        train=data_path("train"),
    output:
        model=directory("results/base"),
    params:
        settings=settings("base_model", "model.max_length", "precision"),
        code=stage_code("workflow.base_model"),
    log:
        "logs/base_model/base_model.log",
    benchmark:
        "results/benchmarks/base_model/base_model.tsv"
    threads: 2
    resources:
        **train_resources(),
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/build_base_model.py"
