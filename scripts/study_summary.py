from workflow.job import run_script

run_script(snakemake, "workflow.study:summarise")  # noqa: F821
