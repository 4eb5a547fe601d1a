from workflow.job import run_script

run_script(snakemake, "workflow.judges.pairs:run")  # noqa: F821
