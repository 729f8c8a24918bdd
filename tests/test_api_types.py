"""The typed public API: ``py.typed`` in the wheel, every result and error type importable
from ``lorahub`` (without making ``import lorahub`` heavy), a ``to_dict()`` on every result
giving strict JSON, and timezone-aware UTC datetimes in results and in the catalog,
including a catalog made before they were (revision 0002)."""

from __future__ import annotations

import inspect
import json
import sqlite3
import subprocess
import sys
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import lorahub
from lorahub import errors
from lorahub.catalog import db, lite

ROOT = Path(__file__).resolve().parent.parent
RESULT_TYPES = (
    "AdapterInfo",
    "AddResult",
    "BaseInfo",
    "MergedInfo",
    "MergeResult",
    "CompatReport",
    "ComposeResult",
    "PushResult",
    "VerifyReport",
    "GcReport",
    "FsckReport",
)
# (table, column) of every timestamp the catalog keeps.
TIMESTAMPS = (
    ("blobs", "created_at"),
    ("base_models", "created_at"),
    ("adapters", "created_at"),
    ("refs", "created_at"),
    ("merged", "created_at"),
    ("merged", "last_used_at"),
)


# ------------------------------------------------------------------ exports


def test_every_error_class_is_exported_from_the_package():
    defined = {
        name
        for name, value in vars(errors).items()
        if inspect.isclass(value) and issubclass(value, errors.LorahubError)
    }
    assert defined >= {"NotFound", "InvalidInput", "Conflict", "CorruptData", "StoreError"}
    missing = sorted(defined - set(lorahub.__all__))
    assert not missing, f"errors not exported from lorahub: {missing}"
    for name in defined:
        assert getattr(lorahub, name) is getattr(errors, name)


def test_every_result_type_is_exported_and_has_to_dict():
    for name in RESULT_TYPES:
        assert name in lorahub.__all__
        cls = getattr(lorahub, name)
        assert cls.__name__ == name
        assert callable(getattr(cls, "to_dict", None)), f"{name} has no to_dict()"
    for name in lorahub.__all__:
        assert getattr(lorahub, name) is not None
    assert set(lorahub.__all__) <= set(dir(lorahub))
    with pytest.raises(AttributeError):
        _ = lorahub.NoSuchThing


def test_import_lorahub_and_its_light_types_stays_light():
    code = (
        "import sys, lorahub\n"
        "lorahub.AdapterInfo, lorahub.GcReport, lorahub.NotFound, lorahub.StoreError\n"
        "print(sorted(m for m in ('torch', 'sqlalchemy', 'huggingface_hub', 'safetensors')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_py_typed_ships_in_the_wheel(tmp_path):
    assert (Path(lorahub.__file__).parent / "py.typed").is_file()
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)],
        check=True,
    )
    (wheel,) = dist.glob("*.whl")
    assert "lorahub/py.typed" in zipfile.ZipFile(wheel).namelist()


# ------------------------------------------------------------------ to_dict


def _strict_json(data: object) -> object:
    """``data`` through JSON with no fallback for unknown types, and back."""
    return json.loads(json.dumps(data, allow_nan=False))


def _assert_utc_iso(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    assert moment.utcoffset() == timedelta(0), text
    assert abs(datetime.now(timezone.utc) - moment) < timedelta(hours=1)
    return moment


def test_every_result_to_dict_is_strict_json_with_offset_datetimes(hub, world, tmp_path):
    added = hub.add(world / "a", name="a:v1", base=world / "llama")
    hub.add(world / "b", name="b")
    base = hub.add_base(world / "llama")
    merged = hub.merge(world / "llama", ["a:v1"], out=tmp_path / "merged")
    compat = hub.check("a:v1", base=world / "wide")
    composed = hub.compose(["a:v1", "b"], [1.0, 0.5], name="blend")
    hub.merged(world / "llama", ["b"])
    (cached,) = hub.merged_list()
    verify = hub.verify()
    gc = hub.gc(grace=0, dry_run=True)
    fsck = hub.fsck(dry_run=True)
    push = lorahub.PushResult(
        "me/a", "main", "c" * 40, "http://hub/c", "http://hub/me/a", True, 10, ("x",), "v1"
    )

    docs = {
        "AddResult": added.to_dict(),
        "AdapterInfo": added.adapter.to_dict(),
        "BaseInfo": base.to_dict(),
        "MergeResult": merged.to_dict(),
        "CompatReport": compat.to_dict(),
        "ComposeResult": composed.to_dict(),
        "MergedInfo": cached.to_dict(),
        "VerifyReport": verify.to_dict(),
        "GcReport": gc.to_dict(),
        "FsckReport": fsck.to_dict(),
        "PushResult": push.to_dict(),
    }
    assert set(docs) == set(RESULT_TYPES)
    for name, doc in docs.items():
        assert _strict_json(doc) == doc, name

    _assert_utc_iso(docs["AdapterInfo"]["created_at"])
    _assert_utc_iso(docs["BaseInfo"]["created_at"])
    _assert_utc_iso(docs["ComposeResult"]["adapter"]["created_at"])
    _assert_utc_iso(docs["MergedInfo"]["created_at"])
    _assert_utc_iso(docs["MergedInfo"]["last_used_at"])
    assert docs["MergeResult"]["path"] == str(tmp_path / "merged")
    assert docs["MergeResult"]["tensors"] == merged.tensors > 0
    assert docs["CompatReport"]["status"] == "incompatible"
    assert docs["CompatReport"]["ok"] is False
    problem = docs["CompatReport"]["problems"][0]
    assert problem["reason"] == "shape" and isinstance(problem["expected"], list)
    assert docs["VerifyReport"] == {"ok": True, "blobs": 3, "adapters": 3, "problems": []}
    assert docs["GcReport"]["dry_run"] is True and isinstance(docs["GcReport"]["blobs"], list)
    assert docs["FsckReport"]["ok"] is True and docs["FsckReport"]["dry_run"] is True
    assert docs["PushResult"]["files_uploaded"] == ["x"]


def test_cli_json_of_check_and_merge_is_the_results_to_dict(hub, run, world, tmp_path):
    hub.add(world / "a", name="a")
    report = hub.check("a", base=world / "wide")
    out = run("check", "a", "--base", world / "wide", "--json", code=None)
    assert out.exit_code != 0  # incompatible
    assert json.loads(out.stdout) == report.to_dict()

    doc = json.loads(run("merge", world / "llama", "a", "-o", tmp_path / "m", "--json").stdout)
    result = hub.merge(world / "llama", ["a"], out=tmp_path / "m2")
    expected = result.to_dict()
    for d in (doc, expected):
        d.pop("seconds")
        d.pop("path")
    assert doc == expected


def test_verify_problems_are_in_its_to_dict(hub, world):
    info = hub.add(world / "a", name="a").adapter
    from lorahub.digest import Digest

    blob = hub.blobs.path(Digest.parse(info.weights_digest))
    blob.chmod(0o644)
    with blob.open("r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe")
    doc = hub.verify().to_dict()
    assert doc["ok"] is False
    assert _strict_json(doc) == doc
    assert {p["digest"] for p in doc["problems"]} >= {info.weights_digest}


# ------------------------------------------------------------------ datetimes in the catalog


def _raw_timestamps(db_path: Path) -> dict[tuple[str, str], list[str]]:
    con = sqlite3.connect(db_path)
    try:
        return {
            (t, c): [r[0] for r in con.execute(f"SELECT {c} FROM {t} ORDER BY rowid")]
            for t, c in TIMESTAMPS
        }
    finally:
        con.close()


def _populate(store_home: Path, world: Path) -> None:
    with lorahub.open(store_home) as h:
        h.add(world / "a", name="a:v1", base=world / "llama")
        h.add(world / "b", name="b")
        h.tag("a:v1", "a:prod")
        h.add_base(world / "llama-instruct")
        h.merged(world / "llama", ["b"])


def test_catalog_keeps_utc_with_its_offset_and_both_read_paths_agree(store_home, world):
    _populate(store_home, world)
    raw = _raw_timestamps(store_home / "lorahub.db")
    for key, values in raw.items():
        assert values, key
        assert all(v.endswith("+00:00") for v in values), (key, values)

    with lorahub.open(store_home) as fast:  # the standard library's sqlite3, no SQLAlchemy
        listed = fast.list_adapters()
        assert fast._engine is None
    with lorahub.open(store_home) as orm:
        assert orm.engine is not None  # opened: reads now go through SQLAlchemy
        through_orm = orm.list_adapters()
        bases = orm.bases()
        merged = orm.merged_list()
    assert [i.created_at for i in listed] == [i.created_at for i in through_orm]
    for moment in [i.created_at for i in listed] + [b.created_at for b in bases]:
        assert moment.tzinfo is not None and moment.utcoffset() == timedelta(0)
    assert merged[0].last_used_at.utcoffset() == timedelta(0)


def test_migration_converts_a_catalog_made_by_the_previous_schema(store_home, world):
    _populate(store_home, world)
    db_path = store_home / "lorahub.db"
    with lorahub.open(store_home) as h:
        before = {i.digest: i.created_at for i in h.list_adapters()}
        bases_before = [b.created_at for b in h.bases()]
    # What revision 0001 wrote: the same text without an offset (naive, meant as UTC).
    con = sqlite3.connect(db_path)
    for table, column in TIMESTAMPS:
        con.execute(f"UPDATE {table} SET {column} = substr({column}, 1, 26)")
    con.execute("DROP INDEX ix_adapter_modules_rank")  # revision 0003's
    con.execute("DROP TABLE tokens")  # revision 0004's
    triggers = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='trigger'")]
    assert len(triggers) == 18  # revision 0005's: six tables, three kinds of change
    for trigger in triggers:
        con.execute(f"DROP TRIGGER {trigger}")
    con.execute("DROP TABLE catalog_generation")
    con.execute("DROP INDEX ix_adapters_size_id")  # revision 0006's
    con.execute("UPDATE alembic_version SET version_num = '0001'")
    con.commit()
    con.close()
    old = _raw_timestamps(db_path)
    assert all(len(v) == 26 and "+" not in v for vs in old.values() for v in vs)
    assert lite.open_current(db_path) is None  # the fast path leaves an old schema alone

    with lorahub.open(store_home) as h:
        after = {i.digest: i.created_at for i in h.list_adapters()}  # migrates on open
        bases_after = [b.created_at for b in h.bases()]
    con = sqlite3.connect(db_path)
    assert con.execute("SELECT version_num FROM alembic_version").fetchall() == [
        (lite.SCHEMA_HEAD,)
    ]
    indexes = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"ix_adapter_modules_rank", "ix_adapters_size_id"} <= indexes
    again = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='trigger'")}
    assert again == set(triggers)
    (generation,) = con.execute("SELECT n FROM catalog_generation").fetchone()
    con.close()
    assert after == before
    assert bases_after == bases_before
    new = _raw_timestamps(db_path)
    assert new == {k: [v + "+00:00" for v in vs] for k, vs in old.items()}
    conn = lite.open_current(db_path)  # the new head is current for the fast path too
    assert conn is not None
    conn.close()
    with lorahub.open(store_home) as h:
        assert {i.digest: i.created_at for i in h.list_adapters()} == before
        h.add(world / "ad2", name="late")
        assert h.list_adapters()[0].refs == ("late:latest",)  # newest first, across the change
        assert h.verify().ok
    con = sqlite3.connect(db_path)
    assert con.execute("SELECT n FROM catalog_generation").fetchone()[0] > generation
    con.close()


def test_migration_downgrade_restores_the_previous_text(tmp_path):
    from alembic import command
    from alembic.config import Config

    engine = db.make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    db.upgrade(engine, None)
    con = sqlite3.connect(tmp_path / "x.db")
    con.execute("INSERT INTO blobs VALUES ('xxh128:' || hex(randomblob(16)), 1, ?)", [_now()])
    con.commit()
    con.close()
    cfg = Config()
    cfg.set_main_option("script_location", str(db.migrations_dir()))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
    (value,) = _raw_timestamps(tmp_path / "x.db")[("blobs", "created_at")]
    assert len(value) == 26 and "+" not in value
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    (value,) = _raw_timestamps(tmp_path / "x.db")[("blobs", "created_at")]
    assert value.endswith("+00:00")
    assert db.current_revision(engine) == lite.SCHEMA_HEAD == "0006"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f+00:00")
