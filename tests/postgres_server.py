"""A throwaway PostgreSQL server for tests and benchmarks: pgserver's binaries, a password-checked role.

pgserver ships the server in its wheel, so no system package is needed. Postgres refuses to run as
root; when we are root (CI is), pgserver runs it as a system user it creates ("pgserver"). The server
listens on a Unix socket in its data folder only, so parallel runs cannot collide on a port.

Its own superuser logs in without a password ("trust"); the storage URLs use the role ``ROLE``, which
must give its password (scram-sha-256), so a wrong password is refused as it would be on a real server.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROLE = "calibrate"
PASSWORD = "s3cret-pw"


@dataclass(frozen=True)
class Server:
    """A running server; ``url(database)`` is what ``--storage`` takes."""

    handle: object  # pgserver.PostgresServer
    socket_dir: Path

    def url(self, database: str, *, password: str = PASSWORD, host: Path | None = None) -> str:
        return f"postgresql://{ROLE}:{password}@/{database}?host={host or self.socket_dir}"

    def sql(self, command: str, database: str = "postgres") -> str:
        """Run SQL as the superuser (psql over the socket); its output."""
        from pgserver._commands import POSTGRES_BIN_PATH

        uri = self.handle.get_uri(database)
        result = subprocess.run(
            [str(POSTGRES_BIN_PATH / "psql"), "-v", "ON_ERROR_STOP=1", "-qAt", uri],
            input=command,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout

    def new_database(self, prefix: str = "study") -> str:
        """A new, empty database owned by ``ROLE``; its storage URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        self.sql(f"CREATE DATABASE {name} OWNER {ROLE}")
        return self.url(name)


@contextlib.contextmanager
def running_server() -> Iterator[Server]:
    """Start a server in a new temp folder; stop it and delete the folder after.

    Not under pytest's tmp_path: the server runs as another user when we are root, and pytest keeps its
    root folder private (0700), resetting it whenever any pytest session starts.
    """
    folder = Path(tempfile.mkdtemp(prefix="root-calibrate-postgres-"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset (CI)
            import pgserver

            handle = pgserver.get_server(folder / "data", cleanup_mode="delete")
        try:
            server = Server(handle, Path(handle.get_postmaster_info().socket_dir))
            server.sql(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
            # Socket logins as ROLE must give its password; everything else stays as pgserver set it up.
            hba = Path(handle.pgdata) / "pg_hba.conf"
            hba.write_text(f"local all {ROLE} scram-sha-256\n" + hba.read_text())
            server.sql("SELECT pg_reload_conf()")
            yield server
        finally:
            handle.cleanup()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
