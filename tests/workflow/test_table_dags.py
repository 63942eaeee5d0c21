"""Every paper table is one target whose dry run shows the jobs it needs (default config)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from .conftest import REPO


def _tables() -> list[str]:
    from anorefiner.tables.declare import list_tables

    return [t for t in list_tables(REPO / "config" / "tables") if not t.startswith("demo")]


def _dry_run(*targets: str) -> str:
    cmd = [sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "--workflow-profile", "none",
           "--cores", "1", *targets]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _job_counts(text: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", text, re.M)}


def test_every_table_is_declared():
    names = set(_tables())
    assert {f"table{i}" for i in range(1, 15)} <= names
    assert {f"paclip_table{i}" for i in range(1, 7)} <= names


def test_all_tables_dry_run_together():
    counts = _job_counts(_dry_run(*[f"tables/{t}.csv" for t in _tables()], "tables/audit.md"))
    assert counts.get("table", 0) == len(_tables())


@pytest.mark.parametrize("table", ["table1", "table8", "table14"])
def test_dry_run_lists_the_jobs_the_table_needs(table):
    counts = _job_counts(_dry_run(f"tables/{table}.csv"))
    assert counts.get("table") == 1
    assert counts.get("metrics", 0) > 0, counts
    if table == "table8":  # the CNN backbone: ResNet-50 features, MuSc without RsCIN, PGT
        assert counts.get("features", 0) > 0 and counts.get("pgt", 0) > 0
