# Trajectory plots, policy-reward interplay metrics and the comparison of methods
# (workflow/plots.py; the metrics are defined in workflow/interplay.py).
wildcard_constraints:
    k=r"\d+",


rule plot_trajectories:
    input:
        unpack(lambda wc: trajectory_inputs(wc.method, N_ITERATIONS)),
    output:
        plots=report(
            directory("results/{method}/plots"),
            patterns=PLOT_FILES,
            caption="../report/trajectories.rst",
            category="Trajectories",
            subcategory="{method}",
        ),
    params:
        settings=settings("plots", "loop.keep_rm_alpha"),
        code=stage_code("workflow.plots"),
    log:
        "logs/plot_trajectories/{method}.log",
    benchmark:
        "results/benchmarks/plot_trajectories/{method}.tsv"
    threads: 2
    resources:
        **plots_resources(),
    conda:
        "../envs/plots.yaml"
    script:
        "../scripts/plot_trajectories.py"


rule plot_trajectories_upto:
    input:
        unpack(lambda wc: trajectory_inputs(wc.method, wc.k)),
    output:
        plots=report(
            directory("results/{method}/plots_upto_{k}"),
            patterns=PLOT_FILES,
            caption="../report/trajectories_upto.rst",
            category="Trajectories",
            subcategory="{method} (first {k} iterations)",
        ),
    params:
        settings=settings("plots", "loop.keep_rm_alpha"),
        code=stage_code("workflow.plots"),
    log:
        "logs/plot_trajectories_upto/{method}_{k}.log",
    benchmark:
        "results/benchmarks/plot_trajectories_upto/{method}_{k}.tsv"
    threads: 2
    resources:
        **plots_resources(),
    conda:
        "../envs/plots.yaml"
    script:
        "../scripts/plot_trajectories.py"


rule compare_methods:
    input:
        evaluation=expand("results/{method}/evaluation.csv", method=config["loop"]["methods"]),
        plots=expand("results/{method}/plots", method=config["loop"]["methods"]),
    output:
        plots=report(
            directory("results/compare/plots"),
            patterns=["{name}.png", "{name}.csv"],
            caption="../report/compare.rst",
            category="Comparison",
        ),
    params:
        methods=list(config["loop"]["methods"]),
        settings=settings(),
        code=stage_code("workflow.plots"),
    log:
        "logs/compare_methods/compare.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=15,
    conda:
        "../envs/plots.yaml"
    script:
        "../scripts/compare_methods.py"
