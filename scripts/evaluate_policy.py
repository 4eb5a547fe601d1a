from workflow.job import run_script

run_script(snakemake, "workflow.evaluate:run")  # noqa: F821
