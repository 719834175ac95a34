"""A throwaway PostgreSQL server for the server tests: a fresh cluster (initdb) in a temporary folder, started on a
free loopback port with its unix socket in that folder, one database, removed afterwards. Debian's `postgresql`
package provides the binaries (CI installs it); without them the tests that need it are skipped, saying so.

PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres` user (`runuser`); as any other
user it is that user's own. The folder is made outside pytest's tmp folders, which root keeps private (0700): the
`postgres` user could not reach a socket inside them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

BIN_DIRS = ("/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin")
"""Debian installs the server binaries here (not on PATH); the newest one present is used."""


def _bin_dir() -> Path | None:
    for folder in BIN_DIRS:
        if (Path(folder) / "initdb").is_file():
            return Path(folder)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_postgres() -> Iterator[str]:
    """A started PostgreSQL; yields the SQLAlchemy URL of an empty database in it (psycopg 3, over the socket)."""
    bindir = _bin_dir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (initdb not found): apt-get install postgresql")
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    user = "postgres" if as_root else os.environ.get("USER") or "postgres"
    root = Path(tempfile.mkdtemp(prefix="tunesmith-pg-"))
    data, port = root / "data", _free_port()
    if as_root:
        shutil.chown(root, user="postgres", group="postgres")

    def run(*args: str) -> None:
        done = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}")

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", user, "--auth=trust", "--no-sync", "-E", "UTF8")
        # fsync off: a test database is thrown away, and fsync on 2 busy cores costs seconds per commit
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
            "-o", f"-p {port} -k {root} -c listen_addresses='' -c fsync=off -c max_connections=100", "start")
        try:
            run(str(bindir / "createdb"), "-h", str(root), "-p", str(port), "-U", user, "tunesmith")
            yield f"postgresql+psycopg://{user}@/tunesmith?host={root}&port={port}"
        finally:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)
