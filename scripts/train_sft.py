from workflow.job import run_script

run_script(snakemake, "workflow.sft:run")  # noqa: F821
