from workflow.job import run_script

run_script(snakemake, "workflow.policy:run")  # noqa: F821
