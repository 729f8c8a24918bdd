"""The store survives a lost or damaged catalog, damaged blobs and links: gc, verify, fsck."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from attackkit import corrupt_index, damage_page
from factories import write_peft_adapter

import lorahub
from lorahub import upkeep
from lorahub.errors import BlobCollision, IntegrityError, StoreError

# Each test runs on the SQLite and the PostgreSQL catalog (conftest.py's ``catalog``).
pytestmark = pytest.mark.usefixtures("catalog")


def _fill(hub, tmp_path, n=4):
    infos = [
        hub.add(write_peft_adapter(tmp_path / f"src{i}", seed=i), name=f"a{i}:v1").adapter
        for i in range(n)
    ]
    hub.tag("a0:v1", "a0:prod")
    return infos


def _drop_catalog(hub, how="delete"):
    """Lose the catalog: its SQLite file deleted or emptied; on PostgreSQL, every table."""
    hub.close()
    url = os.environ.get("LORAHUB_DATABASE_URL")
    if url:
        from sqlalchemy import create_engine

        engine = create_engine(url)
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        engine.dispose()
        return
    db = hub.home / "lorahub.db"
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    if how == "delete":
        db.unlink()
    else:
        db.write_bytes(b"")


def _blob_count(hub):
    return sum(1 for _ in hub.blobs)


@pytest.mark.parametrize("how", ["delete", "truncate"])
def test_a_lost_catalog_is_refused_then_rebuilt_with_names(hub, tmp_path, how):
    infos = _fill(hub, tmp_path)
    hub.remove("a3:v1")
    blobs_before = _blob_count(hub)
    _drop_catalog(hub, how)

    fresh = lorahub.Hub(hub.home)
    for call in (fresh.list_adapters, lambda: fresh.gc(grace=0)):
        with pytest.raises(StoreError, match="lorahub fsck"):
            call()
    assert _blob_count(fresh) == blobs_before  # nothing deleted

    report = fresh.fsck()
    assert set(report.adapters_restored) == {i.digest for i in infos[:3]}
    assert report.ok
    listed = {i.digest: set(i.refs) for i in fresh.list_adapters()}
    assert listed == {
        infos[0].digest: {"a0:v1", "a0:prod"},
        infos[1].digest: {"a1:v1"},
        infos[2].digest: {"a2:v1"},
    }
    assert fresh.get("a0:prod").origin["path"] == infos[0].origin["path"]
    assert fresh.get("a0:v1").created_at == infos[0].created_at
    assert fresh.verify().ok
    fresh.close()


@pytest.mark.sqlite_only  # the catalog's SQLite file itself
def test_fsck_through_the_cli_restores_and_a_second_run_finds_nothing(run, store_home, tmp_path):
    run("add", write_peft_adapter(tmp_path / "x"), "--name", "x:v1")
    (store_home / "lorahub.db").unlink()
    res = run("ls", code=1)
    assert "lorahub fsck" in res.stderr and "Traceback" not in res.output
    res = run("fsck", "--dry-run")
    assert "would restore adapter" in res.stdout
    run("fsck")
    assert "x:v1" in run("ls").stdout
    assert "0 repair(s)" in run("fsck").stdout


def test_bases_come_back_from_their_records(hub, world):
    recorded = hub.add_base(world / "llama", name="tiny")
    _drop_catalog(hub)
    fresh = lorahub.Hub(hub.home)
    report = fresh.fsck()
    assert report.bases_restored == ("tiny",)
    (base,) = fresh.bases()
    assert (base.name, base.signature, base.content_hash) == (
        recorded.name,
        recorded.signature,
        recorded.content_hash,
    )
    fresh.close()


@pytest.mark.sqlite_only  # the catalog's SQLite file itself
def test_a_committed_add_the_catalog_lost_keeps_its_blob_and_comes_back(hub, tmp_path):
    """A damaged WAL drops a committed transaction: the row is gone, the files are not."""
    keep = hub.add(write_peft_adapter(tmp_path / "k", seed=1), name="keep").adapter
    lost = hub.add(write_peft_adapter(tmp_path / "l", seed=2), name="lost:v1").adapter
    hub.close()
    con = sqlite3.connect(hub.home / "lorahub.db")
    con.execute("PRAGMA foreign_keys=ON")
    con.execute("DELETE FROM adapters WHERE digest = ?", (lost.digest,))
    con.commit()
    con.close()
    old = time.time() - 7200
    for path in hub.home.rglob("*"):
        if path.is_file():
            os.utime(path, (old, old))

    report = hub.gc(grace=60)
    assert report.blobs == () and lost.digest in report.unrecorded
    assert any(v.problem.endswith("run `lorahub fsck`") for v in hub.verify().problems)
    assert hub.fsck().adapters_restored == (lost.digest,)
    assert hub.get("lost:v1").digest == lost.digest and hub.get("keep").digest == keep.digest
    assert hub.verify().ok


@pytest.mark.sqlite_only  # the catalog's SQLite file itself
def test_gc_refuses_an_empty_catalog_over_blobs_no_record_explains(hub, tmp_path):
    """A store made before manifests were kept, whose catalog was emptied: nothing on disk
    says the blobs are garbage, so gc deletes none of them unless forced."""
    _fill(hub, tmp_path, n=2)
    hub.close()
    con = sqlite3.connect(hub.home / "lorahub.db")
    con.execute("PRAGMA foreign_keys=ON")
    con.execute("DELETE FROM adapters")
    con.commit()
    con.close()
    for p in (hub.home / "manifests").rglob("*"):
        if p.is_file():
            p.unlink()
    (hub.home / "journal.log").unlink()
    with pytest.raises(StoreError, match="lists no adapters"):
        hub.gc(grace=0)
    assert _blob_count(hub) == 2
    assert len(hub.gc(grace=0, force=True).blobs) == 2


def test_gc_refuses_to_delete_most_of_the_store_when_no_removal_explains_it(hub, tmp_path):
    big = write_peft_adapter(tmp_path / "big", r=16, seed=3)
    hub.add(write_peft_adapter(tmp_path / "small"), name="small")
    # An unrecorded big blob (no manifest names it), as an old store's lost adapter would be.
    hub.blobs.put_file(lambda p: p.write_bytes((big / "adapter_model.safetensors").read_bytes()))
    with pytest.raises(StoreError, match="% of the store"):
        hub.gc(grace=0)
    assert len(hub.gc(grace=0, force=True).blobs) == 1


def test_removed_adapters_are_collected_without_force(hub, tmp_path):
    infos = _fill(hub, tmp_path, n=3)
    for name in ("a0:v1", "a0:prod", "a1:v1", "a2:v1"):
        hub.remove(name)
    report = hub.gc(grace=0)
    assert set(report.blobs) == {i.weights_digest for i in infos}
    assert _blob_count(hub) == 0
    assert list(hub.records.manifest_digests()) == []  # removed adapters' manifests go too
    assert hub.verify().ok


@pytest.mark.sqlite_only  # the catalog's SQLite file itself
def test_one_changed_byte_in_the_weights_index_never_costs_a_live_blob(hub, tmp_path):
    infos = _fill(hub, tmp_path, n=2)
    hub.close()
    corrupt_index(hub.home / "lorahub.db", "ix_adapters_weights_digest")  # one digest changed
    with pytest.raises(StoreError, match="fsck"):
        hub.gc(grace=0)
    assert {p.what for p in hub.verify().problems} >= {"catalog"}
    report = hub.fsck()
    assert report.reindexed and report.catalog_set_aside is None
    assert hub.gc(grace=0).blobs == ()
    for info in infos:
        assert hub.blobs.exists(lorahub.digest.Digest.parse(info.weights_digest))
    assert hub.verify().ok


def test_an_interrupted_gc_leaves_verify_clean(hub, tmp_path, monkeypatch):
    infos = _fill(hub, tmp_path, n=3)
    for name in ("a1:v1", "a2:v1"):
        hub.remove(name)
    real_unlink = Path.unlink
    calls = []

    def unlink_then_die(self, *a, **kw):
        if "blobs" in self.parts:
            calls.append(self)
            if len(calls) == 2:
                raise KeyboardInterrupt  # Ctrl-C between two deletions
        return real_unlink(self, *a, **kw)

    monkeypatch.setattr(Path, "unlink", unlink_then_die)
    with pytest.raises(KeyboardInterrupt):
        hub.gc(grace=0)
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert hub.verify().ok  # rows went first: a surviving file is only garbage
    hub.gc(grace=0)
    assert {str(b.digest) for b in hub.blobs} == {infos[0].weights_digest}


def test_a_damaged_blob_is_replaced_by_adding_the_adapter_again(hub, tmp_path):
    src = write_peft_adapter(tmp_path / "a")
    info = hub.add(src, name="a").adapter
    blob = hub.blobs.path(lorahub.digest.Digest.parse(info.weights_digest))
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="add the adapter again"):
        hub.load("a")
    assert hub.add(src, name="a").status == "present"
    assert hub.verify().ok and hub.load("a") is not None


def test_fsck_fetches_a_damaged_blob_again_or_quarantines_it(hub, tmp_path):
    a = hub.add(write_peft_adapter(tmp_path / "a", seed=1), name="a").adapter
    gone_src = write_peft_adapter(tmp_path / "b", seed=2)
    b = hub.add(gone_src, name="b").adapter
    for info in (a, b):
        blob = hub.blobs.path(lorahub.digest.Digest.parse(info.weights_digest))
        blob.write_bytes(blob.read_bytes()[:-1] + b"\0")
    for f in gone_src.iterdir():
        f.unlink()
    report = hub.fsck()
    assert report.blobs_repaired == (a.weights_digest,)
    assert report.blobs_quarantined == (b.weights_digest,)
    assert not report.ok and "b" in report.unrecovered[0]
    hexpart = b.weights_digest.split(":")[1]
    assert (hub.home / "quarantine" / hexpart).is_file()  # kept, never deleted
    assert hub.load("a") is not None


def test_bytes_that_collide_with_a_stored_blob_are_refused(hub, tmp_path, monkeypatch):
    """xxh3 is not cryptographic: simulate a crafted collision by making two different
    files hash alike, and check the stored blob wins and the error names both sides."""
    from lorahub import blobs as blobs_mod
    from lorahub.digest import Digest

    first = hub.add(write_peft_adapter(tmp_path / "first", seed=1), name="first").adapter
    fixed = Digest.parse(first.weights_digest)
    real_stream = blobs_mod.hash_stream
    monkeypatch.setattr(blobs_mod, "hash_stream", lambda f: (fixed, real_stream(f)[1]))
    monkeypatch.setattr(blobs_mod, "hash_file", lambda p: (fixed, Path(p).stat().st_size))
    before = hub.blobs.path(fixed).read_bytes()
    with pytest.raises(BlobCollision) as err:
        hub.add(write_peft_adapter(tmp_path / "evil", seed=2), name="evil")
    message = str(err.value)
    assert str(tmp_path / "evil") in message and "first" in message
    assert hub.blobs.path(fixed).read_bytes() == before
    assert [i.refs for i in hub.list_adapters()] == [("first:latest",)]


def test_a_store_folder_linked_out_of_the_store_is_refused(run, store_home, tmp_path, monkeypatch):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    victim = outside / "old-file"
    victim.write_text("precious")
    os.utime(victim, (1, 1))
    store_home.mkdir()
    (store_home / "tmp").symlink_to(outside)
    with pytest.raises(StoreError, match="LORAHUB_ALLOW_SYMLINKS"):
        lorahub.Hub(store_home)
    res = run("gc", "--grace", "0", code=1)
    assert "is a link to" in res.stderr
    assert victim.read_text() == "precious"
    monkeypatch.setenv("LORAHUB_ALLOW_SYMLINKS", "1")
    lorahub.Hub(store_home).close()  # on purpose: allowed


def test_gc_removes_links_in_tmp_without_following_them(hub, tmp_path):
    target = tmp_path / "outside.txt"
    target.write_text("keep me")
    link = hub.home / "tmp" / "blob-link"
    link.symlink_to(target)
    os.utime(link, (1, 1), follow_symlinks=False)
    os.utime(target, (1, 1))
    report = hub.gc(grace=60)
    assert str(link) in report.temp_files and not link.is_symlink()
    assert target.read_text() == "keep me"


def test_a_linked_merge_lock_is_an_error_not_a_traceback(tmp_path):
    from lorahub.layout import merged_lock

    merged = tmp_path / "merged"
    (merged / ".locks").mkdir(parents=True)
    (merged / ".locks" / "ab.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StoreError, match="is a link"), merged_lock(merged, "xxh128:ab" + "0" * 30):
        pass


def test_gc_collects_merge_leftovers_but_not_live_ones(hub):
    merged = hub.home / "merged"
    dead = merged / f".{'a' * 32}.partial-999999999-0123abcd"
    live = merged / f".{'b' * 32}.partial-{os.getpid()}-0123abcd"
    old = merged / f".{'c' * 32}.old-999999999-0123abcd"
    lock = merged / f"{'d' * 32}.lock"
    young = merged / f".{'e' * 32}.partial-999999999-0123abcd"
    for d in (dead, live, old, young):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 10)
    lock.write_bytes(b"")
    for p in (dead, live, old, lock):
        os.utime(p, (1, 1))
    report = hub.gc(grace=3600)
    assert set(report.temp_files) == {str(dead), str(old), str(lock)}
    assert live.is_dir() and young.is_dir() and not dead.exists() and not lock.exists()


def test_gc_at_grace_zero_waits_for_a_write_in_flight(hub):
    entered, release = threading.Event(), threading.Event()
    tmp_file = hub.home / "tmp" / "blob-inflight"

    def writer():
        with hub.blobs.writing():
            tmp_file.write_bytes(b"half written")
            os.utime(tmp_file, (1, 1))
            entered.set()
            release.wait(10)
            assert tmp_file.read_bytes() == b"half written"  # gc did not take it
            tmp_file.unlink()

    t = threading.Thread(target=writer)
    t.start()
    entered.wait(10)
    done = []
    g = threading.Thread(target=lambda: done.append(hub.gc(grace=0)))
    g.start()
    g.join(0.5)
    assert g.is_alive()  # waiting on the writers' lock
    release.set()
    t.join(10)
    g.join(10)
    assert done and str(tmp_file) not in done[0].temp_files


def test_add_recursive_goes_on_past_a_bad_adapter_and_names_a_missing_config(run, tmp_path):
    pile = tmp_path / "pile"
    write_peft_adapter(pile / "a-good", seed=1)
    bad = write_peft_adapter(pile / "b-bad", seed=2)
    (bad / "adapter_config.json").write_text('{"r": ' + "9" * 5000 + "}")
    headless = write_peft_adapter(pile / "c-noconfig", seed=3)
    (headless / "adapter_config.json").unlink()
    write_peft_adapter(pile / "d-good", seed=4)
    res = run("add", "-r", pile, code=1)
    assert res.stdout.count("added") == 2
    assert "c-noconfig has adapter_model.safetensors but no adapter_config.json" in res.stderr
    assert "b-bad" in res.stderr and "Traceback" not in res.output


def test_a_folder_with_weights_but_no_config_says_so(run, tmp_path):
    folder = write_peft_adapter(tmp_path / "nocfg")
    (folder / "adapter_config.json").unlink()
    res = run("add", folder, code=1)
    assert "no adapter_config.json" in res.stderr and "--recursive" not in res.stderr


@pytest.mark.sqlite_only  # the catalog's SQLite file itself
def test_a_damaged_catalog_file_names_fsck_which_sets_it_aside(hub, run, tmp_path):
    infos = _fill(hub, tmp_path, n=2)
    hub.close()
    db = hub.home / "lorahub.db"
    db.write_bytes(b"this is not a database" * 100)
    res = run("ls", code=1)
    assert "lorahub fsck" in res.stderr
    report = lorahub.Hub(hub.home).fsck()
    assert report.catalog_set_aside and Path(report.catalog_set_aside).read_bytes().startswith(
        b"this is not"
    )
    assert {i.digest for i in lorahub.Hub(hub.home).list_adapters()} == {i.digest for i in infos}


def test_an_older_store_gets_its_records_written_once(hub, tmp_path):
    infos = _fill(hub, tmp_path, n=2)
    hub.close()
    for p in sorted((hub.home / "manifests").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (hub.home / "journal.log").unlink()
    reopened = lorahub.Hub(hub.home)
    reopened.list_adapters()
    assert {d for d, _ in reopened.records.manifest_digests()} == {i.digest for i in infos}
    _drop_catalog(reopened)
    again = lorahub.Hub(hub.home)
    again.fsck()
    assert {r for i in again.list_adapters() for r in i.refs} == {"a0:v1", "a0:prod", "a1:v1"}


def _abandon_an_add(hub, src):
    """What an add killed before its commit leaves: the blob and the manifest, no row."""
    from lorahub.formats import peft

    adapter = peft.read_peft_dir(src)
    weights, size = hub.blobs.put_file(lambda p: peft.write_canonical(adapter, p))
    text = lorahub.manifest.encode(
        lorahub.manifest.build(adapter, weights, size, lorahub.manifest.claimed_base(adapter))
    ).decode()
    digest = str(lorahub.digest.hash_bytes(text.encode()))
    hub.records.put_manifest(digest, text)
    old = time.time() - 7200
    for path in (
        hub.blobs.path(weights),
        hub.records.manifests.path(lorahub.digest.Digest.parse(digest)),
    ):
        os.utime(path, (old, old))
    return digest, str(weights)


def test_an_add_that_never_committed_is_garbage_not_a_lost_adapter(hub, tmp_path):
    keep = hub.add(write_peft_adapter(tmp_path / "k", seed=1), name="keep").adapter
    digest, weights = _abandon_an_add(hub, write_peft_adapter(tmp_path / "x", seed=2))
    assert hub.verify().ok  # not reported as lost: the journal never confirmed it
    report = hub.fsck()
    assert report.adapters_restored == () and any("never committed" in n for n in report.notes)
    assert hub.gc(grace=60).blobs == (weights,)
    assert hub.records.manifest_text(digest) is None and hub.get("keep").digest == keep.digest
    assert hub.verify().ok


def test_without_a_journal_every_manifest_counts(hub, tmp_path):
    hub.add(write_peft_adapter(tmp_path / "k", seed=1), name="keep")
    digest, _ = _abandon_an_add(hub, write_peft_adapter(tmp_path / "x", seed=2))
    (hub.home / "journal.log").unlink()
    assert hub.gc(grace=60).blobs == ()  # nothing says it is garbage: kept
    assert hub.fsck().adapters_restored == (digest,)


def test_a_torn_journal_line_never_swallows_the_next_event(hub, tmp_path):
    with open(hub.home / "journal.log", "ab") as f:
        f.write(b'{"op": "add", "digest": "xxh128:')  # a write cut short by a crash
    info = hub.add(write_peft_adapter(tmp_path / "a"), name=None).adapter
    assert upkeep.recorded(hub.records).status(info.digest) == "live"
    _drop_catalog(hub)
    fresh = lorahub.Hub(hub.home)
    assert fresh.fsck().adapters_restored == (info.digest,)
    assert fresh.gc(grace=0).blobs == ()


def test_an_add_whose_confirmation_was_lost_still_counts(hub, tmp_path):
    """Killed between its commit and the journal's confirmation: the add stands."""
    info = hub.add(write_peft_adapter(tmp_path / "a"), name="a").adapter
    journal = hub.home / "journal.log"
    journal.write_text(
        "".join(line for line in journal.read_text().splitlines(True) if '"commit"' not in line)
    )
    _drop_catalog(hub)
    fresh = lorahub.Hub(hub.home)
    assert fresh.fsck().adapters_restored == (info.digest,)
    # its name's commit is unconfirmed: not moved on doubt
    assert fresh.list_adapters()[0].refs == ()


def test_fsck_holds_the_write_lock_so_a_racing_rm_is_not_undone(hub, tmp_path, monkeypatch):
    _fill(hub, tmp_path, n=2)
    other = lorahub.Hub(hub.home)
    real = upkeep.replay_records
    racer: list[threading.Thread] = []

    def replay_then_race(records, blobs):
        out = real(records, blobs)
        t = threading.Thread(target=lambda: other.remove("a1:v1"))
        t.start()  # waits for fsck's write lock, then removes
        racer.append(t)
        time.sleep(0.3)
        return out

    monkeypatch.setattr(upkeep.repair, "replay_records", replay_then_race)
    report = hub.fsck()
    racer[0].join(30)
    assert report.adapters_restored == ()
    with pytest.raises(lorahub.errors.AdapterNotFound):
        hub.get("a1:v1")
    other.close()


@pytest.mark.sqlite_only  # the catalog's SQLite file itself
def test_a_name_the_catalog_lost_a_move_of_is_left_to_a_person(hub, tmp_path):
    x = hub.add(write_peft_adapter(tmp_path / "x", seed=1), name="a:v1").adapter
    hub.close()
    db = hub.home / "lorahub.db"
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    before = db.read_bytes()
    y = hub.add(write_peft_adapter(tmp_path / "y", seed=2), name="a:v1").adapter
    hub.close()
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    db.write_bytes(before)  # the commit that moved a:v1 to y is lost
    report = hub.fsck()
    assert report.adapters_restored == (y.digest,)
    assert not report.ok and f"lorahub tag @{y.digest} a:v1" in report.unrecovered[0]
    assert hub.get("a:v1").digest == x.digest  # nothing moved without a person


@pytest.mark.sqlite_only  # the catalog's SQLite file itself
def test_a_damaged_catalog_page_is_an_error_naming_fsck_for_every_command(hub, run, tmp_path):
    _fill(hub, tmp_path, n=2)
    hub.close()
    damage_page(hub.home / "lorahub.db", "adapters")
    for args in (["ls"], ["ls", "--json"], ["show", "a0:v1"], ["gc"], ["verify"]):
        res = run(*args, code=1)
        assert "Traceback" not in res.output + res.stderr, args
        assert "Error:" in res.stderr or "BAD catalog" in res.stderr, (args, res.stderr)


def test_a_lone_surrogate_in_lorahub_json_is_refused(hub, tmp_path):
    folder = write_peft_adapter(tmp_path / "a")
    (folder / "lorahub.json").write_text('{"digest": "xxh128:00", "manifest": {"a": "\\ud800"}}')
    with pytest.raises(lorahub.errors.InvalidAdapter, match=r"lorahub\.json"):
        hub.add(folder)


def test_a_linked_writers_lock_is_an_error_not_a_traceback(hub, run, tmp_path):
    (hub.home / ".tmp.lock").unlink(missing_ok=True)
    (hub.home / ".tmp.lock").symlink_to(tmp_path / "elsewhere")
    res = run("gc", code=1)
    assert "remove it" in res.stderr and "Traceback" not in res.output


def test_a_blob_gc_deletes_while_an_add_compares_it_is_published_again(hub, tmp_path, monkeypatch):
    from lorahub import blobs as blobs_mod

    src = write_peft_adapter(tmp_path / "a")
    first = hub.add(src, name="a").adapter
    hub.remove("a")
    real = blobs_mod._same_bytes

    def gc_strikes_first(a, b, *args):
        Path(b).unlink()  # gc's unlink lands between the add's lstat and its read
        return real(a, b, *args)

    monkeypatch.setattr(blobs_mod, "_same_bytes", gc_strikes_first)
    again = hub.add(src, name="a").adapter
    monkeypatch.setattr(blobs_mod, "_same_bytes", real)
    assert again.weights_digest == first.weights_digest
    assert hub.verify().ok and hub.load("a") is not None
