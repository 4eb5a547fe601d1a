# Trajectory plots, policy-reward interplay metrics and the comparison of methods
# (workflow/plots.py; the metrics are defined in workflow/interplay.py).
N_ITERATIONS = int(config["loop"]["iterations"])
PLOT_FILES = ["{name}.png", "{name}.html", "{name}.csv"]


wildcard_constraints:
    k=r"\d+",


def trajectory_inputs(method, k):
    """Snapshots folders of policy and reward iterations 0..k-1 of ``method``."""
    return dict(
        policy=[f"{policy_dir(method, i)}/snapshots" for i in range(int(k))],
        reward=[f"{reward_dir(method, i)}/snapshots" for i in range(int(k))],
    )


def plots_resources():
    return dict(mem_mb=2000, runtime=60)


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
    log:
        "logs/plot_trajectories/{method}.log",
    benchmark:
        "results/benchmarks/plot_trajectories/{method}.tsv"
    threads: 2
    resources:
        **plots_resources(),
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
    log:
        "logs/plot_trajectories_upto/{method}_{k}.log",
    benchmark:
        "results/benchmarks/plot_trajectories_upto/{method}_{k}.tsv"
    threads: 2
    resources:
        **plots_resources(),
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
    log:
        "logs/compare_methods/compare.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=15,
    script:
        "../scripts/compare_methods.py"
