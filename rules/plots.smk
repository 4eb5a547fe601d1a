# Trajectory plots, policy-reward interplay metrics and the comparison of methods
# (workflow/analysis/plots.py; the metrics are defined in workflow/analysis/interplay.py).
rule plot_trajectories:
    input:
        unpack(lambda wc: trajectory_inputs(wc.method, LOOP_ITERATIONS)),
    output:
        plots=report(
            directory("results/{method}/plots"),
            patterns=REPORT_PLOT_FILES,
            caption="../report/trajectories.rst",
            category="Trajectories",
            subcategory="{method}",
            labels={"method": "{method}", "file": "{name}"},
        ),
    log:
        "logs/plot_trajectories/{method}.log",
    benchmark:
        "results/benchmarks/plot_trajectories/{method}.tsv"
    conda:
        "../envs/plots.yaml"
    threads: 1  # light (projections, figures): runs beside another job
    resources:
        **plots_resources(),
    params:
        settings=settings("plots", "loop.keep_rm_alpha"),
        code=stage_code("workflow.analysis.plots"),
    script:
        "../scripts/plot_trajectories.py"


rule plot_trajectories_upto:
    input:
        unpack(lambda wc: trajectory_inputs(wc.method, wc.k)),
    output:
        plots=report(
            directory("results/{method}/plots_upto_{k}"),
            patterns=REPORT_PLOT_FILES,
            caption="../report/trajectories_upto.rst",
            category="Trajectories",
            subcategory="{method} (first {k} iterations)",
            labels={"method": "{method}", "file": "{name}"},
        ),
    log:
        "logs/plot_trajectories_upto/{method}_{k}.log",
    benchmark:
        "results/benchmarks/plot_trajectories_upto/{method}_{k}.tsv"
    conda:
        "../envs/plots.yaml"
    threads: 1  # light (projections, figures): runs beside another job
    resources:
        **plots_resources(),
    params:
        settings=settings("plots", "loop.keep_rm_alpha"),
        code=stage_code("workflow.analysis.plots"),
    script:
        "../scripts/plot_trajectories.py"


rule compare_methods:
    input:
        evaluation=expand("results/{method}/evaluation.csv", method=LOOP_METHODS),
        plots=expand("results/{method}/plots", method=LOOP_METHODS),
    output:
        plots=report(
            directory("results/compare/plots"),
            patterns=REPORT_PLOT_FILES,
            caption="../report/compare.rst",
            category="Comparison",
            labels={"file": "{name}"},
        ),
    log:
        "logs/compare_methods/compare.log",
    conda:
        "../envs/plots.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=15,
    params:
        methods=LOOP_METHODS,
        settings=settings(),
        code=stage_code("workflow.evaluation.compare"),
    script:
        "../scripts/compare_methods.py"
