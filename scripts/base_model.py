from workflow.job import run_script

run_script(snakemake, "workflow.models.base_model:run")  # noqa: F821
