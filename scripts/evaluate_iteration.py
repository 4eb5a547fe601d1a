from workflow.job import run_script

run_script(snakemake, "workflow.loop_eval:run")  # noqa: F821
