"""What a rule instance depends on besides its input files: its settings and its code.

Rules pass both as ``params:`` (``rules/common.smk``), so Snakemake's default ``params`` rerun
trigger reruns a stage, and everything downstream of it, when either changes:

* ``settings``: :func:`stage_settings`, the config values the stage reads (nested as in the config,
  keys sorted so that the recorded value does not depend on the order of the YAML files).
  :class:`workflow.job.Job` hands the stage these settings as its ``config``, so a stage cannot read
  a value that the DAG does not see.
* ``code``: :func:`code_hash`, a hash of the stage's module and of every ``workflow`` module it
  imports, transitively (function-level imports included), with the packages above them. It
  hashes the syntax tree without docstrings, so an edit of a comment, a docstring or the layout
  reruns nothing; any other edit reruns every stage that runs that code. (Snakemake's own ``code`` trigger only sees the two-line
  ``scripts/``.)
"""

from __future__ import annotations

import ast
import functools
import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PACKAGE = "workflow"
ROOT = Path(__file__).resolve().parent

# Config keys every job gets besides its settings (workflow.job.Job), and which are not rerun
# triggers: where caches live, the resources (which the rules turn into each job's GPU and process
# counts; a study's nested run passes them on) and where its trainers report (tracking: watching a
# run does not change its results).
RUNTIME_KEYS = ("cache_dir", "resources", "tracking")


def _sorted(value: Any) -> Any:
    """``value`` with the keys of every dict in it sorted (a canonical ``repr``)."""
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def stage_settings(config: dict[str, Any], keys: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """The values of ``keys`` (top-level sections or dotted paths such as ``model.max_length``),
    nested as in ``config``; a key the config does not hold is left out."""
    out: dict[str, Any] = {}
    for key in keys:
        *parents, leaf = key.split(".")
        source, target = config, out
        for part in parents:
            source = source.get(part) if isinstance(source, dict) else None
            target = target.setdefault(part, {})
        if isinstance(source, dict) and leaf in source:
            target[leaf] = source[leaf]
    return _sorted(out)


def _module_file(module: str) -> Path | None:
    """The source file of ``workflow.<name>`` (None for other packages)."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    path = ROOT.joinpath(*parts[1:])
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _with_packages(modules: Iterable[str]) -> set[str]:
    """``modules`` and the packages above them (importing ``workflow.train.policy`` runs
    ``workflow/__init__.py`` and ``workflow/train/__init__.py``)."""
    return {m.rsplit(".", i)[0] for m in modules for i in range(m.count(".") + 1)}


def _imports(tree: ast.AST) -> set[str]:
    """``workflow`` modules imported anywhere in ``tree``."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # from workflow import io
    return {m for m in _with_packages(found) if _module_file(m) is not None}


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
    return tree


@functools.cache
def _parsed(module: str) -> tuple[str, frozenset[str]]:
    """``(syntax tree dump without docstrings, imported workflow modules)`` of ``module``."""
    tree = ast.parse(_module_file(module).read_text(), filename=str(_module_file(module)))
    imports = frozenset(_imports(tree) - {module})
    return ast.dump(_strip_docstrings(tree)), imports


def code_modules(*modules: str) -> list[str]:
    """``modules`` and every ``workflow`` module they import, transitively, with the packages above
    them, sorted."""
    seen: set[str] = set()
    todo = [m for m in _with_packages(modules) if _module_file(m) is not None]
    missing = [m for m in modules if _module_file(m) is None]
    if missing:
        raise ValueError(f"no module {missing[0]!r} under {ROOT}")
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(_parsed(module)[1])
    return sorted(seen)


def code_hash(*modules: str) -> str:
    """``sha256:`` of the code of ``modules`` and their ``workflow`` imports (see the module docstring)."""
    digest = hashlib.sha256()
    for module in code_modules(*modules):
        digest.update(f"{module}\n{_parsed(module)[0]}\n".encode())
    return "sha256:" + digest.hexdigest()[:16]
