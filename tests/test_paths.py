"""``hub.path`` / ``lorahub path``: a folder PEFT loads straight from the store, its weights
the store's blob itself (a hard link, or a symbolic link), made once, read-only, and cleaned
up by gc once its adapter is removed."""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from pathlib import Path

import pytest
import torch
from factories import tiny_llama

from lorahub import paths
from lorahub.digest import Digest

WEIGHTS = "adapter_model.safetensors"
WRITTEN = ("adapter_config.json", "README.md", "lorahub.json")


def _blob(hub, info) -> Path:
    return hub.blobs.path(Digest.parse(info.weights_digest))


def _logits(folder: Path) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(seed=0), str(folder)).eval()
    with torch.no_grad():
        return model(torch.arange(12).reshape(2, 6)).logits


def test_path_loads_in_peft_as_the_export_does_without_a_copy(hub, world, tmp_path):
    info = hub.add(world / "a", name="a:v1").adapter
    blob = _blob(hub, info)
    blob_mode = stat.S_IMODE(blob.stat().st_mode)

    folder = hub.path("a:v1")

    assert folder.parent == hub.home / "paths"
    assert sorted(os.listdir(folder)) == sorted((WEIGHTS, *WRITTEN))
    weights = folder / WEIGHTS
    assert os.path.samefile(weights, blob)  # the blob's own inode: no byte was copied
    if weights.is_symlink():
        assert Path(os.readlink(weights)) == blob.absolute()
    else:
        assert weights.stat().st_nlink >= 2
    for name in WRITTEN:  # read-only: lorahub wrote them, nobody should change them
        assert stat.S_IMODE((folder / name).stat().st_mode) & 0o222 == 0
    assert stat.S_IMODE(blob.stat().st_mode) == blob_mode  # the blob is never chmod-ed
    assert json.loads((folder / "lorahub.json").read_text())["digest"] == info.digest

    exported = hub.export("a:v1", tmp_path / "exported")
    expected = _logits(exported)
    got = _logits(folder)
    assert torch.equal(got, expected)
    assert not torch.equal(got, _logits_without_adapter())  # the adapter did something


def _logits_without_adapter() -> torch.Tensor:
    with torch.no_grad():
        return tiny_llama(seed=0)(torch.arange(12).reshape(2, 6)).logits


def test_a_second_call_returns_the_same_folder_untouched(hub, world):
    hub.add(world / "a", name="a")
    first = hub.path("a")
    config = os.stat(first / "adapter_config.json")
    again = hub.path("a")
    assert again == first
    assert os.stat(again / "adapter_config.json").st_ino == config.st_ino  # not rebuilt
    info = hub.get("a")
    assert hub.path(f"@{info.digest}") == first  # any reference to it: one folder


def test_a_folder_whose_weights_are_no_longer_the_blob_is_rebuilt(hub, world):
    info = hub.add(world / "a", name="a").adapter
    folder = hub.path("a")
    weights = folder / WEIGHTS
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data)  # a copy now: not the store's blob (as after a blob repair)
    assert not os.path.samefile(weights, _blob(hub, info))
    assert hub.path("a") == folder
    assert os.path.samefile(folder / WEIGHTS, _blob(hub, info))


def test_a_symbolic_link_where_a_hard_link_is_refused(hub, world, monkeypatch):
    info = hub.add(world / "a", name="a").adapter

    def cross_device(src, dst, *args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    folder = hub.path("a")
    weights = folder / WEIGHTS
    assert weights.is_symlink()
    assert Path(os.readlink(weights)) == _blob(hub, info).absolute()
    assert hub.path("a") == folder  # a current symbolic link is kept too
    assert weights.is_symlink()
    assert torch.equal(_logits(folder), _logits_after_add(hub, world))


def _logits_after_add(hub, world) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(seed=0), str(world / "a")).eval()
    with torch.no_grad():
        return model(torch.arange(12).reshape(2, 6)).logits


def test_base_picks_the_variant(hub, world):
    hub.add(world / "a", name="x", base=world / "llama")
    hub.add(world / "wide-ad", name="x", base=world / "wide")
    narrow = hub.path("x", base=world / "llama")
    wide = hub.path("x", base=world / "wide")
    assert narrow != wide
    assert (
        json.loads((wide / "lorahub.json").read_text())["digest"]
        == hub.get("x", base=world / "wide").digest
    )


def test_cli_prints_the_folder_quiet_and_json(hub, run, world):
    info = hub.add(world / "a", name="a:v1").adapter
    out = run("path", "a:v1").stdout.strip()
    assert Path(out) == hub.path("a:v1")
    assert run("path", "-q", "a:v1").stdout.splitlines() == [out]
    doc = json.loads(run("path", "a:v1", "--json").stdout)
    assert doc["path"] == out
    assert doc["digest"] == info.digest
    assert doc["refs"] == ["a:v1"]
    assert doc["link"] in ("hardlink", "symlink")
    assert os.path.samefile(doc["weights"], _blob(hub, info))
    bad = run("path", "nope:v9", code=None)
    assert bad.exit_code != 0
    assert "nope" in bad.stderr and "Traceback" not in bad.stderr


def test_gc_keeps_a_stored_adapters_folder_and_verify_and_fsck_see_no_damage(hub, world):
    info = hub.add(world / "a", name="a").adapter
    folder = hub.path("a")
    report = hub.gc(grace=0)
    assert str(folder) not in report.temp_files
    assert folder.is_dir() and _blob(hub, info).is_file()
    assert hub.verify().ok
    fixed = hub.fsck()
    assert fixed.ok and not fixed.adapters_restored and not fixed.blobs_quarantined
    assert os.path.samefile(folder / WEIGHTS, _blob(hub, info))


def test_rm_then_gc_removes_the_folder_and_frees_the_bytes(hub, world, run):
    info = hub.add(world / "a", name="a").adapter
    folder = hub.path("a")
    blob = _blob(hub, info)
    hub.remove("a")
    preview = hub.gc(grace=0, dry_run=True)
    assert str(folder) in preview.temp_files and folder.is_dir()
    report = hub.gc(grace=0)
    assert str(folder) in report.temp_files
    assert not folder.exists() and not blob.exists()
    assert report.bytes_freed >= info.size  # the blob's bytes, counted once
    assert list((hub.home / "paths").iterdir()) == []


def test_gc_sweeps_a_crashed_build_once_the_grace_period_is_over(hub, world):
    hub.add(world / "a", name="a")
    root = hub.home / "paths"
    stale = root / ".tmp-0123456789abcdef0123456789abcdef-999999-deadbeef"
    fresh = root / ".tmp-0123456789abcdef0123456789abcdef-999998-cafecafe"
    for d in (stale, fresh):
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text("{}")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    stranger = root / "notes.txt"
    stranger.write_text("mine")
    hub.gc(grace=3600)
    assert not stale.exists() and fresh.exists() and stranger.exists()


def test_sweep_never_follows_a_link(tmp_path):
    root = tmp_path / "paths"
    root.mkdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    (root / ("ab" * 16)).symlink_to(victim)
    assert paths.sweep(root, set(), grace=0) == []
    assert (victim / "keep").exists()


@pytest.mark.parametrize("blob_gone", [False, True])
def test_sweep_counts_a_weights_link_only_once_it_is_the_last_name(tmp_path, blob_gone):
    root = tmp_path / "paths"
    folder = root / ("cd" * 16)
    folder.mkdir(parents=True)
    blob = tmp_path / "blob"
    blob.write_bytes(b"w" * 1000)
    os.link(blob, folder / WEIGHTS)
    (folder / "adapter_config.json").write_text("{}")
    if blob_gone:
        blob.unlink()
    ((path, size),) = paths.sweep(root, set(), grace=0)
    assert path == folder and not folder.exists()
    assert size == 2 + (1000 if blob_gone else 0)


def test_callers_at_once_get_one_complete_folder(hub, world, store_home):
    from concurrent.futures import ThreadPoolExecutor

    import lorahub

    info = hub.add(world / "a", name="a").adapter

    def one(_: int) -> Path:
        with lorahub.open(store_home) as h:
            return h.path("a")

    with ThreadPoolExecutor(4) as pool:
        got = set(pool.map(one, range(8)))
    (folder,) = got
    assert paths.is_current(folder, info, _blob(hub, info))
    assert [p.name for p in (hub.home / "paths").iterdir()] == [folder.name]  # no leftovers
