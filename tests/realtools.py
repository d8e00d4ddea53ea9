"""The one rule for real clients and tools a test needs (Chromium, Playwright, coturn's
turnutils_uclient, unshare): on a developer's machine a missing one skips the test and says why;
with CI set it fails the test naming the tool, so a runner without it cannot pass with the
real-client tests silently gone. pytest runs with -rs (pyproject.toml), so skips are listed."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest


def need(tool: str, problem: str | None) -> None:
    """Skip, or with CI set fail, when `problem` says why `tool` cannot be used."""
    if problem is None:
        return
    message = f"{tool} is missing: {problem}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set: a real client the tests need must be there)")
    pytest.skip(message, allow_module_level=True)


def need_program(name: str, install: str) -> str:
    """The path of `name` on PATH; see need()."""
    path = shutil.which(name)
    need(name, None if path else f"not on PATH ({install})")
    assert path is not None
    return path


def need_module(name: str, install: str) -> None:
    """The Python package `name` is importable; see need()."""
    found = importlib.util.find_spec(name) is not None
    need(name, None if found else f"the Python package is not installed ({install})")
