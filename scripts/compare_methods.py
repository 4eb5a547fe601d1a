from workflow.job import run_script

run_script(snakemake, "workflow.evaluation.compare:run")  # noqa: F821
