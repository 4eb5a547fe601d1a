from workflow.job import run_script

run_script(snakemake, "workflow.evaluation.study:summarise")  # noqa: F821
