# Preference rows of a dataset split (workflow/extract.py): results/data/{dataset}/{split}.parquet.
# The `dataset:` config section applies to the configured dataset only; any other {dataset}
# wildcard reads that dataset's default hub id (the embedded one is generated offline).


def _dataset_option(wildcards, key):
    """``dataset.<key>`` when ``wildcards.dataset`` is the configured dataset, else None."""
    section = config.get("dataset") or {}
    return section.get(key) if wildcards.dataset == section.get("name") else None


def _split_file(wildcards):
    """The local file configured for this split (``dataset.files.<split>``), or None."""
    return (_dataset_option(wildcards, "files") or {}).get(wildcards.split)


def _extract_inputs(wildcards):
    """The split's local file as a named input, so that changing the file reruns the extraction."""
    path = _split_file(wildcards)
    return {"file": path} if path else {}


def _embedded_rows(wildcards):
    if wildcards.dataset != "embedded":
        return None
    return (config.get("embedded") or {}).get(f"{wildcards.split}_rows")


rule extract_dataset:
    input:
        unpack(_extract_inputs),
    output:
        rows="results/data/{dataset}/{split}.parquet",
    params:
        source=lambda wc: _dataset_option(wc, "source"),
        file=_split_file,
        hub_config=lambda wc: _dataset_option(wc, "hub_config"),
        max_rows=lambda wc: _dataset_option(wc, "max_rows"),
        embedded_rows=_embedded_rows,
    log:
        "logs/extract_dataset/{dataset}_{split}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    script:
        "../scripts/extract_dataset.py"
