"""The config schema (``workflow/schemas/config.schema.yaml``) and the method names it allows.

A light module (yaml only), imported by the Snakefile's rules as by the stages, so that every name
and default has one home.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

SCHEMA = Path(__file__).with_name("schemas") / "config.schema.yaml"


@functools.cache
def _schema() -> dict[str, Any]:
    with open(SCHEMA) as handle:
        return yaml.safe_load(handle)


def schema_property(key: str) -> dict[str, Any]:
    """The schema of top-level config key ``key`` (its ``enum``, ``default``, ...)."""
    return _schema()["properties"][key]


# every method of loop.methods, in the schema's order
METHODS: tuple[str, ...] = tuple(schema_property("loop")["properties"]["methods"]["items"]["enum"])
# ZOPrO: iteration 0 is first-order RLOO (the same job as rloo's iteration 0), iterations >= 1
# zeroth-order (zorloo: the configured zopro.variant; zorloo_reference: always the paper's algorithm)
ZO_METHODS: tuple[str, ...] = ("zorloo", "zorloo_reference")
