# Multi-seed study (README, "Multi-seed study"; workflow/evaluation/study.py): the loop of every method of
# loop.methods on every seed of study.seeds, each seed's chain in its own folder:
#
#   the config's own seed --> the main chain under results/ (results/{method}/evaluation.csv)
#   any other seed s -------> study_seed: a nested Snakemake run of this workflow in results/study/seed_{s}
#                             (data, base model, SFT, reward model 0, loop, evaluations; config + seed: s)
#   every chain ------------> study_summary -> results/study/summary.{csv,png}
#
# A finished seed is reused: adding a seed to study.seeds runs only that seed's chain (study is not
# among any stage's settings). A change to the config (but study, seed, cache_dir, tracking and the
# resources other than the training stages' process count) or to the workflow's code reruns each
# seed's nested run, which redoes only what the change affects.


rule study_seed:
    output:
        evaluation=expand("results/study/seed_{{seed}}/results/{method}/evaluation.csv", method=LOOP_METHODS),
    log:
        "logs/study_seed/{seed}.log",
    benchmark:
        "results/benchmarks/study_seed/{seed}.tsv"
    conda:
        "../envs/study.yaml"  # the whole stack: the nested run's jobs run in it too (no --sdm conda inside)
    threads: 8  # capped to --cores on a laptop; the nested run uses what the job gets
    resources:
        **nested_run_resources(),
    params:
        workdir=lambda wc: f"results/study/seed_{wc.seed}",
        snakefile=os.path.join(workflow.basedir, "Snakefile"),
        settings=nested_run_settings(config),
        processes=TRAIN_PROCESSES,  # of the nested run's training stages, which it reruns
        code=workflow_hash(workflow.basedir),
    script:
        "../scripts/study_seed.py"


rule study_summary:
    input:
        evaluation=study_evaluations(),
    output:
        table="results/study/summary.csv",
        figure=report("results/study/summary.png", caption="../report/study.rst", category="Study"),
    log:
        "logs/study_summary/summary.log",
    conda:
        "../envs/plots.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        runs=study_runs(),
        settings=settings(),
        code=stage_code("workflow.evaluation.study"),
    script:
        "../scripts/study_summary.py"
