from workflow.job import run_script

run_script(snakemake, "workflow.train.policy:run")  # noqa: F821
