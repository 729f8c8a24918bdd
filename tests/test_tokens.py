"""Access tokens (``lorahub/tokens.py``, ``lorahub token``): made with a secret shown once,
kept as its sha256 only, listed without it, checked and removed."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

import lorahub
from lorahub.errors import Conflict, InvalidArgument, NotFound
from lorahub.tokens import LAST_USED_RESOLUTION, PREFIX


def test_a_token_is_checked_by_its_secret_and_stored_as_its_hash_only(hub, store_home):
    new = hub.add_token("ci", write=True, namespaces=["team", "team", "alpha"])
    assert new.secret.startswith(PREFIX) and len(new.secret) >= 40
    assert new.secret not in repr(new)
    assert new.info.scope == "write" and new.info.can_write
    assert new.info.namespaces == ("alpha", "team")
    checked = hub.check_token(new.secret)
    assert checked is not None and checked.name == "ci" and checked.namespaces == ("alpha", "team")
    assert hub.check_token(new.secret + "x") is None
    assert hub.check_token(new.secret[:-1]) is None
    assert hub.check_token("") is None and hub.check_token("hf_" + new.secret[3:]) is None

    with sqlite3.connect(store_home / "lorahub.db") as con:
        rows = con.execute("SELECT * FROM tokens").fetchall()
        dump = "\n".join(con.iterdump())
    assert len(rows) == 1
    assert new.secret not in dump and new.secret[3:] not in dump
    assert hashlib.sha256(new.secret.encode()).hexdigest() in dump


def test_two_tokens_never_share_a_secret_and_names_are_unique(hub):
    a = hub.add_token("a")
    b = hub.add_token("b")
    assert a.secret != b.secret
    assert a.info.scope == "read" and not a.info.can_write and a.info.namespaces == ()
    with pytest.raises(Conflict, match="token rm a"):
        hub.add_token("a", write=True)
    assert hub.check_token(a.secret).scope == "read"  # the first one is untouched
    for bad in ("", "Upper", "has space", "-dash", "a/b", "..", "x" * 65):
        with pytest.raises(InvalidArgument):
            hub.add_token(bad)
    for bad in ("a/b", "..", "", "-x", "a b"):
        with pytest.raises(InvalidArgument):
            hub.add_token("c", namespaces=[bad])
    assert [t.name for t in hub.tokens()] == ["a", "b"]


def test_removed_tokens_no_longer_check(hub):
    new = hub.add_token("gone")
    assert hub.remove_token("gone").name == "gone"
    assert hub.check_token(new.secret) is None
    assert hub.tokens() == []
    with pytest.raises(NotFound, match="token ls"):
        hub.remove_token("gone")


def test_last_use_is_recorded_rarely(hub):
    new = hub.add_token("t")
    assert hub.mark_token_used(new.info)
    used = hub.check_token(new.secret)
    assert used.last_used_at is not None
    assert not hub.mark_token_used(used)  # recorded a moment ago: no write
    later = used.last_used_at + LAST_USED_RESOLUTION + timedelta(seconds=1)
    assert lorahub.tokens.mark_used(hub._store, used, now=later)
    assert hub.check_token(new.secret).last_used_at == later


def test_token_commands(run, store_home):
    added = run("token", "add", "laptop")
    secret = added.stdout.strip()
    assert secret.startswith(PREFIX) and "shown once" in added.stderr
    quiet = run("token", "add", "ci", "--write", "--namespace", "team", "-q").stdout
    assert quiet.count("\n") == 1 and quiet.startswith(PREFIX)
    made = json.loads(run("token", "add", "bot", "--json").stdout)
    assert made["token"].startswith(PREFIX) and made["scope"] == "read"
    assert made["namespaces"] is None  # every namespace

    listing = run("token", "ls").stdout
    assert listing.splitlines()[0].split() == [
        "NAME",
        "SCOPE",
        "NAMESPACES",
        "CREATED",
        "LAST",
        "USED",
    ]
    assert any(line.split()[:3] == ["ci", "write", "team"] for line in listing.splitlines())
    listed = json.loads(run("token", "ls", "--json").stdout)
    assert [t["name"] for t in listed] == ["bot", "ci", "laptop"]
    assert all("token" not in t for t in listed)
    for text in (listing, json.dumps(listed), run("token", "ls", "-q").stdout):
        assert secret not in text and quiet.strip() not in text and made["token"] not in text
    assert run("token", "ls", "-q").stdout.split() == ["bot", "ci", "laptop"]
    created = datetime.fromisoformat(listed[0]["created_at"])
    assert abs(created - datetime.now(timezone.utc)) < timedelta(minutes=5)

    assert "exists" in run("token", "add", "ci", code=1).stderr
    assert "invalid token name" in run("token", "add", "Bad!", code=2).stderr
    # rm asks, refuses without a terminal, and removes nothing when one name is unknown.
    assert "pass -y" in run("token", "rm", "laptop", code=2).stderr
    assert "no token named 'nope'" in run("token", "rm", "laptop", "nope", "-y", code=1).stderr
    assert run("token", "rm", "laptop", "bot", "-y", "-q").stdout.split() == ["laptop", "bot"]
    assert run("token", "ls", "-q").stdout.split() == ["ci"]
    with lorahub.open(store_home) as hub:
        assert hub.check_token(secret) is None
        assert hub.check_token(quiet.strip()).name == "ci"
