"""``lorahub migrate-store``: a local store copied to another catalog and to S3 (moto's
server on 127.0.0.1, through boto3), every digest verified, a second run a no-op."""

from __future__ import annotations

import json

import pytest
from factories import cli_runner
from s3kit import PART_SIZE, SECRET_KEY, S3Server

import lorahub
from lorahub.digest import Digest

pytestmark = pytest.mark.usefixtures("loopback_only")


@pytest.fixture
def aws(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("LORAHUB_BLOBS_URL", raising=False)
    return s3


def _fill(home, world) -> dict[str, str]:
    """A local store with two adapters, three names and a base."""
    with lorahub.open(home) as hub:
        hub.add_base(world / "llama", name="llama")
        a = hub.add(world / "a", name="a:v1").adapter
        b = hub.add(world / "b", name="b:v1").adapter
        hub.tag("a:v1", "a:prod")
        return {"a": a.digest, "b": b.digest}


def test_a_local_store_moves_to_another_catalog_and_s3_once(aws, world, tmp_path, monkeypatch):
    home = tmp_path / "home"
    digests = _fill(home, world)
    bucket = aws.bucket()
    target_db = f"sqlite:///{tmp_path / 'team.db'}"
    blobs_url = f"s3://{bucket}/team?part_size={PART_SIZE}"
    run = cli_runner(home)

    first = json.loads(
        run("migrate-store", "--to-database", target_db, "--to-blobs", blobs_url, "--json").stdout
    )
    assert len(first["blobs_copied"]) == 2 and first["bytes_copied"] > 0
    assert sorted(first["adapters_copied"]) == sorted(digests.values())
    assert sorted(first["names_copied"]) == ["a:prod", "a:v1", "b:v1"]
    assert first["bases_copied"] == ["llama"] and first["conflicts"] == []

    again = run("migrate-store", "--to-database", target_db, "--to-blobs", blobs_url)
    assert again.stdout.startswith("0 copied")
    assert "already there: 2 blob(s), 2 adapter(s)" in again.stdout

    # The team setup, from a new home: everything is there and reads back verified.
    monkeypatch.setenv("LORAHUB_DATABASE_URL", target_db)
    monkeypatch.setenv("LORAHUB_BLOBS_URL", blobs_url)
    with lorahub.open(tmp_path / "team-home") as team:
        assert team.get("a:prod").digest == digests["a"]
        assert team.get("b:v1").digest == digests["b"]
        assert [b.name for b in team.bases()] == ["llama"]
        assert team.verify().ok
        out = team.export("a:v1", tmp_path / "out")
        assert (out / "adapter_model.safetensors").is_file()
        objects = aws.client().list_objects_v2(Bucket=bucket, Prefix="team/blobs/")
        assert len(objects["Contents"]) == 2


def test_a_damaged_source_blob_is_refused_and_nothing_is_catalogued(
    aws, world, tmp_path, monkeypatch
):
    home = tmp_path / "home"
    digests = _fill(home, world)
    with lorahub.open(home) as hub:
        path = hub.blobs.path(Digest.parse(hub.get("a:v1").weights_digest))
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    bucket = aws.bucket()
    target_db = f"sqlite:///{tmp_path / 'team.db'}"
    failed = cli_runner(home)(
        "migrate-store", "--to-database", target_db, "--to-blobs", f"s3://{bucket}/t", code=1
    )
    assert "is corrupt" in failed.stderr
    monkeypatch.setenv("LORAHUB_DATABASE_URL", target_db)
    with lorahub.open(tmp_path / "team-home") as team:
        assert team.list_adapters() == []
        assert digests["a"] not in {i.digest for i in team.list_adapters()}


def test_migrating_only_the_catalog_keeps_the_blobs_and_a_conflict_is_reported(
    aws, world, tmp_path, monkeypatch
):
    home = tmp_path / "home"
    _fill(home, world)
    target_db = f"sqlite:///{tmp_path / 'team.db'}"
    run = cli_runner(home)
    assert run("migrate-store", "--to-database", target_db).stdout.startswith("6 copied")
    # Someone moves a:v1 in the team catalog; this store's a:v1 is not forced over it.
    monkeypatch.setenv("LORAHUB_DATABASE_URL", target_db)
    with lorahub.open(home) as team:
        team.tag("b:v1", "a:v1")
    monkeypatch.delenv("LORAHUB_DATABASE_URL")
    out = run("migrate-store", "--to-database", target_db, code=1)
    assert out.stdout.startswith("0 copied")
    assert "conflict: name a:v1 points at" in out.stderr


def test_bad_urls_are_refused_and_no_secret_is_printed(aws, world, tmp_path, monkeypatch):
    run = cli_runner(tmp_path / "home")
    _fill(tmp_path / "home", world)
    out = run(
        "migrate-store", "--to-database", "sqlite:///x.db", "--to-blobs", "s3://u:pw@b/x", code=2
    )
    assert "--to-blobs must not hold credentials" in out.stderr and "pw" not in out.stderr
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    target_db = f"sqlite:///{tmp_path / 'team.db'}"
    out = run("migrate-store", "--to-database", target_db, "--to-blobs", "s3://b-x/y", code=1)
    text = out.stdout + out.stderr
    assert "Error:" in text and "hunter2" not in text and SECRET_KEY not in text


def test_an_adapter_added_while_the_blobs_copy_is_copied_with_its_blob(
    aws, world, tmp_path, monkeypatch
):
    """An adapter added to the store after the blob list was read (here: while the first
    blob goes up) never reaches the target's catalog without its blob."""
    import dataclasses

    from lorahub.migrating import migrate_store

    home = tmp_path / "home"
    _fill(home, world)
    target_db = f"sqlite:///{tmp_path / 'team.db'}"
    blobs_url = f"s3://{aws.bucket()}/team?part_size={PART_SIZE}"
    added: list[str] = []

    def progress(done: int, total: int) -> None:
        if not added:  # another process's add, between the blob list and the catalog copy
            with lorahub.open(home) as other:
                added.append(other.add(world / "ad2", name="late:v1").adapter.digest)

    with lorahub.open(home) as hub:
        target = dataclasses.replace(hub.settings, database_url=target_db, blobs_url=blobs_url)
        report = migrate_store(hub.engine, hub.blobs, target, progress=progress)
    assert report.conflicts == []
    assert added[0] in report.adapters_copied and "late:v1" in report.names_copied
    assert len(report.blobs_copied) == 3 and report.adapters_present == 0
    monkeypatch.setenv("LORAHUB_DATABASE_URL", target_db)
    monkeypatch.setenv("LORAHUB_BLOBS_URL", blobs_url)
    with lorahub.open(tmp_path / "team-home") as team:
        assert team.get("late:v1").digest == added[0]
        assert team.verify().ok  # every row's blob is in the bucket
        assert (team.export("late:v1", tmp_path / "out") / "adapter_model.safetensors").is_file()
