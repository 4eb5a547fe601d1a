from workflow.job import run_script

run_script(snakemake, "workflow.evaluation.evaluate_policy:run")  # noqa: F821
