"""Blobs on S3-compatible storage (``LORAHUB_BLOBS_URL``), against moto's server on 127.0.0.1
through boto3 over HTTP: the local store's guarantees (write-once by digest, verified on
upload and on read, nothing partial under a digest key), the read-through cache, and
verify/gc on the bucket. The bucket is damaged through boto3, as another client would."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from factories import cli_runner
from s3kit import PART_SIZE, SECRET_KEY, S3Server
from safetensors.torch import load_file

import lorahub
from lorahub.digest import Digest, hash_file
from lorahub.errors import CorruptData, InvalidArgument, StoreError
from lorahub.s3blobs import S3BlobStore, parse_blobs_url

pytestmark = pytest.mark.usefixtures("loopback_only")


@pytest.fixture
def bucket(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new bucket, and the AWS variables and LORAHUB_BLOBS_URL pointing at it."""
    name = s3.bucket()
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("LORAHUB_BLOBS_URL", f"s3://{name}/team?part_size={PART_SIZE}")
    return name


def _keys(s3: S3Server, bucket: str, prefix: str = "team/") -> list[str]:
    got = s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in got.get("Contents", ()))


def _blob_key(info: lorahub.AdapterInfo) -> str:
    hexd = Digest.parse(info.weights_digest).hex
    return f"team/blobs/xxh128/{hexd[:2]}/{hexd[2:]}"


def _drop_cache(home: Path) -> None:
    for f in (home / "blobcache").rglob("*"):
        if f.is_file():
            f.unlink()


def _cached(home: Path) -> list[str]:
    """The cache's blob files (its ``.locks`` aside)."""
    return sorted(f.name for f in (home / "blobcache" / "xxh128").rglob("*") if f.is_file())


def test_add_merge_export_and_path_read_through_the_bucket(s3, bucket, world, tmp_path):
    home = tmp_path / "home"
    with lorahub.open(home) as hub:
        a = hub.add(world / "a", name="a:v1").adapter
        b = hub.add(world / "b", name="b:v1").adapter
        assert isinstance(hub.blobs, S3BlobStore)
        assert _blob_key(a) in _keys(s3, bucket) and _blob_key(b) in _keys(s3, bucket)
        assert not [k for k in _keys(s3, bucket) if "/tmp/" in k]  # temp keys cleaned up
        assert not (home / "blobs" / "xxh128").exists()  # nothing in the local blob folder

        # Every read fetches through the cache: empty it, and each command fetches again.
        _drop_cache(home)
        out = hub.export("a:v1", tmp_path / "export")
        assert hash_file(out / "adapter_model.safetensors")[0] == Digest.parse(a.weights_digest)
        assert Digest.parse(a.weights_digest).hex[2:] in _cached(home)
        _drop_cache(home)
        folder = hub.path("b:v1")
        assert hash_file(folder / "adapter_model.safetensors")[0] == Digest.parse(b.weights_digest)
        _drop_cache(home)
        merged = hub.merge(world / "llama", ["a:v1", "b:v1"], [1.0, 0.5], out=tmp_path / "m")
        assert len(_cached(home)) == 2

    # The same merge from a store on the local disk gives the same tensors.
    os.environ.pop("LORAHUB_BLOBS_URL")
    with lorahub.open(tmp_path / "local") as local:
        local.add(world / "a", name="a:v1")
        local.add(world / "b", name="b:v1")
        ref = local.merge(world / "llama", ["a:v1", "b:v1"], [1.0, 0.5], out=tmp_path / "m2")
    got = load_file(next(Path(merged.path).glob("*.safetensors")))
    want = load_file(next(Path(ref.path).glob("*.safetensors")))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)


def test_the_cache_keeps_its_size_cap_least_recently_used_first(s3, bucket, world, tmp_path):
    with lorahub.open(tmp_path / "home") as hub:
        a = hub.add(world / "a", name="a").adapter
        b = hub.add(world / "b", name="b").adapter
        blobs = hub.blobs
        assert isinstance(blobs, S3BlobStore)
        blobs.recent_use_s = 0  # no reader is about to open a file in this test
        blobs.cache_max_bytes = max(a.size, b.size)
        _drop_cache(hub.home)
        da, db = Digest.parse(a.weights_digest), Digest.parse(b.weights_digest)
        blobs.checked_path(da)
        assert _cached(hub.home) == [da.hex[2:]]
        blobs.checked_path(db)  # a, used least recently, makes room
        assert _cached(hub.home) == [db.hex[2:]]
        # A cache file damaged on disk is fetched again, never used.
        path = blobs.path(db)
        os.chmod(path, 0o644)
        path.write_bytes(b"\0" * path.stat().st_size)
        assert hash_file(blobs.checked_path(db))[0] == db


def test_pull_and_push_through_an_s3_store(s3, bucket, world, tmp_path, alice_hub):
    with lorahub.open(tmp_path / "home") as hub:
        a = hub.add(world / "a", name="a:v1").adapter
        _drop_cache(hub.home)
        hub.push("a:v1", "myorg/sql-expert")
    # A second S3-backed store, in its own bucket, pulls it back.
    other = s3.bucket()
    os.environ["LORAHUB_BLOBS_URL"] = f"s3://{other}/team?part_size={PART_SIZE}"
    with lorahub.open(tmp_path / "puller") as puller:
        pulled = puller.pull("myorg/sql-expert")
        assert pulled.digest == a.digest
        assert _blob_key(a) in _keys(s3, other)
        assert puller.verify().ok


_KILLED_UPLOAD = """
import os, sys
import lorahub
with lorahub.open(sys.argv[1]) as hub:
    blobs = hub.blobs
    # Killed the moment the first part has reached the server: no clean-up code runs.
    blobs.client.meta.events.register("after-call.s3.UploadPart", lambda **kw: os._exit(9))
    data = os.urandom(12 << 20)  # three parts of 5 MiB or less
    blobs.put_bytes(data)
"""


def test_a_killed_multipart_upload_leaves_no_blob_and_gc_cleans_it(s3, bucket, tmp_path):
    home = tmp_path / "home"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_KILLED_UPLOAD), str(home)],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 9, proc.stderr.decode()
    client = s3.client()
    assert [k for k in _keys(s3, bucket) if "/blobs/" in k] == []
    uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert len(uploads) == 1 and uploads[0]["Key"].startswith("team/tmp/")
    assert list((home / "tmp").glob("blob-*"))  # the killed writer's local temp file

    with lorahub.open(home) as hub:
        assert list(hub.blobs) == []
        kept = hub.gc()  # the default grace keeps an upload that may still be in flight
        assert not [t for t in kept.temp_files if "uploadId" in t]
        report = hub.gc(grace=0)
    assert any("uploadId=" in t for t in report.temp_files)
    assert report.bytes_freed >= 5 << 20
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert not list((home / "tmp").glob("blob-*"))


def test_a_large_blob_goes_up_in_parts_and_comes_back_whole(s3, bucket, tmp_path):
    data = os.urandom(11 << 20)
    with lorahub.open(tmp_path / "home") as hub:
        parts: list[int] = []
        hub.blobs.client.meta.events.register(
            "after-call.s3.UploadPart", lambda **kw: parts.append(1)
        )
        digest = hub.blobs.put_bytes(data)
        assert len(parts) == 3
        _drop_cache(hub.home)
        assert hub.blobs.checked_path(digest).read_bytes() == data
        assert hub.blobs.verify(digest, len(data)) is None


def test_a_missing_object_is_a_clear_error_and_verify_reports_it(s3, bucket, world, tmp_path):
    with lorahub.open(tmp_path / "home") as hub:
        a = hub.add(world / "a", name="a").adapter
        s3.client().delete_object(Bucket=bucket, Key=_blob_key(a))
        _drop_cache(hub.home)
        with pytest.raises(CorruptData, match=r"is missing from s3://.*/team/; run `lorahub"):
            hub.export("a", tmp_path / "out")
        assert not (tmp_path / "out").exists()
        problems = hub.verify(quick=True).problems
        assert [(p.what, p.digest, p.problem) for p in problems] == [
            ("blob", a.weights_digest, "missing")
        ]
    result = cli_runner(tmp_path / "home")("verify", "-q", code=1)
    assert a.weights_digest in result.stdout


def test_a_corrupted_object_is_never_served_and_verify_finds_it(s3, bucket, world, tmp_path):
    home = tmp_path / "home"
    with lorahub.open(home) as hub:
        a = hub.add(world / "a", name="a").adapter
        key = _blob_key(a)
        client = s3.client()
        good = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        bad = bytes([good[0] ^ 1]) + good[1:]  # same size: only the digest can tell
        client.put_object(Bucket=bucket, Key=key, Body=bad)
        _drop_cache(home)
        with pytest.raises(CorruptData, match="is corrupt"):
            hub.export("a", tmp_path / "out")
        with pytest.raises(CorruptData, match="is corrupt"):
            hub.merge(world / "llama", ["a"], out=tmp_path / "m")
        assert not (tmp_path / "out").exists() and not (tmp_path / "m").exists()
        assert _cached(home) == []  # the bad bytes never reached the cache
        assert hub.verify(quick=True).ok  # the size alone cannot see it
        problems = hub.verify().problems
        assert [(p.digest, p.problem.split(" to ")[0]) for p in problems] == [
            (a.weights_digest, "content hashes")
        ]
        # Adding the adapter again from its files replaces the damaged object.
        hub.add(world / "a", name="a")
        assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == good
        assert hub.verify().ok


_WORKER = """
import sys
from pathlib import Path
import lorahub
sys.path.insert(0, sys.argv[3])
from factories import write_peft_adapter
home, who = Path(sys.argv[1]), sys.argv[2]
with lorahub.open(home) as hub:
    for i in range(6):
        src = write_peft_adapter(home.parent / f"src-{who}-{i}", seed=1000 * (who == "b") + i)
        hub.add(src, name=f"{who}{i}:v1")
        if i % 2:
            hub.remove(f"{who}{i - 1}:v1")  # garbage for either gc
        hub.gc(grace=0)
"""


def test_two_homes_sharing_one_bucket_and_one_catalog_lose_nothing(
    s3, bucket, tmp_path, monkeypatch, catalog
):
    """Two hosts' stores (two homes) on one bucket and one catalog: PostgreSQL, or one
    SQLite file both name, add, remove and gc at once; gc deletes only garbage."""
    if catalog == "sqlite":
        monkeypatch.setenv("LORAHUB_DATABASE_URL", f"sqlite:///{tmp_path / 'shared.sqlite'}")
    homes = [tmp_path / "a" / "home", tmp_path / "b" / "home"]
    for home in homes:  # migrate the shared catalog once, before the race
        home.parent.mkdir()
        lorahub.open(home).close()
    tests = str(Path(__file__).parent)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_WORKER), str(home), who, tests],
            stderr=subprocess.PIPE,
        )
        for home, who in zip(homes, "ab", strict=True)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-3000:]
    for home in homes:
        with lorahub.open(home) as hub:
            names = sorted(r for info in hub.list_adapters() for r in info.refs)
            assert names == [f"{w}{i}:v1" for w in "ab" for i in (1, 3, 5)]
            for info in hub.list_adapters():
                assert hub.blobs.verify(Digest.parse(info.weights_digest), info.size) is None
            _drop_cache(home)
            for info in hub.list_adapters():  # every adapter reads back from either home
                hub.export(f"@{info.digest}", home.parent / f"out-{info.short}")
    in_use = {_blob_key(i) for i in lorahub.open(homes[0]).list_adapters()}
    assert {k for k in _keys(s3, bucket) if "/blobs/" in k} == in_use  # the garbage went


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("gs://bucket/x", "must be an s3:// URL"),
        ("s3://AKIA:hunter2@bucket/x", "must not hold credentials"),
        ("s3://bucket/x?secret_key=hunter2", "unknown parameter 'secret_key'"),
        ("s3://Bad_Bucket/x", "not an S3 bucket name"),
        ("s3://bucket/x?part_size=1MiB", "part_size must be at least"),
    ],
)
def test_a_bad_blobs_url_is_refused_without_repeating_secrets(url, match):
    with pytest.raises(InvalidArgument, match=match) as caught:
        parse_blobs_url(url)
    assert "hunter2" not in str(caught.value)


def test_the_url_query_sets_endpoint_and_region():
    loc = parse_blobs_url("s3://team-bucket/a/b/?endpoint=http://127.0.0.1:9000&region=eu-west-1")
    assert (loc.bucket, loc.prefix, loc.endpoint, loc.region) == (
        "team-bucket",
        "a/b/",
        "http://127.0.0.1:9000",
        "eu-west-1",
    )


def test_errors_and_env_never_show_the_secret_key(s3, bucket, tmp_path, monkeypatch):
    run = cli_runner(tmp_path / "home")
    out = run("env")
    assert f"s3://{bucket}/team" in out.output and SECRET_KEY not in out.output
    out = run("env", "--json")
    assert SECRET_KEY not in out.output
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with (
        pytest.raises(StoreError, match=r"check AWS_ENDPOINT_URL") as caught,
        lorahub.open(tmp_path / "home") as hub,
    ):
        hub.blobs.exists(Digest("0" * 32))
    assert SECRET_KEY not in str(caught.value)
    failed = run("verify", code=1)
    text = failed.output + failed.stderr
    assert "Error:" in text and SECRET_KEY not in text and "Traceback" not in text


def test_serving_fetches_a_blob_only_to_send_it_and_once_for_concurrent_downloads(
    s3, bucket, world, tmp_path
):
    """``lorahub serve`` over an S3 store: once a blob's sha256 is kept, model info, tree
    listings and ``HEAD`` (``hf_hub_download``'s metadata request) answer with its cache file
    evicted and never fetch it; 8 downloads at once of the evicted blob fetch it once."""
    import hashlib
    import json
    from concurrent.futures import ThreadPoolExecutor

    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from servekit import serving

    home = tmp_path / "home"
    with lorahub.open(home) as hub:
        info = hub.add(world / "a", name="sql-expert:v1").adapter
    data = (world / "a" / "adapter_model.safetensors").read_bytes()
    assert hash_file(world / "a" / "adapter_model.safetensors")[0] == Digest.parse(
        info.weights_digest
    )
    sha256, fetched = hashlib.sha256(data).hexdigest(), "fetching blob"
    weights = "/local/sql-expert/resolve/v1/adapter_model.safetensors"
    env = s3.env() | {"LORAHUB_BLOBS_URL": os.environ["LORAHUB_BLOBS_URL"]}
    env["LORAHUB_LOG_LEVEL"] = "INFO"
    with serving(home, tmp_path / "work", "--allow-anonymous", env=env) as server:
        status, headers, _ = server.request("HEAD", weights)  # hashes the blob, once
        assert status == 200 and headers["x-linked-etag"] == f'"{sha256}"'
        _drop_cache(home)
        status, headers, body = server.request("HEAD", weights)
        assert (status, body, headers["content-length"]) == (200, b"", str(len(data)))
        assert headers["x-linked-etag"] == f'"{sha256}"'
        status, _, body = server.request(
            "GET", "/api/models/local/sql-expert/revision/v1?blobs=True"
        )
        (lfs,) = [s["lfs"] for s in json.loads(body)["siblings"] if "lfs" in s]
        assert status == 200 and lfs["sha256"] == sha256 and lfs["size"] == len(data)
        status, _, body = server.request("GET", "/api/models/local/sql-expert/tree/v1")
        assert status == 200 and len(json.loads(body)) == 4
        url = hf_hub_url(
            "local/sql-expert", "adapter_model.safetensors", revision="v1", endpoint=server.url
        )
        meta = get_hf_file_metadata(url, token=False)
        assert meta.etag == sha256 and meta.size == len(data)
        assert _cached(home) == []  # nothing of the above fetched the blob
        before = server.output().count(fetched)

        def download(_: int) -> bytes:
            status, _headers, body = server.request("GET", weights)
            assert status == 200
            return body

        with ThreadPoolExecutor(8) as pool:
            bodies = list(pool.map(download, range(8)))
        assert bodies == [data] * 8
        assert server.output().count(fetched) - before == 1, server.output()
        assert _cached(home) == [Digest.parse(info.weights_digest).hex[2:]]
        assert not list((home / "tmp").glob("fetch-*"))
