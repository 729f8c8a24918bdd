"""The catalog on PostgreSQL, beyond the store tests that run on both databases: every
command through the CLI, a plain ``postgresql://`` URL, and the password of
``LORAHUB_DATABASE_URL`` never printed (a canary: a real login's password, so that every
code path, the working ones and the failing ones, has it in hand)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from factories import cli_runner, write_peft_adapter

import lorahub

CANARY = "canary-Pw-8c1f3e"


@pytest.fixture
def canary_url(postgres, monkeypatch) -> str:
    """A fresh migrated database reached as a login whose password is the canary, in
    ``LORAHUB_DATABASE_URL``."""
    import psycopg

    url = postgres.checkout()
    with psycopg.connect(postgres.url("postgres").replace("+psycopg", ""), autocommit=True) as c:
        c.execute("DROP ROLE IF EXISTS canary")
        c.execute(f"CREATE ROLE canary LOGIN SUPERUSER PASSWORD '{CANARY}'")
    user_url = url.replace(f"lorahub:{postgres.password}@", f"canary:{CANARY}@")
    monkeypatch.setenv("LORAHUB_DATABASE_URL", user_url)
    yield user_url
    postgres.checkin(url)


def _lorahub(home: Path, *args: str, env: dict[str, str] | None = None):
    """``lorahub ARGS`` as a process of its own (logs and tracebacks included)."""
    env = {**os.environ, "LORAHUB_HOME": str(home), **(env or {})}
    cmd = [sys.executable, "-c", "from lorahub.cli import main; main()", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def test_every_command_works_on_postgresql(canary_url, tmp_path, world):
    home = tmp_path / "store"
    run = cli_runner(home)
    out: list[str] = []

    def ok(*args):
        res = run(*args)
        out.append(res.output + res.stderr)
        return res

    ok("add", world / "a", "-n", "sql:v1", "--base", world / "llama")
    ok("add", write_peft_adapter(tmp_path / "b", seed=3), "-n", "other:v1")
    ok("tag", "sql:v1", "sql:prod")
    rows = json.loads(ok("ls", "--json").output)
    assert sorted(r for row in rows for r in row["refs"]) == ["other:v1", "sql:prod", "sql:v1"]
    assert json.loads(ok("show", "sql:prod", "--json").output)["refs"] == ["sql:prod", "sql:v1"]
    ok("check", "sql:prod", "--base", world / "llama")
    ok("export", "sql:prod", tmp_path / "out")
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    ok("merge", world / "llama", "sql:prod", "-o", tmp_path / "merged")
    ok("base", "ls")
    ok("rm", "-y", "other:v1")
    assert "freed" in ok("gc", "--grace", "0").output
    assert "1 blobs, 1 adapters: ok" in ok("verify").output
    ok("fsck")
    assert json.loads(ok("env", "--json").output)["database_url"].startswith("postgresql")
    # It all went to PostgreSQL: no SQLite file, and the rows are in the server.
    assert not (home / "lorahub.db").exists()
    from sqlalchemy import create_engine

    engine = create_engine(canary_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM adapters").scalar() == 1
    engine.dispose()
    assert not any(CANARY in text for text in out)


def test_a_plain_postgresql_url_uses_psycopg(canary_url, monkeypatch, tmp_path):
    monkeypatch.setenv("LORAHUB_DATABASE_URL", canary_url.replace("+psycopg", ""))
    with lorahub.open(tmp_path / "s") as hub:
        hub.add(write_peft_adapter(tmp_path / "a"), name="a")
        assert [i.refs for i in hub.list_adapters()] == [("a:latest",)]
        assert hub._store.engine.url.drivername == "postgresql+psycopg"


def test_the_password_is_masked_in_env(canary_url, tmp_path):
    in_query = canary_url.replace(f":{CANARY}@", "@") + f"?password={CANARY}"
    for url, args in ((canary_url, ["env"]), (in_query, ["env", "--json"])):
        res = _lorahub(tmp_path / "s", *args, env={"LORAHUB_DATABASE_URL": url})
        assert res.returncode == 0, res.stderr
        assert CANARY not in res.stdout + res.stderr and "***" in res.stdout


def test_the_password_is_never_in_an_error(canary_url, postgres, monkeypatch, tmp_path):
    run = cli_runner(tmp_path / "s")
    wrong_password = canary_url.replace(CANARY, "x" + CANARY)
    cases = {
        canary_url.rsplit("/", 1)[0] + "/no_such_db": "does not exist",
        wrong_password: "password authentication failed",
        canary_url.replace(f":{postgres.port}/", ":9/"): "refused",
        canary_url.replace(f":{CANARY}@", "@").rsplit("/", 1)[0]
        + f"/no_such_db?password={CANARY}": "does not exist",
        f"postgresql+psycopg://canary:{CANARY}@127.0.0.1:{postgres.port}": "",  # no database
        f"not a url {CANARY}": "not a database URL",
        f"nosuchdb+driver://u:{CANARY}@h/db": "",
    }
    shown: list[str] = []
    for url, words in cases.items():
        monkeypatch.setenv("LORAHUB_DATABASE_URL", url)
        res = run("ls", code=1)
        assert CANARY not in res.output + res.stderr, (url, res.stderr)
        assert res.stderr.startswith("Error: ") and words in res.stderr, (url, res.stderr)
        shown.append(res.stderr.strip())
    print("\n".join(shown))  # what a user reads, in the test log
    # A real process with every log line on: not there either.
    res = _lorahub(
        tmp_path / "s",
        "-vv",
        "ls",
        env={"LORAHUB_DATABASE_URL": wrong_password, "LORAHUB_LOG_LEVEL": "DEBUG"},
    )
    assert res.returncode == 1 and "password authentication failed" in res.stderr
    assert CANARY not in res.stdout + res.stderr and "Traceback" not in res.stderr


def test_an_empty_catalog_over_a_full_store_is_refused_without_the_password(
    canary_url, postgres, monkeypatch, tmp_path
):
    home = tmp_path / "s"
    monkeypatch.delenv("LORAHUB_DATABASE_URL")
    with lorahub.open(home) as hub:  # adapters in a store whose catalog is its SQLite file
        hub.add(write_peft_adapter(tmp_path / "a"), name="a")
    empty = postgres.create_database(migrated=False).rsplit("/", 1)[1]
    url = canary_url.rsplit("/", 1)[0] + "/" + empty
    res = _lorahub(home, "ls", env={"LORAHUB_DATABASE_URL": url})
    assert res.returncode == 1 and "is missing or empty" in res.stderr, res.stderr
    assert CANARY not in res.stderr and "canary:***@" in res.stderr


def test_a_writer_waits_for_the_lock_and_then_sees_the_last_commit(canary_url, tmp_path):
    """Two write transactions of two engines: the second blocks on the advisory lock until
    the first commits, then reads what it wrote (READ COMMITTED after the lock)."""
    import threading

    from sqlalchemy import text

    from lorahub.catalog import db

    first, second = db.make_engine(canary_url), db.make_engine(canary_url)
    seen: list[int] = []
    holding = threading.Event()

    def later() -> None:
        holding.wait(10)
        with db.write_session(second) as s:
            seen.append(s.execute(text("SELECT count(*) FROM blobs")).scalar_one())

    t = threading.Thread(target=later)
    t.start()
    with db.write_session(first) as s:
        s.execute(text("INSERT INTO blobs VALUES ('xxh128:00', 1, now())"))
        holding.set()
        t.join(0.5)
        assert t.is_alive()  # waiting on the write lock
    t.join(10)
    assert seen == [1]
    first.dispose()
    second.dispose()
