"""The schema is the one home of every default: each key has a default and a description there,
config.yaml holds the same values, and code reads settings through it (workflow/schema.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from smk import REPO
from snakemake.utils import validate

from workflow import schema

CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())


def leaf_keys(node: dict[str, Any] = None, path: str = "") -> Iterator[str]:
    """Dotted names of every schema key that is not an object of keys."""
    node = schema._schema() if node is None else node
    for name, spec in node["properties"].items():
        key = f"{path}.{name}" if path else name
        yield from leaf_keys(spec, key) if "properties" in spec else [key]


def config_keys(node: dict[str, Any], path: str = "") -> Iterator[str]:
    for name, value in node.items():
        key = f"{path}.{name}" if path else name
        yield from config_keys(value, key) if isinstance(value, dict) else [key]


def test_every_key_has_a_default_and_a_description_and_config_yaml_agrees():
    keys = list(leaf_keys())
    assert set(keys) - set(config_keys(CONFIG)) == {"precision"}  # config.yaml shows it commented out
    for key in keys:
        spec = schema.schema_property(key)
        assert spec.get("description"), f"{key}: no description in the schema"
        assert "default" in spec, f"{key}: no default in the schema"
        assert schema.setting(CONFIG, key) == spec["default"], f"{key}: config.yaml and the schema's default differ"
    sections = [key for key in schema._schema()["properties"] if "properties" in schema.schema_property(key)]
    assert all(schema.schema_property(key).get("description") for key in sections)


def test_setting_and_section_fall_back_to_the_schema_defaults():
    assert schema.setting({"lora": {"r": 4}}, "lora.r") == 4
    assert schema.setting({"lora": {"r": 4}}, "lora.dropout") == CONFIG["lora"]["dropout"]
    assert schema.setting({}, "policy.kl_target") == CONFIG["policy"]["kl_target"]
    assert schema.setting({"policy": {"kl_target": None}}, "policy.kl_target") is None  # null is a value
    assert schema.section({"plots": {"layer": 3}}, "plots") == {**CONFIG["plots"], "layer": 3}
    assert schema.section({}, "zopro.reference") == CONFIG["zopro"]["reference"]
    defaults = schema.section({}, "plots")
    defaults["projections"].append("umap")  # a copy: the schema's default is untouched
    assert schema.default("plots.projections") == CONFIG["plots"]["projections"]
    with pytest.raises(KeyError, match="'lora.rank' is not in the schema"):
        schema.default("lora.rank")


def test_validation_fills_what_a_config_leaves_out():
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    del config["lora"]["dropout"], config["policy"]["ppo_epochs"], config["seed"]
    validate(config, str(schema.SCHEMA))
    assert config["lora"]["dropout"] == CONFIG["lora"]["dropout"]
    assert config["policy"]["ppo_epochs"] == CONFIG["policy"]["ppo_epochs"]
    assert config["seed"] == CONFIG["seed"]


def test_optimiser_configs_take_their_defaults_from_the_schema():
    from workflow.zo.direction import ZOConfig
    from workflow.zo.guarded import GuardedConfig

    reference = CONFIG["zopro"]["reference"]
    assert ZOConfig().lr == ZOConfig.from_config({}, seed=0).lr == reference["learning_rate"]
    assert ZOConfig.from_config({"eps": 0.5}, seed=7) == ZOConfig(eps=0.5, seed=7)
    guarded = GuardedConfig.from_config({})
    assert (guarded.step_size, guarded.updates_per_batch, guarded.known_base) == (
        CONFIG["zopro"]["step_size"],
        CONFIG["zopro"]["updates_per_batch"],
        CONFIG["zopro"]["known_base"],
    )
