from workflow.job import run_script

run_script(snakemake, "workflow.evaluation.loop_eval:run_table")  # noqa: F821
