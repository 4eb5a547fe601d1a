from workflow.job import run_script

run_script(snakemake, "workflow.train.reward:run")  # noqa: F821
