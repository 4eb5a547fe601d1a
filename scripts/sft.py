from workflow.job import run_script

run_script(snakemake, "workflow.train.sft:run")  # noqa: F821
