"""The config schema (``workflow/schemas/config.schema.yaml``): every key's type, ``default`` and
``description``, and the method names it allows.

A light module (yaml only), imported by the Snakefile's rules as by the stages, so that every name
and default has one home: code reads a setting with :func:`setting` or :func:`section`, which fall
back to the schema's default, and never carries a default of its own. ``config.yaml`` holds the
same values with comments (a test keeps the two equal).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

SCHEMA = Path(__file__).with_name("schemas") / "config.schema.yaml"


@functools.cache
def _schema() -> dict[str, Any]:
    with open(SCHEMA) as handle:
        return yaml.safe_load(handle)


def schema_property(key: str) -> dict[str, Any]:
    """The schema of config key ``key``, dotted for nested keys (``"lora.r"``): its ``type``,
    ``enum``, ``default``, ``description``, ... (references to ``$defs`` resolved)."""
    node: dict[str, Any] = _schema()
    for part in key.split("."):
        try:
            node = node["properties"][part]
        except KeyError:
            raise KeyError(f"config key {key!r} is not in the schema ({SCHEMA})") from None
    ref = node.get("$ref", "")
    if ref.startswith("#/$defs/"):
        node = {**_schema()["$defs"][ref.removeprefix("#/$defs/")], **node}
    return node


def default(key: str) -> Any:
    """The schema's default of dotted config key ``key`` (a copy)."""
    spec = schema_property(key)
    if "default" not in spec:
        raise KeyError(f"config key {key!r} has no default in the schema ({SCHEMA})")
    return copy.deepcopy(spec["default"])


def setting(config: Mapping[str, Any], key: str) -> Any:
    """The value of dotted config key ``key`` in ``config``, else the schema's default: a job's
    config holds only the keys its rule lists, and tests and benchmarks pass partial configs."""
    value = _find(config, key)
    return default(key) if value is _MISSING else value


def section(config: Mapping[str, Any], key: str) -> dict[str, Any]:
    """Config section ``key`` (dotted) with every key it lacks at the schema's default (nested
    sections only where ``config`` has them)."""
    props = schema_property(key)["properties"]
    out = {name: copy.deepcopy(spec["default"]) for name, spec in props.items() if "default" in spec}
    given = _find(config, key)
    out.update({} if given is _MISSING or given is None else given)
    return out


_MISSING = object()


def _find(config: Mapping[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


# every method of loop.methods, in the schema's order
METHODS: tuple[str, ...] = tuple(schema_property("loop")["properties"]["methods"]["items"]["enum"])
# ZOPrO: iteration 0 is first-order RLOO (the same job as rloo's iteration 0), iterations >= 1
# zeroth-order (zorloo: the configured zopro.variant; zorloo_reference: always the paper's algorithm)
ZO_METHODS: tuple[str, ...] = ("zorloo", "zorloo_reference")
