from workflow.job import run_script

run_script(snakemake, "workflow.analysis.plots:run")  # noqa: F821
