"""Settings that clash fail right after schema validation, before any job, naming the keys
(workflow/config_checks.py, called by the Snakefile)."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from smk import REPO, snakemake


def _config(**changes: dict) -> dict:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    for section, values in changes.items():
        config[section].update(values)
    return config


def _dry_run(tmp_path, config: dict, *args: str):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return snakemake(tmp_path, "results/sft/adapter", "-n", *args, "--configfile", str(path))


def _model_folder(path, config_json: bool = True, tokenizer: bool = True) -> str:
    path.mkdir()
    if config_json:
        (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    return str(path)


CLASHES = {
    "rule judge on hh-rlhf": (dict(dataset={"name": "hh-rlhf"}), ["judge.kind: rule", "dataset.name is 'hh-rlhf'"]),
    "llm judge without model": (dict(judge={"kind": "llm", "model": None}), ["judge.kind: llm needs judge.model"]),
    "a data file for the embedded dataset": (
        dict(dataset={"files": {"train": "rows.jsonl", "test": None}}),
        ["dataset.name: embedded generates its rows, so dataset.files.train would be ignored"],
    ),
    "reward-model judge without model": (
        dict(judge={"kind": "reward_model"}),
        ["judge.kind: reward_model needs judge.model"],
    ),
    "batch not a multiple of rloo_k": (
        dict(policy={"batch_size": 15, "rloo_k": 2}),
        ["policy.batch_size (15)", "policy.rloo_k (2)", "policy.batch_size: 16"],
    ),
    "kl_target without kl_coef": (
        dict(policy={"kl_target": 2.0, "kl_coef": 0.0}),
        ["policy.kl_target", "policy.kl_coef"],
    ),
}


@pytest.mark.parametrize("case", list(CLASHES))
def test_clashing_settings_fail_before_any_job(tmp_path, case):
    changes, messages = CLASHES[case]
    result = _dry_run(tmp_path, _config(**changes))
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "the configuration cannot run" in out
    for message in messages:
        assert message in out, out
    assert not re.search(r"^(local)?rule \w+:", out, flags=re.M), "a job was planned"


@pytest.mark.parametrize(
    "kind", ["missing", "no config.json", "no tokenizer", "a file", "truncated config.json", "config.json a list"]
)
def test_model_path_that_is_not_a_model_fails_naming_the_path(tmp_path, kind):
    target = tmp_path / "my-model"
    if kind == "no config.json":
        _model_folder(target, config_json=False)
    elif kind == "no tokenizer":
        _model_folder(target, tokenizer=False)
    elif kind == "a file":
        target.write_text("not a model")
    elif kind in ("truncated config.json", "config.json a list"):
        _model_folder(target)
        (target / "config.json").write_text('{"model_type": "lla' if kind.startswith("truncated") else "[]")
    result = _dry_run(tmp_path, _config(model={"name": str(target)}))
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"model.name: '{target}'" in out, out
    expected = {
        "missing": "does not exist",
        "no config.json": "no config.json",
        "no tokenizer": "no tokenizer",
        "a file": "is a file",
        "truncated config.json": "has a damaged config.json (Unterminated string",
        "config.json a list": "has a damaged config.json (a JSON list, not a model config)",
    }[kind]
    assert expected in out


def test_missing_judge_model_folder_fails(tmp_path):
    result = _dry_run(tmp_path, _config(judge={"kind": "reward_model", "model": "./judges/rm"}))
    assert result.returncode != 0
    assert "judge.model: './judges/rm' does not exist" in result.stdout + result.stderr


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "LlamaForSequenceClassification"])
def test_reward_model_judge_must_be_a_sequence_classifier(tmp_path, architecture):
    """A chat model as the reward-model judge would score with a randomly initialised head."""
    (tmp_path / "judges").mkdir()
    _model_folder(tmp_path / "judges" / "rm")
    (tmp_path / "judges" / "rm" / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    result = _dry_run(tmp_path, _config(judge={"kind": "reward_model", "model": "judges/rm"}))
    out = result.stdout + result.stderr
    if architecture == "LlamaForCausalLM":
        assert result.returncode != 0 and "judge.model: 'judges/rm' is not a reward model" in out
        assert "LlamaForCausalLM" in out
    else:
        assert result.returncode == 0, out


@pytest.mark.parametrize("name", ["meta-llama/Llama-3.2-1B", "gpt2", "local"])
def test_hub_ids_and_model_folders_pass(tmp_path, name):
    if name == "local":
        name = "models/base"  # relative to the working directory, as the jobs read it
        (tmp_path / "models").mkdir()
        _model_folder(tmp_path / name)
    result = _dry_run(tmp_path, _config(model={"name": name}))
    assert result.returncode == 0, result.stdout + result.stderr


def test_home_in_a_path_setting_is_expanded_for_the_checks_and_the_jobs(tmp_path, monkeypatch):
    from workflow.config_checks import expand_home

    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    _model_folder(home / "models" / "base")
    monkeypatch.setenv("HOME", str(home))
    config = _config(model={"name": "~/models/base"}, dataset={"files": {"train": "~/rows.jsonl", "test": None}})
    expand_home(config)
    assert config["model"]["name"] == str(home / "models" / "base")
    assert config["dataset"]["files"] == {"train": str(home / "rows.jsonl"), "test": None}
    assert config["dataset"]["source"] == _config()["dataset"]["source"]  # no ~: as it was
    # the data files are the extraction's inputs: Snakemake finds them under the home folder
    for split in ("train", "test"):
        (home / f"{split}.jsonl").write_text("{}\n")
    files = {"files": {"train": "~/train.jsonl", "test": "~/test.jsonl"}, "name": "hh-rlhf"}
    config = _config(model={"name": "~/models/base"}, dataset=files, loop={"iterations": 1})
    result = _dry_run(tmp_path, config)
    assert result.returncode == 0, result.stdout + result.stderr


def test_one_iteration_needs_no_judge(tmp_path):
    result = _dry_run(tmp_path, _config(dataset={"name": "hh-rlhf"}, loop={"iterations": 1}))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_real_run_with_a_clash_writes_nothing(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_config(policy={"batch_size": 15})))
    result = snakemake(tmp_path, "results/data/embedded/train.parquet", "--cores", "1", "--configfile", str(path))
    assert result.returncode != 0 and "policy.batch_size (15)" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()
