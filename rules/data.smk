# Preference rows of a dataset split (workflow/data/extract.py): results/data/{dataset}/{split}.parquet.
# The `dataset:` config section applies to the configured dataset only; any other {dataset}
# wildcard reads that dataset's default hub id (the embedded one is generated offline).


rule extract_dataset:
    input:
        unpack(_extract_inputs),
    output:
        rows="results/data/{dataset}/{split}.parquet",
    log:
        "logs/extract_dataset/{dataset}_{split}.log",
    conda:
        "../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        source=lambda wc: _dataset_option(wc, "source"),
        hub_config=lambda wc: _dataset_option(wc, "hub_config"),
        max_rows=lambda wc: _dataset_option(wc, "max_rows"),
        embedded_rows=_embedded_rows,
        settings=settings(),
        code=stage_code("workflow.data.extract"),
    script:
        "../scripts/extract_dataset.py"
