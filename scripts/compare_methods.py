from workflow.job import run_script

run_script(snakemake, "workflow.compare:run")  # noqa: F821
