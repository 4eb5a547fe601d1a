# Input functions and constants of rules/study.smk (kept apart: Snakemake lint wants rules and
# functions in separate files).
STUDY_SEEDS = [int(s) for s in setting(config, "study.seeds")]
STUDY_METHODS = list(config["loop"]["methods"])


def study_dir(seed):
    """Working folder of ``seed``'s chain: ``results/study/seed_<s>``, or the main one (``""``) for the
    config's own seed, whose chain is the one under ``results/``."""
    return "" if int(seed) == int(config["seed"]) else f"results/study/seed_{int(seed)}/"


def study_runs():
    """``[seed, method]`` of every chain of the study, in the order of :func:`study_evaluations`."""
    return [[s, m] for s in STUDY_SEEDS for m in STUDY_METHODS]


def study_evaluations():
    """``evaluation.csv`` of every (seed, method) of the study: the main run's for the config's seed."""
    return [f"{study_dir(s)}results/{m}/evaluation.csv" for s, m in study_runs()]
