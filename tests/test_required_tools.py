"""With CI set, a real client the suite needs and cannot find fails the run, naming it; without
CI it is a listed skip (tests/realtools.py). Checked on the browser tests with Chromium hidden:
pytest runs them in a subprocess whose PATH holds nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
FIRST_BROWSER_TEST = "tests/web/test_web_client.py"


def run_without_chromium(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = str(tmp_path)  # an empty directory: no chromium (nor anything else) on PATH
    if ci:
        env["CI"] = "true"
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    command += [FIRST_BROWSER_TEST, "--maxfail=1"]
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize("ci", [True, False], ids=["ci", "developer"])
def test_missing_chromium_fails_with_ci_and_skips_without(tmp_path: Path, ci: bool) -> None:
    result = run_without_chromium(tmp_path, ci)
    output = result.stdout + result.stderr
    assert "chromium is missing: not on PATH" in output, output
    if ci:
        assert result.returncode != 0, output
        assert "CI is set" in output and " error" in output, output
    else:
        assert result.returncode == 0, output
        assert "SKIPPED" in output, output  # -rs lists it
