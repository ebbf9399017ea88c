"""Benchmarks are not tests (their numbers depend on the machine), but they must keep running as the code moves:
each script is started the way the README starts it, with --help, which imports everything it uses."""

from __future__ import annotations

import subprocess
import sys

import pytest

from packager.core.paths import PROJECT_ROOT

SCRIPTS = sorted((PROJECT_ROOT / "benchmarks").glob("*.py"))


def test_every_benchmark_is_covered():
    assert len(SCRIPTS) >= 7, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_benchmark_starts(script):
    run = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=PROJECT_ROOT,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage:" in run.stdout.lower(), run.stdout[-2000:]
