from workflow.job import run_script

run_script(snakemake, "workflow.data.extract:run")  # noqa: F821
