"""The team setup: several homes (hosts) over one catalog and one bucket. Two real ``lorahub
serve`` processes on PostgreSQL (``tests/pgkit.py``) and moto's S3 server (``tests/s3kit.py``)
take pushes from the real huggingface_hub client and serve them back from either; and one
home's ``gc`` and ``verify`` go by the shared catalog, not by its own records, which know only
the adds and removals made in that home."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from factories import cli_runner, write_peft_adapter
from s3kit import PART_SIZE, S3Server
from safetensors.torch import load_file
from servekit import Server, serving

import lorahub
from lorahub.digest import Digest
from lorahub.serve.mapping import commit_id

pytestmark = pytest.mark.usefixtures("loopback_only")


@pytest.fixture
def team(s3: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """A fresh bucket, and the AWS variables and LORAHUB_BLOBS_URL naming it, in this process
    (for the CLI and library calls) and returned for the server processes."""
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    url = f"s3://{s3.bucket()}/team?part_size={PART_SIZE}"
    monkeypatch.setenv("LORAHUB_BLOBS_URL", url)
    return {"LORAHUB_BLOBS_URL": url}


def _ls(home: Path) -> dict[str, str]:
    rows = json.loads(cli_runner(home)("ls", "--json").stdout)
    return {ref: row["digest"] for row in rows for ref in row.get("refs", [])}


def _refs(server: Server, token: str, repo: str) -> dict[str, str]:
    from huggingface_hub import HfApi

    refs = HfApi(endpoint=server.url, token=token).list_repo_refs(repo)
    return {r.name: r.target_commit for r in (*refs.branches, *refs.tags)}


def test_two_servers_over_one_catalog_and_one_bucket_serve_the_same_store(
    postgres, team, world, tmp_path, monkeypatch
):
    """Must-have 5: a write token made once, pushes to both servers at once, pulls from
    either; the same digests, tags and bytes everywhere, nothing lost, verify clean."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    database = postgres.checkout()
    monkeypatch.setenv("LORAHUB_DATABASE_URL", database)
    env = {**team, "LORAHUB_DATABASE_URL": database}
    homes = [tmp_path / "host1" / "home", tmp_path / "host2" / "home"]
    # The tokens live in the shared catalog: made in one home, good on both servers.
    token = cli_runner(homes[0])("token", "add", "ci", "--write", "-q").stdout.strip()
    sources = {f"team/ad{i}": write_peft_adapter(tmp_path / f"src{i}", seed=i) for i in range(6)}
    try:
        with (
            serving(homes[0], tmp_path / "host1", env=env) as one,
            serving(homes[1], tmp_path / "host2", env=env) as two,
        ):
            servers = (one, two)

            def push(job: tuple[int, str]) -> str:
                i, repo = job
                api = HfApi(endpoint=servers[i % 2].url, token=token)
                api.create_repo(repo, exist_ok=True)
                return api.upload_folder(folder_path=sources[repo], repo_id=repo).oid

            with ThreadPoolExecutor(4) as pool:  # both servers take pushes at once
                commits = dict(zip(sources, pool.map(push, enumerate(sources)), strict=True))
            # One repo moves on through the other server: a tag set there is seen here.
            api_two = HfApi(endpoint=two.url, token=token)
            api_two.upload_folder(folder_path=world / "a", repo_id="team/ad0", revision="v2")
            api_two.create_tag("team/ad0", tag="prod", revision="v2")

            listed = _ls(homes[0])
            assert listed == _ls(homes[1])  # the same names and digests in both homes
            assert {r for r in listed if r.endswith(":latest")} == {
                f"{repo}:latest" for repo in sources
            }
            assert listed["team/ad0:prod"] == listed["team/ad0:v2"] != listed["team/ad0:latest"]
            for repo, oid in commits.items():
                assert oid == commit_id(listed[f"{repo}:latest"])
                assert _refs(one, token, repo) == _refs(two, token, repo)
                assert {
                    HfApi(endpoint=s.url, token=token).model_info(repo).sha for s in servers
                } == {oid}

            # Pulls from either server give the bytes the store holds, whoever took the push.
            with lorahub.open(homes[0]) as hub:
                blobs = {
                    repo: hub.blobs.checked_path(
                        Digest.parse(hub.get(f"{repo}:latest").weights_digest)
                    ).read_bytes()
                    for repo in sources
                }
            snapshots = []
            for n, server in enumerate(servers):
                for repo, src in sources.items():
                    got = Path(
                        hf_hub_download(
                            repo,
                            "adapter_model.safetensors",
                            endpoint=server.url,
                            token=token,
                            cache_dir=tmp_path / f"pull{n}",
                        )
                    )
                    assert got.read_bytes() == blobs[repo], (server.url, repo)
                    want = load_file(src / "adapter_model.safetensors")
                    have = load_file(got)
                    assert have.keys() == want.keys()
                    assert all(torch.equal(have[k], want[k]) for k in want)
                snap = Path(
                    snapshot_download(
                        "team/ad0",
                        revision="prod",
                        endpoint=server.url,
                        token=token,
                        cache_dir=tmp_path / f"snap{n}",
                    )
                )
                assert snap.name == commit_id(listed["team/ad0:prod"])
                snapshots.append({f.name: f.read_bytes() for f in snap.iterdir()})
            assert snapshots[0] == snapshots[1]  # the same files, byte for byte
            assert "adapter_config.json" in snapshots[0]
        for home in homes:
            report = json.loads(cli_runner(home)("verify", "--json").stdout)
            assert report["ok"] and report["adapters"] == 7, report
    finally:
        postgres.checkin(database)


def _old(paths: list[Path]) -> None:
    """Age files past verify's settling time and any grace: what an hour later looks like."""
    old = time.time() - 7200
    for p in paths:
        os.utime(p, (old, old))


def test_one_homes_gc_goes_by_the_shared_catalog_not_by_its_own_records(
    team, catalog, tmp_path, monkeypatch
):
    """Home B's records know nothing of A's adds, and A may remove B's adapters: B's gc
    never takes a blob the shared catalog uses, collects what was removed through either
    home without calling it "unaccounted", and B's verify stays clean."""
    if catalog == "sqlite":  # one SQLite file both homes name: shared too
        monkeypatch.setenv("LORAHUB_DATABASE_URL", f"sqlite:///{tmp_path / 'shared.sqlite'}")
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    a, b = lorahub.open(home_a), lorahub.open(home_b)
    a.list_adapters(), b.list_adapters()  # both open before either adds: no backfill
    run_b = cli_runner(home_b)
    try:
        kept = a.add(write_peft_adapter(tmp_path / "kept", seed=1), name="kept:v1").adapter
        run_b("gc", "--grace", "0")
        assert b.blobs.exists(Digest.parse(kept.weights_digest))
        for f in (home_a / "blobcache").rglob("*"):
            if f.is_file():
                f.unlink()
        a.export("kept:v1", tmp_path / "out-kept")  # A's adapter still loads, from the bucket
        assert json.loads(run_b("verify", "--json").stdout)["ok"]

        # A removes a big adapter it added: most of the bucket's bytes, and B's records
        # never heard of it. The catalog's blob row accounts for it: B collects it.
        big = a.add(write_peft_adapter(tmp_path / "big", r=64, seed=2), name="big:v1").adapter
        a.remove("big:v1")
        out = run_b("gc", "--grace", "0", "--json")
        assert big.weights_digest in json.loads(out.stdout)["blobs"]

        # B adds, A removes: B's records still call it live; the catalog says removed.
        mine = b.add(write_peft_adapter(tmp_path / "mine", seed=3), name="mine:v1").adapter
        a.remove("mine:v1")
        _old([p for p in (home_b / "manifests").rglob("*") if p.is_file()])
        assert json.loads(run_b("verify", "--json").stdout)["ok"]  # not "lost": removed
        report = b.gc(grace=0)  # an object's age cannot be faked: no grace
        assert report.unrecorded == () and mine.weights_digest in report.blobs
        assert b.records.manifest_text(mine.digest) is None  # its record went with it
        assert {i.digest for i in b.list_adapters()} == {kept.digest}
        assert a.verify().ok and b.verify().ok
    finally:
        a.close()
        b.close()
