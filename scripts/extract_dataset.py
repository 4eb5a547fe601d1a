from workflow.job import run_script

run_script(snakemake, "workflow.extract:run")  # noqa: F821
