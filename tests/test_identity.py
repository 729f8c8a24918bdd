"""An exported adapter added back keeps its identity (digest, base, provenance), as a pull
does, through the lorahub.json the export wrote; an edited export is refused."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from factories import cli_runner, write_peft_adapter

import lorahub
from lorahub.digest import hash_bytes
from lorahub.errors import IncompatibleAdapter, IntegrityError
from lorahub.manifest import digest_of


@pytest.fixture
def source(hub, tmp_path, world):
    """A store holding an adapter verified against llama, exported to ./export."""
    info = hub.add(world / "a", name="sql:v1", base=world / "llama").adapter
    hub.export("sql:v1", tmp_path / "export")
    return hub, info, tmp_path / "export"


def _blobs(home):
    return sorted(p for p in (home / "blobs").rglob("*") if p.is_file())


def _same_identity(got, want):
    assert got.digest == want.digest
    assert got.base == want.base and got.provenance == want.provenance
    assert got.manifest == want.manifest


def test_export_then_add_back_keeps_the_identity(source, tmp_path):
    hub, info, export = source
    assert info.base.verified  # a base worth keeping: with signature and content hash
    with lorahub.open(tmp_path / "b") as other:
        res = other.add(export, name="sql:v1")
        assert res.status == "added"
        _same_identity(res.adapter, info)
        assert res.adapter.origin["path"] == str(export.resolve())
    again = hub.add(export, name="sql:v2")  # into the store it came from: the same adapter
    assert again.status == "present" and again.adapter.digest == info.digest
    assert len(hub.list_adapters()) == 1


def test_a_composition_round_trips_with_its_provenance(hub, tmp_path, world):
    hub.add(world / "a", name="a", base=world / "llama")
    hub.add(world / "ad2", name="b", base=world / "llama")
    made = hub.compose(["a", "b"], [1.0, 0.5], method="svd", rank=3, name="blend").adapter
    hub.export("blend", tmp_path / "export")
    assert made.provenance["kind"] == "compose" and made.base.content_hash
    run = cli_runner(tmp_path / "b")
    out = json.loads(run("add", tmp_path / "export", "-n", "blend", "--json").stdout)
    assert out[0]["status"] == "added"
    with lorahub.open(tmp_path / "b") as other:
        _same_identity(other.get("blend"), made)
        assert other.get("blend").provenance["parents"] == made.provenance["parents"]
        # Recorded for another base on the way in, it keeps its provenance, not its digest.
        moved = other.add(tmp_path / "export", base=world / "llama-instruct").adapter
        assert moved.digest != made.digest and moved.provenance == made.provenance
        assert moved.base.name == "llama-instruct"


def test_an_edited_export_is_refused_and_nothing_is_stored(source, tmp_path):
    _, info, export = source
    home = tmp_path / "b"
    config = json.loads((export / "adapter_config.json").read_text())
    config["lora_alpha"] = 64
    (export / "adapter_config.json").write_text(json.dumps(config))
    with lorahub.open(home) as other:
        with pytest.raises(IntegrityError) as err:
            other.add(export, name="sql")
        msg = str(err.value)
        assert "do not match lorahub.json: config" in msg and info.digest in msg
        assert "edited after export" in msg and f"remove {export / 'lorahub.json'}" in msg
        assert other.list_adapters() == [] and _blobs(home) == []
    # The CLI says the same, without a traceback, and exits non-zero.
    res = cli_runner(home)("add", export, code=1)
    assert "edited after export" in res.stderr and "Traceback" not in res.stderr
    # Following the advice imports it as a new adapter.
    (export / "lorahub.json").unlink()
    with lorahub.open(home) as other:
        fresh = other.add(export, name="sql").adapter
        assert fresh.digest != info.digest and fresh.provenance == {"kind": "import"}


def test_a_lorahub_json_that_lies_about_itself_is_refused(source, tmp_path):
    _, info, export = source
    doc = json.loads((export / "lorahub.json").read_text())
    doc["manifest"]["base"]["name"] = "someone-else"  # digest left as it was
    (export / "lorahub.json").write_text(json.dumps(doc))
    with lorahub.open(tmp_path / "b") as other:
        with pytest.raises(IntegrityError, match="its manifest hashes to"):
            other.add(export)
        # Restated consistently, a manifest of other weights still does not match the files.
        doc["manifest"]["base"]["name"] = info.base.name
        doc["manifest"]["weights"]["digest"] = str(hash_bytes(b"other"))
        doc["digest"] = str(digest_of(doc["manifest"]))
        (export / "lorahub.json").write_text(json.dumps(doc))
        with pytest.raises(IntegrityError, match=r"weights .*the weights hash to"):
            other.add(export)
        assert other.list_adapters() == [] and _blobs(tmp_path / "b") == []


def test_an_older_schema_imports_as_plain_peft_with_a_warning(source, tmp_path, caplog):
    _, info, export = source
    doc = json.loads((export / "lorahub.json").read_text())
    doc["manifest"]["schema"] = 1
    doc["digest"] = str(digest_of(doc["manifest"]))
    (export / "lorahub.json").write_text(json.dumps(doc))
    with lorahub.open(tmp_path / "b") as other, caplog.at_level(logging.WARNING, "lorahub"):
        got = other.add(export).adapter
    assert got.provenance == {"kind": "import"} and not got.base.verified
    assert got.digest != info.digest
    assert any("manifest schema 1" in r.getMessage() for r in caplog.records)


def test_add_with_base_keeps_the_identity_only_for_the_recorded_base(source, tmp_path, world):
    _, info, export = source
    with lorahub.open(tmp_path / "b") as other:
        other.add_base(world / "llama", name="my-llama")  # known here by another name
        same = other.add(export, name="x", base=world / "llama").adapter
        _same_identity(same, info)  # the very base recorded: same content hash
        assert same.base.name == "llama"
        moved = other.add(export, name="y", base=world / "llama-instruct").adapter
        assert moved.digest != info.digest and moved.provenance == info.provenance
        assert moved.base.signature == info.base.signature
        instruct = next(b for b in other.bases() if b.name == "llama-instruct")
        assert moved.base.content_hash == instruct.content_hash != info.base.content_hash
        with pytest.raises(IncompatibleAdapter, match=r"\[48, 48\]"):
            other.add(export, name="z", base=world / "wide")
        assert {i.digest for i in other.list_adapters()} == {info.digest, moved.digest}


def test_add_with_base_keeps_a_signature_only_identity_for_that_architecture(hub, tmp_path, world):
    one = hub.add(world / "a", name="a", base=world / "llama").adapter
    two = hub.add(world / "ad2", name="b", base=world / "llama-instruct").adapter
    made = hub.compose(["a", "b"], name="blend").adapter
    hub.export("blend", tmp_path / "export")
    assert one.base.content_hash != two.base.content_hash
    assert made.base.signature and made.base.content_hash is None
    with lorahub.open(tmp_path / "b") as other:
        _same_identity(other.add(tmp_path / "export", base=world / "llama").adapter, made)


def test_add_of_an_export_needs_no_hub_client(source, tmp_path):
    code = (
        "import sys, lorahub\n"
        f"info = lorahub.open({str(tmp_path / 'b')!r}).add({str(source[2])!r}).adapter\n"
        "print(info.digest, 'huggingface_hub' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [source[1].digest, "False"]


def test_a_plain_peft_folder_is_unaffected(hub, tmp_path):
    info = hub.add(write_peft_adapter(tmp_path / "p")).adapter
    assert info.provenance == {"kind": "import"} and info.base.name == "tiny/llama"
