from workflow.job import run_script

run_script(snakemake, "workflow.train.reward:run_refine")  # noqa: F821
