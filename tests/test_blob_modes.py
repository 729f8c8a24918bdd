"""Blobs are published read-only (0o444 less the umask): ``lorahub path`` and ``export
--layout vllm`` hard-link them into folders users see. Tests run as root, which ignores the
mode bits, so the bits themselves are checked: with no write bit set, a write through a link
fails for anyone but root."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from factories import write_peft_adapter

from lorahub.digest import Digest


@pytest.fixture
def umask() -> Iterator[int]:
    """A known umask (0o022) for the test, the old one restored after it."""
    old = os.umask(0o022)
    try:
        yield 0o022
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _blob(hub, info) -> Path:
    return hub.blobs.path(Digest.parse(info.weights_digest))


def test_a_new_blob_and_manifest_are_read_only_less_the_umask(hub, tmp_path, umask):
    info = hub.add(write_peft_adapter(tmp_path / "a", seed=1), name="a").adapter
    assert _mode(_blob(hub, info)) == 0o444
    assert _mode(hub.records.manifests.path(Digest.parse(info.digest))) == 0o444

    os.umask(0o077)
    other = hub.add(write_peft_adapter(tmp_path / "b", seed=2), name="b").adapter
    assert _mode(_blob(hub, other)) == 0o400
    assert not list((hub.home / "tmp").iterdir())  # no temp file left behind


def test_path_and_the_vllm_layout_hand_out_weights_with_no_write_bit(
    hub, run, world, tmp_path, umask
):
    info = hub.add(world / "a", name="sql:v1").adapter
    run("base", "add", world / "llama", "--name", "tiny")
    weights = Path(run("path", "sql:v1", "-q").stdout.strip()) / "adapter_model.safetensors"
    served = tmp_path / "loras"
    run("export", "--layout", "vllm", served, "--base", "tiny", "--served-model-id", "m/x")
    vllm = served / "sql@v1" / "adapter_model.safetensors"
    for linked in (weights, vllm):
        assert os.path.samefile(linked, _blob(hub, info))
        assert _mode(linked) & 0o222 == 0, oct(_mode(linked))  # open(.., "r+b") fails (non-root)


def _damage(path: Path) -> None:
    """Flip a byte as a bad disk would (root writes through the read-only mode)."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    mode = path.stat().st_mode
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    path.chmod(mode)


def test_fsck_refetches_and_quarantines_read_only_blobs(hub, tmp_path, umask):
    a = hub.add(write_peft_adapter(tmp_path / "a", seed=1), name="a").adapter
    gone = write_peft_adapter(tmp_path / "b", seed=2)
    b = hub.add(gone, name="b").adapter
    for info in (a, b):
        _damage(_blob(hub, info))
        assert _mode(_blob(hub, info)) == 0o444
    for f in gone.iterdir():
        f.unlink()

    report = hub.fsck()
    assert report.blobs_repaired == (a.weights_digest,)
    assert report.blobs_quarantined == (b.weights_digest,)
    assert _mode(_blob(hub, a)) == 0o444  # the good copy is published read-only too
    assert hub.blobs.verify(Digest.parse(a.weights_digest)) is None
    assert (hub.home / "quarantine" / Digest.parse(b.weights_digest).hex).is_file()


def test_adding_again_replaces_a_damaged_read_only_blob(hub, tmp_path, umask):
    src = write_peft_adapter(tmp_path / "a")
    info = hub.add(src, name="a").adapter
    _damage(_blob(hub, info))
    assert hub.add(src, name="a").status == "present"
    assert hub.verify().ok
    assert _mode(_blob(hub, info)) == 0o444


def test_gc_deletes_read_only_blobs_and_path_folders(hub, tmp_path, umask):
    info = hub.add(write_peft_adapter(tmp_path / "a"), name="a").adapter
    folder = hub.path("a")
    hub.remove("a")
    report = hub.gc(grace=0)
    assert report.blobs == (info.weights_digest,)
    assert not _blob(hub, info).exists() and not folder.exists()
