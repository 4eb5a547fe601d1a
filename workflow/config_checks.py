"""Settings that clash, checked by the Snakefile right after schema validation, before any job.

The schema checks each key alone; :func:`check_config` checks keys against each other and against
the disk, so that a configuration that would fail after hours of training fails before the first
job, with a message that names the keys and says what to do. Relative paths are read from the
working directory (``snakemake -d``), as the jobs read them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# A hub id: `name` or `org/name`; anything else that does not exist on disk is a missing local path.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# the settings that may name a local file or folder, else a hub id (seed_config makes the relative
# ones absolute for a study's nested runs; a relative value that names no file, a hub id, stays)
PATH_KEYS = (
    ("model", "name"),
    ("judge", "model"),
    ("dataset", "source"),
    ("dataset", "files", "train"),
    ("dataset", "files", "test"),
)


class ConfigError(ValueError):
    """Settings that cannot run together."""


def path_settings(config: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str, str]]:
    """``(section, key, value)`` of every :data:`PATH_KEYS` setting of ``config`` that holds a string."""
    for keys in PATH_KEYS:
        parent = config
        for key in keys[:-1]:
            parent = parent.get(key) if isinstance(parent.get(key), dict) else {}
        value = parent.get(keys[-1])
        if isinstance(value, str):
            yield parent, keys[-1], value


def expand_home(config: dict[str, Any]) -> None:
    """Expand a leading ``~`` of every path setting in place (the Snakefile, before the checks), so
    that the checks, the rules' inputs and the jobs all read the same path."""
    for parent, key, value in path_settings(config):
        if value.startswith("~"):
            parent[key] = os.path.expanduser(value)


def model_problem(key: str, name: str) -> str | None:
    """Why ``name`` (the value of config ``key``) cannot be loaded as a model, or None.

    A hub id passes; a local folder must hold ``config.json`` and a tokenizer (``save_pretrained``).
    """
    path = Path(name)  # a leading ~ is expanded before the checks (expand_home)
    if not path.exists():
        if HUB_ID.match(name):
            return None
        return f"{key}: {name!r} does not exist (and is not a hub id such as org/name); fix the path"
    if not path.is_dir():
        return f"{key}: {name!r} is a file; point it at the model's folder (a save_pretrained output)"
    if not (path / "config.json").is_file():
        return (
            f"{key}: {name!r} has no config.json, so it is not a saved model; point it at the folder "
            "that save_pretrained wrote (config.json, weights and tokenizer files)"
        )
    try:
        model_config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        model_config = err
    if not isinstance(model_config, dict):
        detail = model_config if isinstance(model_config, Exception) else f"a JSON {type(model_config).__name__}"
        return f"{key}: {name!r} has a damaged config.json ({detail}, not a model config); save the model again"
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return (
            f"{key}: {name!r} has no tokenizer ({', '.join(TOKENIZER_FILES)}); save the tokenizer "
            "into the model folder (tokenizer.save_pretrained)"
        )
    return None


def reward_model_problem(key: str, name: str, architectures: list[str] | None) -> str | None:
    """Why the model ``name`` with ``config.json`` ``architectures`` is not a reward model (a
    sequence classifier, whose trained ``score`` head gives the reward), or None."""
    if any(a.endswith("ForSequenceClassification") for a in architectures or []):
        return None
    return (
        f"{key}: {name!r} is not a reward model (its config.json names {architectures or 'no architecture'}, "
        "not a ...ForSequenceClassification): loaded as one it would score with a random head; use "
        "judge.kind llm for a chat model"
    )


def judge_problems(config: dict[str, Any]) -> list[str]:
    """Problems of the ``judge`` section (it judges the pairs of iterations 0..loop.iterations-2)."""
    if int(config["loop"]["iterations"]) < 2:
        return []  # one iteration collects no pairs: no judge runs
    judge, dataset = config["judge"], config["dataset"]["name"]
    kind, model = judge["kind"], judge.get("model")
    if kind == "rule":
        if dataset != "embedded":
            return [
                f"judge.kind: rule is the embedded task's gold function, but dataset.name is {dataset!r}; "
                "set judge.kind to llm or reward_model and judge.model to the judge's hub id or folder "
                "(or loop.iterations: 1, which judges no pairs)"
            ]
        return []
    if not model:
        return [
            f"judge.kind: {kind} needs judge.model (a hub id or local folder of the judge model), "
            "which is null; set judge.model"
        ]
    problem = model_problem("judge.model", str(model))
    local = Path(str(model)) / "config.json"
    if problem is None and kind == "reward_model" and local.is_file():  # a hub id is checked when it loads
        problem = reward_model_problem("judge.model", str(model), json.loads(local.read_text()).get("architectures"))
    return [problem] if problem else []


def dataset_problems(config: dict[str, Any]) -> list[str]:
    """A data source given for the ``embedded`` dataset, which generates its rows and would ignore it."""
    dataset = config["dataset"]
    if dataset["name"] != "embedded":
        return []
    given = ["dataset.source"] if dataset.get("source") else []
    given += [f"dataset.files.{split}" for split, path in (dataset.get("files") or {}).items() if path]
    if not given:
        return []
    return [
        f"dataset.name: embedded generates its rows, so {' and '.join(given)} would be ignored; set "
        "dataset.name to the dataset the data holds (hh-rlhf, pku-saferlhf, ...), or remove "
        f"{' and '.join(given)}"
    ]


def policy_problems(config: dict[str, Any]) -> list[str]:
    """Problems of the ``policy`` section that trl or the stage would only raise while training."""
    policy = config["policy"]
    problems = []
    batch, k = int(policy["batch_size"]), int(policy["rloo_k"])
    if batch % k:
        problems.append(
            f"policy.batch_size ({batch}) must be a multiple of policy.rloo_k ({k}): every batch holds "
            f"whole groups of rloo_k samples per prompt; e.g. policy.batch_size: {k * max(1, round(batch / k))}"
        )
    if policy.get("kl_target") is not None:
        if float(policy["kl_coef"]) <= 0:
            problems.append(
                "policy.kl_target is set, so the adaptive KL coefficient needs a positive start: "
                "policy.kl_coef is 0; set policy.kl_coef > 0 or policy.kl_target: null"
            )
        if policy.get("ppo_kl_coef") is not None and float(policy["ppo_kl_coef"]) <= 0:
            problems.append(
                "policy.kl_target is set, so ppo's adaptive KL coefficient needs a positive start: "
                "policy.ppo_kl_coef is 0; set it > 0 (or null: policy.kl_coef) or policy.kl_target: null"
            )
    return problems


def check_config(config: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` listing every clash in the (schema-valid) ``config``."""
    problems = []
    if config["model"].get("name"):
        problem = model_problem("model.name", str(config["model"]["name"]))
        problems += [problem] if problem else []
    problems += dataset_problems(config)
    problems += judge_problems(config)
    problems += policy_problems(config)
    if problems:
        raise ConfigError("the configuration cannot run (nothing was started):\n  - " + "\n  - ".join(problems))
