"""What every job sets up before its stage runs (workflow/runtime.py, workflow/job.py): Hugging Face
caches (config ``cache_dir``), experiment tracking (``tracking``) and the filtered warnings."""
from __future__ import annotations

import os

import pytest
import yaml

from smk import REPO, snakemake
from workflow import runtime

HF_VARIABLES = ("HF_HOME", "HF_DATASETS_CACHE", "HF_TOKEN_PATH", "XDG_CACHE_HOME")


@pytest.fixture
def clean_hf_env(monkeypatch, tmp_path):
    """No Hugging Face variable set, and a home of our own."""
    for name in HF_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def test_cache_dir_null_leaves_the_users_hugging_face_cache_alone(clean_hf_env):
    runtime.use_cache_dir(None)
    assert not any(name in os.environ for name in HF_VARIABLES)
    assert runtime.user_hf_home() == str(clean_hf_env / "home" / ".cache" / "huggingface")


def test_cache_dir_moves_the_caches_but_keeps_the_stored_token(clean_hf_env, monkeypatch):
    monkeypatch.chdir(clean_hf_env)
    runtime.use_cache_dir(".cache/hf")
    assert os.environ["HF_HOME"] == str(clean_hf_env / ".cache" / "hf")
    assert os.environ["HF_DATASETS_CACHE"] == str(clean_hf_env / ".cache" / "hf" / "datasets")
    assert os.environ["HF_TOKEN_PATH"] == str(clean_hf_env / "home" / ".cache" / "huggingface" / "token")


def test_a_users_hf_home_wins_over_cache_dir(clean_hf_env, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(clean_hf_env / "mine"))
    runtime.use_cache_dir(".cache/hf")
    assert os.environ["HF_HOME"] == str(clean_hf_env / "mine")
    assert os.environ["HF_TOKEN_PATH"] == str(clean_hf_env / "mine" / "token")


def test_cache_dir_null_is_a_valid_config(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"cache_dir": None}))
    result = snakemake(tmp_path, "results/sft/adapter", "-n", "--configfile", str(overlay))
    assert result.returncode == 0, result.stdout + result.stderr
