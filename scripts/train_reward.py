from workflow.job import run_script

run_script(snakemake, "workflow.reward:run")  # noqa: F821
