"""The store through the Python API: identity, references, import formats, bad input."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from factories import write_peft_adapter
from safetensors.torch import load_file

import lorahub
from lorahub.errors import (
    AdapterNotFound,
    AmbiguousReference,
    IntegrityError,
    InvalidAdapter,
    InvalidReference,
    LorahubError,
)

# Each test runs on the SQLite and the PostgreSQL catalog (conftest.py's ``catalog``).
pytestmark = pytest.mark.usefixtures("catalog")


def store_files(hub) -> dict[str, bytes]:
    """Every file in the store but the database's WAL side files, for 'unchanged' checks."""
    out = {}
    for p in sorted(hub.home.rglob("*")):
        if p.is_file() and "lorahub.db" not in p.name and not p.name.endswith(".lock"):
            out[str(p.relative_to(hub.home))] = p.read_bytes()
    return out


def snapshot(hub):
    return store_files(hub), [(i.digest, i.refs) for i in hub.list_adapters()]


def test_add_records_queryable_columns_and_blob_layout(hub, tmp_path):
    src = write_peft_adapter(tmp_path / "a", r=4, alpha=8)
    res = hub.add(src, name="sql-expert:v1")
    info = res.adapter
    assert res.status == "added"
    assert info.refs == ("sql-expert:v1",)
    assert (info.rank, info.alpha, info.module_count) == (4, 8.0, 4)
    assert info.targets == ("q_proj", "v_proj")
    assert info.base.name == "tiny/llama" and not info.base.verified
    assert info.digest.startswith("xxh128:") and len(info.digest) == 39
    hexd = info.weights_digest.split(":")[1]
    blob = hub.home / "blobs" / "xxh128" / hexd[:2] / hexd[2:]
    assert blob.is_file() and blob.stat().st_size == info.size
    assert hub.list_adapters(["rank=4", "target=q_proj"])[0].digest == info.digest
    assert hub.list_adapters(["rank=16"]) == []
    assert hub.list_adapters(["target=k_proj"]) == []
    assert hub.list_adapters({"module": "model.layers.1.self_attn.v_proj"})[0].digest == info.digest


def test_hub_list_is_a_deprecated_alias_of_list_adapters(hub, tmp_path):
    src = write_peft_adapter(tmp_path / "a")
    info = hub.add(src, name="a").adapter
    with pytest.warns(DeprecationWarning, match="list_adapters"):
        listed = hub.list(["rank=4"])
    assert [i.digest for i in listed] == [info.digest]
    assert listed == hub.list_adapters(["rank=4"])


def test_same_adapter_from_bin_and_safetensors_has_one_digest(hub, tmp_path):
    a = hub.add(write_peft_adapter(tmp_path / "st", fmt="safetensors")).adapter
    b = hub.add(write_peft_adapter(tmp_path / "bin", fmt="bin"), name="other").adapter
    assert a.digest == b.digest
    assert len(list(hub.blobs)) == 1


def test_changing_alpha_changes_digest_and_shares_weights(hub, tmp_path):
    a = hub.add(write_peft_adapter(tmp_path / "a", alpha=8)).adapter
    b = hub.add(write_peft_adapter(tmp_path / "b", alpha=16)).adapter
    assert a.digest != b.digest
    assert a.weights_digest == b.weights_digest
    assert len(list(hub.blobs)) == 1


def test_incidental_config_differences_keep_one_digest(hub, tmp_path):
    """PEFT writes target_modules from a set (its order varies between saves), stamps its
    own version and mode, and alpha may be 16 or 16.0: none of that changes the adapter."""
    mods = {"model.layers.0.self_attn.q_proj": (32, 32), "model.layers.0.mlp.up_proj": (32, 64)}
    one = write_peft_adapter(
        tmp_path / "one", mods, alpha=16,
        extra_config={"target_modules": ["q_proj", "up_proj"], "peft_version": "0.17.0"},
    )  # fmt: skip
    two = write_peft_adapter(
        tmp_path / "two", mods, alpha=16.0,
        extra_config={
            "target_modules": ["up_proj", "q_proj"], "peft_version": "0.18.1",
            "inference_mode": True,
        },
    )  # fmt: skip
    a = hub.add(one).adapter
    b = hub.add(two).adapter
    assert a.digest == b.digest
    other = write_peft_adapter(tmp_path / "three", mods, alpha=16, extra_config={"lora_bias": True})
    assert hub.add(other).adapter.digest != a.digest  # a real config difference still counts


def test_readding_costs_no_second_copy(hub, tmp_path):
    src = write_peft_adapter(tmp_path / "a")
    first = hub.add(src, name="x")
    blob = hub.blobs.path(lorahub.digest.Digest.parse(first.adapter.weights_digest))
    inode = blob.stat().st_ino
    second = hub.add(src, name="x:v2")
    assert second.status == "present"
    assert blob.stat().st_ino == inode
    assert sorted(second.adapter.refs) == ["x:latest", "x:v2"]
    assert list((hub.home / "tmp").iterdir()) == []


def test_named_adapter_subfolder_and_recursive_pile(hub, tmp_path):
    pile = tmp_path / "pile"
    write_peft_adapter(pile / "run1" / "final", seed=1)
    write_peft_adapter(pile / "run2" / "final", seed=2)
    (pile / "run3").mkdir(parents=True)
    (pile / "run3" / "adapter_config.json").write_text("{not json")
    results = hub.add_many([pile], recursive=True)
    by_status = {r.source: r.status for r in results}
    assert list(by_status.values()).count("added") == 2
    assert by_status[str(pile / "run3")] == "refused"
    refused = next(r for r in results if r.status == "refused")
    assert "not valid JSON" in refused.reason
    assert sorted(r for i in hub.list_adapters() for r in i.refs) == [
        "run1-final:latest",
        "run2-final:latest",
    ]
    # A PEFT save with a named adapter holds it in a subfolder named after it.
    named = tmp_path / "named-save"
    write_peft_adapter(named / "my_adapter", seed=3)
    (res,) = hub.add_many([named])
    assert res.status == "added" and res.adapter.refs == ("my_adapter:latest",)


def test_unknown_config_keys_survive_export(hub, tmp_path):
    src = write_peft_adapter(tmp_path / "a")
    hub.add(src, name="k")
    out = hub.export("k", tmp_path / "out")
    original = json.loads((src / "adapter_config.json").read_text())
    exported = json.loads((out / "adapter_config.json").read_text())
    assert exported == original
    assert exported["some_future_key"] == {"kept": True}
    a = load_file(src / "adapter_model.safetensors")
    b = load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "base_model: tiny/llama" in card


def test_export_refuses_existing_dir_unless_forced(hub, tmp_path):
    from lorahub.outputs import EXPORT_FILES

    hub.add(write_peft_adapter(tmp_path / "a"), name="k")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LorahubError, match="already exists"):
        hub.export("k", out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(LorahubError, match="lorahub replaces only its own earlier output"):
        hub.export("k", out, force=True)  # issue 10: --force never deletes files it did not write
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    hub.export("k", out)
    hub.export("k", out, force=True)
    assert sorted(os.listdir(out)) == sorted(EXPORT_FILES)


def test_references(hub, tmp_path):
    a = hub.add(write_peft_adapter(tmp_path / "a", seed=1), name="sql:v1").adapter
    hub.tag("sql:v1", "sql:prod")
    hub.tag(a.digest, "alias")
    assert hub.get("sql:prod").digest == a.digest
    assert hub.get("alias").digest == a.digest  # default tag latest
    assert hub.get("alias:latest").digest == a.digest
    assert hub.get("@" + a.digest).digest == a.digest
    assert hub.get(a.digest.split(":")[1][:12]).digest == a.digest
    assert hub.get("@" + a.digest.split(":")[1][:14]).digest == a.digest
    with pytest.raises(AdapterNotFound):
        hub.get(a.digest.split(":")[1][:8])  # below 12 hex: a name, and no such name
    with pytest.raises(AdapterNotFound, match="nope"):
        hub.get("nope")
    with pytest.raises(InvalidReference):
        hub.get("bad name!")
    with pytest.raises(InvalidReference):
        hub.get("@abc")  # too short a prefix
    # Moving a tag: sql:prod now points at b.
    b = hub.add(write_peft_adapter(tmp_path / "b", seed=2), name="sql:v2").adapter
    hub.tag("sql:v2", "sql:prod")
    assert hub.get("sql:prod").digest == b.digest
    assert "sql:prod" not in hub.get("sql:v1").refs


def test_ambiguous_prefix_lists_candidates(hub, world, tmp_path, monkeypatch):
    # Real 12-hex collisions need millions of adapters, so look up the longest prefix that 40
    # adapters share, below the parser's 12-character minimum, straight through the catalog.
    digests = {}
    seed = 0
    while len(digests) < 40:
        info = hub.add(write_peft_adapter(tmp_path / f"a{seed}", seed=seed)).adapter
        digests[info.digest] = info
        seed += 1
    hexes = sorted(d.split(":")[1] for d in digests)
    from lorahub.catalog import db
    from lorahub.catalog import queries as q
    from lorahub.refs import Reference

    def shared(pair):
        return next((i for i, (x, y) in enumerate(zip(*pair, strict=True)) if x != y), 32)

    best = max(itertools.pairwise(hexes), key=shared)
    prefix = best[0][: shared(best)]
    with db.read_session(hub.engine) as s, pytest.raises(AmbiguousReference) as err:
        q.resolve_one(s, Reference(prefix, prefix=prefix))
    assert best[0] in str(err.value) and best[1] in str(err.value)
    # Resolving for a base must not quietly pick one of them as if they were base variants.
    import lorahub.refs

    monkeypatch.setattr(lorahub.refs, "MIN_PREFIX", 1)
    with pytest.raises(AmbiguousReference):
        hub.resolve("@" + prefix, base=world / "llama")


def test_remove_name_then_adapter_then_gc(hub, tmp_path):
    a = hub.add(write_peft_adapter(tmp_path / "a"), name="x:v1").adapter
    hub.tag("x:v1", "x:v2")
    assert hub.remove("x:v1") == ["x:v1"]
    assert hub.get("x:v2").digest == a.digest
    assert hub.remove("x:v2") == ["x:v2"]
    with pytest.raises(AdapterNotFound):
        hub.get(a.digest)
    # The blob stays until gc, and gc keeps it during the grace period.
    assert hub.blobs.exists(lorahub.digest.Digest.parse(a.weights_digest))
    assert hub.gc().blobs == ()
    dry = hub.gc(grace=0, dry_run=True)
    assert dry.blobs == (a.weights_digest,) and dry.bytes_freed == a.size
    assert hub.blobs.exists(lorahub.digest.Digest.parse(a.weights_digest))
    hub.gc(grace=0)
    assert not hub.blobs.exists(lorahub.digest.Digest.parse(a.weights_digest))
    assert hub.verify().ok


def test_a_blob_gc_deletes_under_a_concurrent_add_is_written_again(hub, tmp_path):
    """gc lists an old unused blob, an add re-uses it (refreshing its mtime too late for gc's
    listing), gc deletes it, then the add commits: the add must not record a missing blob."""
    src = write_peft_adapter(tmp_path / "a")
    first = hub.add(src, name="a").adapter
    hub.remove("a")
    real = hub.blobs.put_file
    calls = []

    def put_then_gc_deletes(write, **kw):
        digest, size = real(write, **kw)
        if not calls:
            hub.blobs.delete(digest)  # gc's unlink, decided on the mtime it read earlier
        calls.append(digest)
        return digest, size

    hub.blobs.put_file = put_then_gc_deletes
    try:
        again = hub.add(src, name="a").adapter
    finally:
        del hub.blobs.put_file
    assert again.weights_digest == first.weights_digest and len(calls) == 2
    assert hub.verify().ok and hub.load("a") is not None


def test_gc_keeps_blobs_in_use_and_removes_stale_temp(hub, tmp_path):
    a = hub.add(write_peft_adapter(tmp_path / "a"), name="keep").adapter
    stale = hub.home / "tmp" / "blob-deadbeef"
    stale.write_bytes(b"partial")
    os.utime(stale, (1, 1))
    report = hub.gc(grace=60)
    assert report.blobs == () and report.temp_files == (str(stale),)
    assert not stale.exists()
    assert hub.blobs.exists(lorahub.digest.Digest.parse(a.weights_digest))


def test_verify_names_corrupt_and_missing_blobs(hub, tmp_path):
    a = hub.add(write_peft_adapter(tmp_path / "a", seed=1)).adapter
    b = hub.add(write_peft_adapter(tmp_path / "b", seed=2)).adapter
    assert hub.verify().ok
    pa = hub.blobs.path(lorahub.digest.Digest.parse(a.weights_digest))
    os.chmod(pa, 0o644)
    data = bytearray(pa.read_bytes())
    data[-1] ^= 0xFF
    pa.write_bytes(bytes(data))
    hub.blobs.path(lorahub.digest.Digest.parse(b.weights_digest)).unlink()
    report = hub.verify()
    problems = {p.digest: p.problem for p in report.problems}
    assert "content hashes to" in problems[a.weights_digest]
    assert problems[b.weights_digest] == "missing"
    quick = hub.verify(quick=True)
    assert {p.digest for p in quick.problems} == {b.weights_digest}  # same size: quick misses it


def _truncated(src: Path) -> None:
    f = src / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _lying_header(src: Path) -> None:
    f = src / "adapter_model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 4096
    new = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def _r_mismatch(src: Path) -> None:
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["r"] = 16
    (src / "adapter_config.json").write_text(json.dumps(cfg))


def _not_json(src: Path) -> None:
    (src / "adapter_config.json").write_text("r = 4")


def _nan_alpha(src: Path) -> None:
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["lora_alpha"] = float("nan")  # json writes the token NaN, which json.loads accepts
    (src / "adapter_config.json").write_text(json.dumps(cfg))


def _nested_config(src: Path) -> None:
    (src / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)


def _rank_zero(src: Path) -> None:
    from safetensors.torch import save_file

    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["r"] = 0
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(
        {
            "base_model.model.x.lora_A.weight": torch.zeros(0, 8),
            "base_model.model.x.lora_B.weight": torch.zeros(8, 0),
        },
        str(src / "adapter_model.safetensors"),
    )


def _config_value(key: str, value):
    def set_it(src: Path) -> None:
        cfg = json.loads((src / "adapter_config.json").read_text())
        cfg[key] = value
        (src / "adapter_config.json").write_text(json.dumps(cfg))

    set_it.__name__ = f"_{key}_{value}"
    return set_it


def _nan_weights(src: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(src / "adapter_model.safetensors"))


def _no_weights(src: Path) -> None:
    (src / "adapter_model.safetensors").unlink()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/lorahub-pwned-marker",))


def _evil_pickle(src: Path) -> None:
    (src / "adapter_model.safetensors").unlink()
    with open(src / "adapter_model.bin", "wb") as f:
        pickle.dump({"base_model.model.x.lora_A.weight": _Evil()}, f)


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (_truncated, "not a valid safetensors file"),
        (_lying_header, "not a valid safetensors file"),
        (_r_mismatch, "config says r=16 but the tensors have rank 4"),
        (_not_json, "not valid JSON"),
        (_no_weights, "neither adapter_model.safetensors nor adapter_model.bin"),
        (_evil_pickle, "weights_only=True"),
        (_nan_alpha, "lora_alpha must be a finite number"),
        (_nested_config, "not valid JSON"),
        (_rank_zero, "r must be a whole number of 1 or more"),
        (_nan_weights, "NaN or infinite"),
        (_config_value("r", None), "r must be a whole number"),
        (_config_value("r", 4.5), "r must be a whole number"),
        (_config_value("target_modules", 5), "target_modules must be a string or a list"),
        (_config_value("use_dora", "yes"), "use_dora must be true or false"),
        (_config_value("layers_to_transform", "x"), "layers_to_transform must be"),
        (_config_value("deep", json.loads("[" * 600 + "]" * 600)), "nests deeper than"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(hub, tmp_path, break_it, message):
    hub.add(write_peft_adapter(tmp_path / "good", seed=9), name="good")
    before = snapshot(hub)
    src = write_peft_adapter(tmp_path / "bad")
    break_it(src)
    marker = Path("/tmp/lorahub-pwned-marker")
    marker.unlink(missing_ok=True)
    with pytest.raises(InvalidAdapter, match=message):
        hub.add(src, name="bad")
    assert not marker.exists(), "the pickle's code ran"
    assert snapshot(hub) == before
    assert hub.verify().ok


def test_directory_without_adapter(hub, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidAdapter, match="holds no adapter"):
        hub.add(tmp_path / "empty")
    (res,) = hub.add_many([tmp_path / "empty"])
    assert res.status == "refused" and "--recursive" in res.reason


def test_name_must_name_one_adapter(hub, tmp_path):
    write_peft_adapter(tmp_path / "pile" / "a", seed=1)
    write_peft_adapter(tmp_path / "pile" / "b", seed=2)
    with pytest.raises(InvalidReference, match="names one adapter"):
        hub.add_many([tmp_path / "pile"], recursive=True, name="x")
    assert hub.list_adapters() == []


def test_hostile_names_are_refused(hub, tmp_path):
    src = write_peft_adapter(tmp_path / "a")
    for bad in ("../etc", "a b", "-x", "x:../../y", "a/b/c", "name:"):
        with pytest.raises(InvalidReference):
            hub.add(src, name=bad)
    assert hub.list_adapters() == []


@pytest.mark.sqlite_only  # the catalog's SQLite file itself
def test_settings_come_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAHUB_HOME", str(tmp_path / "env-home"))
    h = lorahub.Hub()
    assert h.home == tmp_path / "env-home"
    assert h.list_adapters() == [] and (tmp_path / "env-home" / "lorahub.db").is_file()
    h.close()


def test_weights_file_equals_the_in_memory_canonical_form(hub, tmp_path):
    from lorahub.formats import peft

    for fmt in ("safetensors", "bin"):
        src = write_peft_adapter(tmp_path / fmt, fmt=fmt, dtype=torch.bfloat16, seed=5)
        info = hub.add(src).adapter
        blob = hub.blobs.path(lorahub.digest.Digest.parse(info.weights_digest))
        assert blob.read_bytes() == peft.canonical_weights(peft.read_peft_dir(src))


def test_full_disk_while_writing_a_blob_is_a_clear_error(hub, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    from lorahub.errors import StoreError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(StoreError, match="no space left"):
        hub.add(write_peft_adapter(tmp_path / "a"))
    assert hub.list_adapters() == [] and list((hub.home / "tmp").iterdir()) == []


def test_hostile_recorded_base_is_refused(hub, tmp_path):
    from lorahub.manifest import BaseRef

    with pytest.raises(InvalidAdapter, match="must be strings"):
        BaseRef.from_dict({"name": ["evil"], "signature": {"x": 1}})


@pytest.mark.parametrize("value", ["nan", "inf", "1e30", "2.5", "x"])
def test_rank_filter_needs_a_whole_number(hub, value):
    with pytest.raises(lorahub.InvalidReference, match="filter rank needs a whole number"):
        hub.list_adapters([f"rank={value}"])


@pytest.mark.parametrize("swap", [True, False], ids=["exchange", "two-renames"])
def test_publish_dir_replaces_a_tree_and_leaves_nothing_behind(tmp_path, monkeypatch, swap):
    from lorahub import fsutil

    if not swap:
        monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp" / "new.txt").write_text("new")
    fsutil.publish_dir(tmp_path / "tmp", tmp_path / "out", replace=True)
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["new.txt"]


def test_a_unique_violation_from_a_racing_writer_is_retried(hub, tmp_path, monkeypatch):
    """Without SQLite's IMMEDIATE lock (PostgreSQL) two identical adds can both insert; the
    loser's unique violation must end as an add, not a traceback."""
    import sqlalchemy.exc

    from lorahub.catalog import queries

    real, calls = queries.insert_adapter, []

    def racing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("UNIQUE constraint"))
        return real(*args, **kwargs)

    monkeypatch.setattr(queries, "insert_adapter", racing)
    res = hub.add(write_peft_adapter(tmp_path / "a"), name="a")
    assert res.status == "added" and len(calls) == 2 and hub.get("a").digest == res.adapter.digest


def test_outputs_may_not_overlap_the_store(hub, world, tmp_path):
    hub.add(write_peft_adapter(tmp_path / "a"), name="a")
    before = snapshot(hub)
    for out in (hub.home, hub.home / "blobs", hub.home / "new", hub.home.parent):
        with pytest.raises(lorahub.LorahubError, match="overlaps the lorahub store"):
            hub.export("a", out, force=True)
    with pytest.raises(lorahub.LorahubError, match="overlaps the lorahub store"):
        hub.merge(world / "llama", "a", out=hub.home / "blobs", force=True)
    assert snapshot(hub) == before and hub.verify().ok


def test_a_corrupt_blob_is_never_used(hub, tmp_path):
    info = hub.add(write_peft_adapter(tmp_path / "a"), name="a").adapter
    path = hub.blobs.path(lorahub.digest.Digest.parse(info.weights_digest))
    data = bytearray(path.read_bytes())
    data[-8:] = b"\xff" * 8  # inside the last tensor's numbers: still parses
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="is corrupt"):
        hub.load("a")
    with pytest.raises(IntegrityError, match="is corrupt"):
        hub.export("a", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    path.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        hub.load("a")


def test_an_exported_folder_is_readable_by_others(hub, tmp_path):
    hub.add(write_peft_adapter(tmp_path / "a"), name="a")
    old = os.umask(0o022)
    try:
        out = hub.export("a", tmp_path / "out")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755


def test_special_files_are_refused_without_blocking(hub, tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    for src in (fifo, Path("/dev/null")):
        with pytest.raises(InvalidAdapter, match="neither a regular file nor a folder"):
            hub.add(src)
        (res,) = hub.add_many([src])
        assert res.status == "refused" and "neither a regular file" in res.reason


@pytest.mark.sqlite_only  # the catalog's SQLite file itself
def test_database_failures_are_one_line_store_errors(hub, tmp_path, monkeypatch):
    import sqlite3

    import sqlalchemy.exc

    from lorahub.catalog import queries

    hub.add(write_peft_adapter(tmp_path / "a"), name="a")
    before = snapshot(hub)

    def full(*args, **kwargs):
        raise sqlalchemy.exc.OperationalError(
            "INSERT INTO refs", {}, sqlite3.OperationalError("database or disk is full")
        )

    monkeypatch.setattr(queries, "set_ref", full)
    with pytest.raises(lorahub.errors.StoreError) as err:
        hub.tag("a", "a:v2")
    assert "database or disk is full (is the disk full?)" in str(err.value)
    assert "\n" not in str(err.value) and "sqlalche.me" not in str(err.value)
    monkeypatch.undo()
    assert snapshot(hub) == before

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "lorahub.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(lorahub.errors.StoreError) as err:
        lorahub.open(tmp_path / "broken").list_adapters()
    assert "file is not a database" in str(err.value) and "\n" not in str(err.value)


def test_boolean_filters_refuse_other_words(hub):
    with pytest.raises(InvalidReference, match="filter dora needs true or false"):
        hub.list_adapters(["dora=maybe"])
    assert hub.list_adapters(["dora=no"]) == []


def test_names_from_folders_drop_accents(hub, tmp_path):
    pile = tmp_path / "pile"
    write_peft_adapter(pile / "ünïcode adapter", seed=1)
    (res,) = hub.add_many([pile])
    assert res.status == "added" and res.adapter.refs == ("unicode-adapter:latest",)


def test_float8_weights_are_accepted(hub, tmp_path):
    src = write_peft_adapter(tmp_path / "a", dtype=torch.float8_e4m3fn)
    assert hub.add(src, name="f8").status == "added"
    assert hub.load("f8").modules


def test_auto_mapping_survives_export(hub, tmp_path):
    mapping = {"base_model_class": "LlamaForCausalLM", "parent_library": "transformers"}
    src = write_peft_adapter(tmp_path / "a", extra_config={"auto_mapping": mapping})
    hub.add(src, name="a")
    out = hub.export("a", tmp_path / "out")
    assert json.loads((out / "adapter_config.json").read_text())["auto_mapping"] == mapping


def test_pattern_order_is_kept_through_the_store_and_export(hub, tmp_path):
    """PEFT takes the first matching pattern in dict order; sorted keys would pick another."""
    from lorahub.adapter import pattern_value

    mods = {
        "model.layers.0.self_attn.q_proj": (32, 32),
        "model.layers.1.self_attn.q_proj": (32, 32),
    }
    patterns = {"q_proj": 4, "layers.0.self_attn.q_proj": 16}  # sorted, the second comes first
    src = write_peft_adapter(
        tmp_path / "a", mods, alpha=8, extra_config={"alpha_pattern": patterns}
    )
    hub.add(src, name="a")
    loaded = hub.load("a")
    assert {n: m.alpha for n, m in loaded.modules.items()} == {n: 4.0 for n in mods}
    exported = json.loads((hub.export("a", tmp_path / "out") / "adapter_config.json").read_text())
    for name in mods:
        assert pattern_value(exported["alpha_pattern"], name) == 4
