"""What every job sets up before its stage runs (workflow/runtime.py, workflow/job.py): Hugging Face
caches (config ``cache_dir``), experiment tracking (``tracking``) and the filtered warnings."""

from __future__ import annotations

import os

import pytest
import torch
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


def _job(**config):
    from workflow.job import Job

    return Job(
        input={},
        output={"metrics": "results/rloo/iter_1/policy/metrics.csv"},
        params={},
        config={"seed": 0, **config},
        wildcards={},
        log="logs/train_policy/rloo_1.log",
    )


@pytest.fixture
def restore_tracking(monkeypatch):
    """Tracking is process-wide state: put it back after the test."""
    for name in ("TENSORBOARD_LOGGING_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    saved = runtime.tracking_args()
    yield
    runtime._tracking = saved


def test_every_trainer_reports_where_tracking_says(restore_tracking, tmp_path, monkeypatch):
    from trl import SFTConfig

    from workflow.job import configure
    from workflow.train.kit import trainer_kwargs

    monkeypatch.chdir(tmp_path)
    job = _job(tracking={"report_to": ["tensorboard", "trackio"], "project": "study"})
    assert job.run_name == "train_policy/rloo_1"
    configure(job)
    kwargs = trainer_kwargs(str(tmp_path / "out"), 1, 1e-3, 2, 0, config={})
    assert (kwargs["report_to"], kwargs["run_name"], kwargs["project"]) == (
        ["tensorboard", "trackio"],
        "train_policy/rloo_1",
        "study",
    )
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "logs" / "tensorboard" / "train_policy" / "rloo_1")
    assert os.environ["WANDB_PROJECT"] == "study"
    args = SFTConfig(**kwargs)
    assert args.report_to == ["tensorboard", "trackio"] and args.run_name == "train_policy/rloo_1"


def test_tracking_defaults_to_none(restore_tracking):
    from workflow.job import configure
    from workflow.train.kit import trainer_kwargs

    configure(_job())
    assert trainer_kwargs("out", 1, 1e-3, 2, 0, config={})["report_to"] == "none"


def test_the_job_sees_tracking_as_a_runtime_key_not_a_setting():
    """Tracking reaches every job (workflow.rerun.RUNTIME_KEYS) but no rule's settings param, so that
    changing it reruns nothing (tests/test_reruns.py)."""
    from types import SimpleNamespace

    from workflow.job import Job

    smk = SimpleNamespace(
        input={},
        output={"metrics": "m.csv"},
        params={"settings": {"seed": 3}, "code": "sha256:x"},
        config={"seed": 3, "tracking": {"report_to": "wandb"}, "cache_dir": None, "sft": {}},
        wildcards={},
        threads=1,
        resources={},
        log=["logs/sft/sft.log"],
    )
    job = Job.from_snakemake(smk)
    assert job.config == {"seed": 3, "tracking": {"report_to": "wandb"}, "cache_dir": None}
    assert "tracking" not in (REPO / "rules" / "common.smk").read_text()


@pytest.mark.parametrize(
    "value, ok",
    [("tensorboard", True), (["trackio", "wandb"], True), ("none", True), ("tensorbord", False), ([], False)],
)
def test_tracking_report_to_is_validated(tmp_path, value, ok):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"tracking": {"report_to": value}}))
    result = snakemake(tmp_path, "results/sft/adapter", "-n", "--configfile", str(overlay))
    assert (result.returncode == 0) == ok, result.stdout + result.stderr
    if not ok:
        assert "report_to" in result.stdout + result.stderr


def test_known_noisy_warnings_are_filtered_and_no_others():
    import warnings

    noisy = [
        "`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing` instead.",
        "`gradient_checkpointing_enable` is deprecated and will be removed in v6. Use `activation_checkpointing_enable` instead.",
        "`gradient_checkpointing_disable` is deprecated and will be removed in v6. Use `activation_checkpointing_disable` instead.",
        "`gradient_checkpointing` is deprecated and will be removed in v6. Use `activation_checkpointing` instead.",
    ]
    kept = [
        (FutureWarning, "`torch_dtype` is deprecated and will be removed in v6."),
        (UserWarning, noisy[0]),  # same text, another category
        (UserWarning, "something else"),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime.filter_known_warnings()
        for message in noisy:
            warnings.warn(message, FutureWarning, stacklevel=1)
        for category, message in kept:
            warnings.warn(message, category, stacklevel=1)
    assert [(w.category, str(w.message)) for w in caught] == kept


def rng_state(device: str) -> torch.Tensor:
    """Torch's global random state on ``device`` (``cpu`` or ``cuda``)."""
    return torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()


# the GPU case runs where there is a GPU (benchmarks/device_check.sh tests)
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_seeded_rng_draws_the_seeds_numbers_and_gives_the_caller_its_state_back(device):
    torch.manual_seed(123)
    torch.rand(3, device=device)  # the caller is somewhere in its own stream (and CUDA initialised)
    before = rng_state(device)
    with runtime.seeded_rng(7):
        drawn = torch.rand(4, device=device)
    assert torch.equal(rng_state(device), before)
    torch.manual_seed(7)
    assert torch.equal(torch.rand(4, device=device), drawn)
    # a snapshot restores as often as asked
    restore = runtime.rng_snapshot()
    first = torch.rand(2, device=device)
    restore()
    assert torch.equal(torch.rand(2, device=device), first)
    restore()
    assert torch.equal(torch.rand(2, device=device), first)
