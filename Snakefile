# ZOPrO workflow: preference optimisation of language models with zeroth-order methods.
# Quick start:  snakemake --cores all results/zorloo/plots
import os

from snakemake.utils import min_version

min_version("9.0")

# Make the `workflow/` package importable by scripts and by accelerate-launched workers.
os.environ.update(PYTHONPATH=os.pathsep.join(p for p in (workflow.basedir, os.environ.get("PYTHONPATH")) if p))


configfile: os.path.join(workflow.basedir, "config.yaml")


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/base.smk"
include: "rules/sft.smk"
include: "rules/reward.smk"
include: "rules/evaluate.smk"
include: "rules/loop.smk"
include: "rules/plots.smk"
include: "rules/study.smk"


# Light jobs run in the Snakemake process itself, never as cluster jobs (extraction may also need
# the hub, which login nodes often reach and compute nodes do not).
localrules:
    extract_dataset,
    evaluation_table,
    compare_methods,
    study_summary,


rule all:
    input:
        data_path("train"),
        data_path("test"),
        "results/reward/iter_0/metrics.csv",
        "results/sft/evaluation.parquet",
        "results/base_eval/evaluation_summary.csv",
        expand("results/{m}/evaluation.csv", m=LOOP_METHODS),
        "results/compare/plots",
