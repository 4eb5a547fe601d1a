from workflow.job import run_script

run_script(snakemake, "workflow.plots:compare")  # noqa: F821
