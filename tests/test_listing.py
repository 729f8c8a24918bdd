"""Reading the catalog at scale: listings parse no manifest, shape checks need no torch, and
the commands that read (ls, show, resolve) never import torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from factories import write_peft_adapter

import lorahub
from lorahub import compat
from lorahub.base import open_base
from lorahub.digest import canonical_json
from lorahub.info import config_of, provenance_of
from lorahub.manifest import skeleton

# A program that runs one CLI command and then says which heavy modules it imported.
PROBE = """
import sys
from lorahub.cli import main
sys.argv = ["lorahub", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    if exc.code:
        raise
heavy = sorted(m for m in ("torch", "sqlalchemy") if m in sys.modules)
print("imported: " + (",".join(heavy) or "nothing heavy"), file=sys.stderr)
"""


def test_reading_commands_import_neither_torch_nor_sqlalchemy(world, store_home, tmp_path):
    """`import sqlalchemy` alone takes longer than `show` may take in all (0.3 s)."""
    with lorahub.open(store_home) as hub:
        hub.add_base(world / "llama", name="tiny-base")
        info = hub.add(world / "dora-ad", name="sql:v1", base=world / "llama").adapter
        hub.add(write_peft_adapter(tmp_path / "plain"), name="plain:v1")

    def run(*args: str) -> str:
        # cwd: a folder without "tiny-base" in it, so the name is the recorded base's.
        res = subprocess.run(
            [sys.executable, "-c", PROBE, "--home", str(store_home), *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert res.returncode == 0, res.stderr
        assert res.stderr.strip().endswith("imported: nothing heavy"), (args, res.stderr)
        return res.stdout

    listing = run("ls")
    assert "sql:v1" in listing and "plain:v1" in listing
    assert info.digest in {a["digest"] for a in json.loads(run("ls", "--json"))}
    assert info.digest in run("show", "sql:v1")
    assert run("resolve", "sql:v1", "--base", "tiny-base").split()[0] == info.digest
    assert run("check", "sql:v1", "--base", "tiny-base").startswith("exact")
    fits = json.loads(run("ls", "--json", "--base", "tiny-base"))
    assert [a["refs"] for a in fits] == [["sql:v1"]]  # plain:v1 needs a [32, 32] v_proj
    assert run("--help")


def test_skeleton_checks_like_the_real_adapter(hub, world):
    """The shape-only skeleton gives the very report the adapter's real tensors give."""
    info = hub.add(world / "dora-ad", name="d").adapter
    real = hub.load("d")
    assert real.modules and any(m.magnitude is not None for m in real.modules.values())
    assert real.full or any(m.kind == "embedding" for m in real.modules.values())
    shaped = skeleton(info.manifest)
    assert "torch" not in type(next(iter(shaped.modules.values())).A).__module__
    for base in ("llama", "wide"):
        tensors = open_base(world / base).tensors
        want = compat.check(real, tensors, content_hash="xxh128:" + "0" * 32)
        got = compat.check(shaped, tensors, content_hash="xxh128:" + "0" * 32)
        assert got == want
        assert got.status == ("compatible" if base == "llama" else "incompatible")
    assert got.problems and all(p.expected for p in got.problems)


def test_listing_parses_no_manifest_and_keeps_every_field(hub, tmp_path):
    for i in range(3):
        hub.add(write_peft_adapter(tmp_path / f"a{i}", seed=i), name=f"a{i}:v1")
    listed = hub.list_adapters()
    rows = [i.to_dict() for i in listed]
    assert all("manifest" not in i.__dict__ for i in listed)  # never parsed
    for info, row in zip(listed, rows, strict=True):
        full = hub.get(info.digest).to_dict(manifest=True)
        assert row == {k: v for k, v in full.items() if k != "manifest"}
        assert row["provenance"] == json.loads(info.manifest_text)["provenance"]
        assert row["origin"]["format"] == "peft-safetensors" and row["refs"]


@pytest.mark.parametrize(
    "provenance",
    [
        {"kind": "import"},
        {"kind": "compose", "parents": ["xxh128:" + "a" * 32], "weights": [1.0, 0.5]},
        {"kind": "compose", "params": {"provenance": {"kind": "x"}, "schema": 9}},
        {"kind": "pull", "note": ',"provenance":{"kind":"fake"},"schema":2'},
        {"kind": "x", "list": [{"provenance": 1}, {"provenance": {"provenance": []}}]},
    ],
)
def test_provenance_of_reads_only_the_top_level_value(provenance):
    manifest = {
        "base": {"name": "tiny/llama"},
        "config": {"r": 4, "provenance": {"kind": "in-config"}, "note": '"provenance":1'},
        "full": {},
        "modules": {"m.q_proj": {"provenance": {"kind": "in-modules"}}},
        "provenance": provenance,
        "schema": 2,
        "weights": {"digest": "xxh128:" + "b" * 32, "size": 10},
    }
    text = canonical_json(manifest).decode()
    assert provenance_of(text) == provenance
    # Not the tail `manifest.build` writes (another key last): parsed whole, same answer.
    odd = canonical_json({**manifest, "zzz": {"provenance": {"kind": "no"}}}).decode()
    assert provenance_of(odd) == provenance
    assert provenance_of(canonical_json({"schema": 2}).decode()) == {}


@pytest.mark.parametrize(
    "manifest",
    [
        {"base": {"name": "t", "x": ["config", {"config": 1}]}, "config": {"r": 4, "a": [1]}},
        {"config": {"target_modules": ["q"], "config": {"nested": True}}, "modules": {}},
        {"base": {}, "config": {}, "modules": {"m": {"config": "no"}}},
        {"base": {"name": '","config":{"fake":1}'}, "config": {"real": 1}},
        {"base": {}, "modules": {"config": 1}},  # no config at all
        {"a": 1, "base": {}, "config": {"r": 8}},  # another key before it
    ],
)
def test_config_of_reads_only_the_top_level_config(manifest):
    """The config of a manifest of any shape, as a full parse gives it, without decoding
    the modules (a module value that is not JSON never reaches the decoder)."""
    text = canonical_json(manifest).decode()
    assert config_of(text) == manifest.get("config", {})
    if "modules" in manifest and "config" in manifest:
        broken = text.replace('"modules":', '"modules":not json,', 1)
        assert config_of(broken) == manifest["config"]


def test_the_plain_sqlite_reads_answer_as_the_engine_does(world, store_home, tmp_path):
    """Read commands use the standard library's sqlite3 until the engine is open; both
    must give the same infos (types included: booleans, datetimes, refs, variants)."""
    with lorahub.open(store_home) as hub:
        hub.add_base(world / "llama", name="tiny-base")
        hub.add(world / "dora-ad", name="sql:v1", base=world / "llama")
        hub.add(write_peft_adapter(tmp_path / "plain"), name="plain:v1")
        hub.tag("plain:v1", "plain:prod")

    def answers(hub):
        return (
            hub.list_adapters(),
            hub.list_adapters(["dora=true"]),
            hub.list_adapters(["target=q_proj", "rank=4"], limit=1),
            hub.get("plain:prod"),
            hub.resolve("sql:v1", base="tiny-base"),
            hub.check("sql:v1", base="tiny-base"),
        )

    with lorahub.open(store_home) as hub:
        fast = answers(hub)
        assert hub._engine is None  # answered without SQLAlchemy
        hub.engine  # noqa: B018 - from here on, through the engine
        slow = answers(hub)
    assert fast == slow
    assert fast[1][0].use_dora is True and fast[0][0].created_at == slow[0][0].created_at
