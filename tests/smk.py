"""Run the workflow's Snakefile in a scratch working directory from tests."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pythonpath(*dirs: str | os.PathLike) -> str:
    """A ``PYTHONPATH`` with ``dirs`` in front of the inherited one, so that a subprocess also finds
    packages installed on ``PYTHONPATH`` (the GPU machine's wheels, ``--target`` installs)."""
    return os.pathsep.join([*map(str, dirs), *filter(None, [os.environ.get("PYTHONPATH")])])


def snakemake(
    workdir: Path, *args: str, timeout: int = 600, env: dict | None = None, snakefile: Path = REPO / "Snakefile"
) -> subprocess.CompletedProcess:
    """Run ``snakemake`` on the repository's Snakefile (or ``snakefile``) with ``workdir`` as working directory."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "-d", str(workdir), *args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=workdir)


def readme_commands(needle: str, readme: Path = REPO / "README.md") -> list[list[str]]:
    """The ``.venv/bin/snakemake`` command lines of ``readme`` that contain ``needle``, as argument
    lists without the program (so that a test runs exactly what the README tells users to run)."""
    found = []
    for line in readme.read_text().splitlines():
        line = line.strip().lstrip("#").strip()
        if line.startswith(".venv/bin/snakemake ") and needle in line:
            found.append(shlex.split(line.split("  #")[0])[1:])
    return found


def plan_resources(out: str) -> dict[tuple[str, str], dict[str, str]]:
    """``(rule, wildcards) -> resources`` of every job listed by a dry run (``-n``) in ``out``."""
    jobs = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        head = re.match(r"(?:local)?rule (\w+):", block)
        res = re.search(r"resources: (.+)", block)
        wildcards = re.search(r"wildcards: (.+)", block)
        if head and res:
            pairs = dict(kv.split("=", 1) for kv in re.split(r",\s*", res.group(1).strip()) if "=" in kv)
            jobs[head.group(1), wildcards.group(1) if wildcards else ""] = pairs
    return jobs
