from workflow.job import run_script

run_script(snakemake, "workflow.pairs:run_refine")  # noqa: F821
