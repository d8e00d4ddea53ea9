"""A database directory the server's user cannot write: one line saying what to do, exit 1.

The container case (docs/deploy.md): /data bind-mounted from a root-owned host directory, the
server running as uid 10001. Here the same thing on the host, as an unprivileged uid when the
tests run as root (root may write anywhere), else as this user in a read-only directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pserver.cli import database_problem
from realtools import need_program

NOBODY = 65534


@pytest.fixture
def locked_dir() -> Iterator[Path]:
    """A directory the process under test may enter but not write."""
    path = Path(tempfile.mkdtemp(prefix="p2p-locked-"))  # in /tmp, so any uid can reach it
    path.chmod(0o755 if os.getuid() == 0 else 0o555)
    try:
        yield path
    finally:
        path.chmod(0o755)
        shutil.rmtree(path)


def _as_unprivileged() -> list[str]:
    if os.getuid() != 0:
        return []
    setpriv = need_program("setpriv", "apt-get install util-linux")  # to drop privileges
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def test_unwritable_database_directory_says_what_to_do(locked_dir: Path) -> None:
    db = locked_dir / "p2pserver.db"
    result = subprocess.run(
        [*_as_unprivileged(), sys.executable, "-m", "p2pserver", "--no-turn", "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    uid = NOBODY if os.getuid() == 0 else os.getuid()
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback
    assert lines[0].startswith(f"p2pserver: error: cannot write {db} as uid {uid}: "), lines
    assert f"chown -R {uid} {locked_dir}" in lines[0]
    assert not db.exists()


def test_writable_places_pass(tmp_path: Path) -> None:
    assert database_problem(str(tmp_path / "new.db")) is None
    (tmp_path / "old.db").write_bytes(b"")
    assert database_problem(str(tmp_path / "old.db")) is None
    assert database_problem(":memory:") is None
    missing = tmp_path / "nowhere" / "x.db"
    assert (
        database_problem(str(missing)) == f"cannot create {missing}: no directory {missing.parent}"
    )
