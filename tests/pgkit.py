"""A throwaway PostgreSQL cluster for the tests and benchmarks: ``initdb`` in a temp dir,
``pg_ctl start`` on a free port of 127.0.0.1, a password-protected superuser, and one fresh
database per test made from a migrated template (``CREATE DATABASE ... TEMPLATE``: a copy,
far faster than migrating each one).

``initdb`` refuses to run as root, and the tests (and CI) run as root: the cluster then
belongs to ``nobody``, in a folder of its own outside pytest's 0700 temp dirs. Without the
PostgreSQL binaries the tests that need them fail (:class:`PostgresMissing` says how to
install them); they are never skipped.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: Where Debian's postgresql-15 puts its programs; LORAHUB_TEST_PG_BIN overrides it.
DEFAULT_BIN = Path("/usr/lib/postgresql/15/bin")
USER = "lorahub"
TEMPLATE = "lorahub_template"


class PostgresMissing(RuntimeError):
    """The PostgreSQL server programs are not installed."""


def bin_dir() -> Path:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Raises:
        PostgresMissing: they are not there, with how to install them.
    """
    d = Path(os.environ.get("LORAHUB_TEST_PG_BIN") or DEFAULT_BIN)
    missing = [p for p in ("initdb", "pg_ctl", "postgres") if not (d / p).is_file()]
    if missing:
        raise PostgresMissing(
            f"the PostgreSQL tests need the PostgreSQL 15 server programs ({', '.join(missing)} "
            f"not found in {d}). Install them with `apt-get install postgresql-15` (Debian, "
            "Ubuntu), or point LORAHUB_TEST_PG_BIN at the folder holding initdb and pg_ctl"
        )
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """A running cluster; :func:`start` makes one, :meth:`stop` removes it and its files."""

    def __init__(self, root: Path, port: int, password: str, run_as: pwd.struct_passwd | None):
        self.root = root
        self.port = port
        self.password = password
        self._run_as = run_as
        self._names = itertools.count()
        self._template_ready = False
        self._free: list[str] = []

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, dbname: str) -> str:
        """The SQLAlchemy URL of database ``dbname`` (psycopg 3, password included)."""
        return f"postgresql+psycopg://{USER}:{self.password}@127.0.0.1:{self.port}/{dbname}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=USER,
            password=self.password,
            dbname="postgres",
            autocommit=True,
        ) as conn:
            conn.execute(sql)  # type: ignore[arg-type]  # our own fixed statements

    def create_database(self, *, migrated: bool = True) -> str:
        """A new, empty database; with ``migrated``, already at the newest schema (a copy of
        a template migrated once). Returns its URL."""
        name = f"t{os.getpid()}_{next(self._names)}"
        if migrated:
            self._ensure_template()
            self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
        else:
            self._admin(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop the database at ``url``, closing whatever connections a test left open."""
        name = url.rsplit("/", 1)[1]
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def checkout(self) -> str:
        """A migrated database holding no rows, for one test: one given back with
        :meth:`checkin` (emptied there), else a new one. Returns its URL."""
        return self._free.pop() if self._free else self.create_database()

    def checkin(self, url: str) -> None:
        """Take back a database from :meth:`checkout`: close the connections a test left
        open, empty every table of the catalog and restart its ids, as a new one would be
        (but the generation's one row, which only ever counts up)."""
        import psycopg

        from lorahub.catalog.models import Base

        kept = "catalog_generation"
        tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables if t.name != kept)
        with psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=USER,
            password=self.password,
            dbname=url.rsplit("/", 1)[1],
            autocommit=True,
        ) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            try:
                conn.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")  # type: ignore[arg-type]
            except psycopg.Error:  # a test left it without its tables: not reused
                reusable = False
            else:
                reusable = True
        if reusable:
            self._free.append(url)
        else:
            self.drop_database(url)

    def _ensure_template(self) -> None:
        if self._template_ready:
            return
        from lorahub.catalog import db

        self._admin(f'CREATE DATABASE "{TEMPLATE}"')
        engine = db.make_engine(self.url(TEMPLATE))
        try:
            db.upgrade(engine, None)
        finally:
            engine.dispose()
        self._template_ready = True

    def _as_owner(self, argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        """Run a server program as the cluster's owner (``nobody`` when we are root)."""
        if self._run_as is not None:
            argv = [
                "setpriv",
                f"--reuid={self._run_as.pw_uid}",
                f"--regid={self._run_as.pw_gid}",
                "--clear-groups",
                "--",
                *argv,
            ]
        env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PGTZ": "UTC", "HOME": str(self.root)}
        env.pop("PGDATA", None)
        return subprocess.run(
            argv, env=env, cwd=self.root, capture_output=True, text=True, check=False, **kw
        )  # type: ignore[call-overload]

    def _init(self, bins: Path) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self._run_as is not None:
            os.chown(pwfile, self._run_as.pw_uid, self._run_as.pw_gid)
        res = self._as_owner(
            [
                str(bins / "initdb"),
                "-D",
                str(self.data),
                "-U",
                USER,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        pwfile.unlink()
        if res.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{res.stdout}\n{res.stderr}")

    def _start(self, bins: Path) -> subprocess.CompletedProcess[str]:
        # Durability off: a test cluster never outlives a crash, and fsync is most of the time
        # a small database takes to create and write.
        opts = " ".join(
            [
                "-c listen_addresses=127.0.0.1",
                f"-c port={self.port}",
                f"-c unix_socket_directories={self.root}",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=200",
                "-c shared_buffers=64MB",
                "-c timezone=UTC",
            ]
        )
        return self._as_owner(
            [
                str(bins / "pg_ctl"),
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                str(self.data),
                "-l",
                str(self.root / "server.log"),
                "-o",
                opts,
            ]
        )

    def stop(self) -> None:
        """Stop the server at once and remove its files."""
        with contextlib.suppress(PostgresMissing, OSError):
            self._as_owner(
                [str(bin_dir() / "pg_ctl"), "stop", "-m", "immediate", "-D", str(self.data)]
            )
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join((self.root / "server.log").read_text().splitlines()[-lines:])
        except OSError:
            return ""


def start() -> Cluster:
    """A new cluster, running; stopped and removed at exit if the caller does not.

    Raises:
        PostgresMissing: no PostgreSQL server programs here.
        RuntimeError: initdb or the server failed (with the server's log).
    """
    bins = bin_dir()
    run_as = pwd.getpwnam("nobody") if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="lorahub-pg-"))
    if run_as is not None:
        os.chown(root, run_as.pw_uid, run_as.pw_gid)
    cluster = Cluster(root, _free_port(), secrets.token_hex(12), run_as)
    atexit.register(cluster.stop)
    try:
        cluster._init(bins)
        for _ in range(3):  # the free port may have been taken in between: try another
            res = cluster._start(bins)
            if res.returncode == 0:
                return cluster
            cluster.port = _free_port()
        raise RuntimeError(f"PostgreSQL did not start:\n{res.stderr}\n{cluster.log_tail()}")
    except BaseException:
        cluster.stop()
        raise


@contextlib.contextmanager
def running() -> Iterator[Cluster]:
    """A cluster for the length of a ``with`` block."""
    cluster = start()
    try:
        yield cluster
    finally:
        cluster.stop()
