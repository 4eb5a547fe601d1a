from workflow.job import run_script

run_script(snakemake, "workflow.pairs:run")  # noqa: F821
