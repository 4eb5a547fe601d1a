from workflow.evaluation.study import run_seed_script

run_seed_script(snakemake)  # noqa: F821
