"""``lorahub serve``: per-base variant revisions (``v1@base``) and merged checkpoints made on
demand (``v1+base``), driven by the real huggingface_hub client and transformers against a
real server process."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from servekit import Server, client_env, client_logits, serving

import lorahub
from lorahub.digest import Digest
from lorahub.info import MergedInfo
from lorahub.serve.mapping import commit_id, merged_commit_id

SQL = "local/sql"  # sql:v1 has two variants: adapter a for llama, wide-ad for wide
SOLO = "local/solo"  # solo:v1 is adapter ad2, for llama only
MERGE_LINE = "merged 1 adapter(s) into"  # lorahub.merge.writer's INFO line, once per merge


class World:
    def __init__(self, server: Server, home: Path, world: Path) -> None:
        self.server, self.home, self.world, self.url = server, home, world, server.url
        with lorahub.open(home) as hub:
            self.small = hub.resolve("sql:v1", base=world / "llama")
            self.wide = hub.resolve("sql:v1", base=world / "wide")
            self.solo = hub.get("solo:v1")
            self.bases = {b.name: b for b in hub.bases()}

    def merged_for(self, digest: str, base: str) -> list[Path]:
        """The merged cache's entries for an adapter merged into a base."""
        content_hash = self.bases[base].content_hash
        with lorahub.open(self.home) as hub:
            return [
                Path(e.path)
                for e in hub.merged_list()
                if e.adapters == ((digest, 1.0),) and e.base_content_hash == content_hash
            ]


@pytest.fixture(scope="module")
def served(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A store with the registered bases llama, llama-instruct and wide, ``sql:v1`` in two
    variants and ``solo:v1``, served with INFO logs (so each merge shows in the log)."""
    work = tmp_path_factory.mktemp("serve-merged")
    home = work / "store"
    with lorahub.open(home) as hub:
        for name in ("llama", "llama-instruct", "wide"):
            hub.add_base(world / name)
        hub.add(world / "a", name="sql:v1", base=world / "llama")
        hub.add(world / "wide-ad", name="sql:v1", base=world / "wide")
        hub.add(world / "ad2", name="solo:v1", base=world / "llama")
    env = {"LORAHUB_LOG_LEVEL": "INFO"}
    with serving(home, work, "--allow-anonymous", env=env) as server:
        yield World(server, home, world)


@pytest.fixture
def api(served: World, loopback_only: None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=served.url, token=False)


def _download(served: World, repo: str, name: str, revision: str, cache: Path) -> Path:
    from huggingface_hub import hf_hub_download

    kw = {"endpoint": served.url, "cache_dir": cache, "token": False}
    return Path(hf_hub_download(repo, name, revision=revision, **kw))


# ---------------------------------------------------------------------- variants


def test_refs_list_one_revision_per_variant(api, served):
    tags = {t.name: t.target_commit for t in api.list_repo_refs(SQL).tags}
    assert tags == {
        "v1@llama": commit_id(served.small.digest),
        "v1@wide": commit_id(served.wide.digest),
    }
    assert [t.name for t in api.list_repo_refs(SOLO).tags] == ["v1"]


def test_each_variant_downloads_by_its_revision(api, served, tmp_path):
    hub = lorahub.open(served.home)
    for revision, info in (("v1@llama", served.small), ("v1@wide", served.wide)):
        assert api.model_info(SQL, revision=revision).sha == commit_id(info.digest)
        got = _download(served, SQL, "adapter_model.safetensors", revision, tmp_path / "c")
        blob = hub.blobs.path(Digest.parse(info.weights_digest))
        assert got.read_bytes() == blob.read_bytes(), revision
    hub.close()
    # A base's fingerprint names it too; a registered base without a variant of its own gets
    # the variant lorahub picks for it (llama-instruct has llama's shapes).
    short = served.bases["wide"].content_hash.removeprefix("xxh128:")[:12]
    assert api.model_info(SQL, revision=f"v1@{short}").sha == commit_id(served.wide.digest)
    picked = api.model_info(SQL, revision="v1@llama-instruct").sha
    assert picked == commit_id(served.small.digest)


def test_an_ambiguous_tag_names_its_variants_in_the_clients_error(api, served, tmp_path):
    from huggingface_hub.errors import RevisionNotFoundError

    with pytest.raises(RevisionNotFoundError) as err:
        _download(served, SQL, "adapter_config.json", "v1", tmp_path / "c")
    text = str(err.value)  # a HEAD: the X-Error-Message header is all the client has
    assert "ambiguous" in text
    assert "v1@llama (base llama)" in text and "v1@wide (base wide)" in text
    with pytest.raises(RevisionNotFoundError, match=r"v1@llama \(base llama\), v1@wide"):
        api.model_info(SQL, revision="v1")
    with pytest.raises(RevisionNotFoundError, match="no variant of v1 for base 'nothing'"):
        api.model_info(SQL, revision="v1@nothing")


# ---------------------------------------------------------------------- merged checkpoints


def test_metadata_of_a_merged_revision_answers_without_merging(api, served):
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    revision = "v1+llama-instruct"
    info = api.model_info(SQL, revision=revision, files_metadata=True)
    content_hash = served.bases["llama-instruct"].content_hash
    assert info.sha == merged_commit_id(served.small.digest, content_hash)
    sizes = {s.rfilename: s.size for s in info.siblings}
    names = {"config.json", "generation_config.json", "model.safetensors", "README.md"}
    assert set(sizes) == names | {"lorahub.json"}
    weights = next(s for s in info.siblings if s.rfilename == "model.safetensors")
    assert weights.lfs is not None and weights.lfs.size == weights.size
    tree = {f.path: f.size for f in api.list_repo_tree(SQL, revision=revision)}
    assert tree == sizes
    for name in ("config.json", "model.safetensors"):
        url = hf_hub_url(SQL, name, revision=revision, endpoint=served.url)
        meta = get_hf_file_metadata(url, token=False)
        assert meta.commit_hash == info.sha and meta.etag and meta.size == sizes[name]
    assert served.merged_for(served.small.digest, "llama-instruct") == []  # nothing merged
    # The sizes announced are the merge's: the same merge made here gives the same files.
    with lorahub.open(served.home) as hub:
        out = hub.merged(served.world / "llama-instruct", "@" + served.small.digest)
    assert {p.name: p.stat().st_size for p in out.iterdir()} == sizes


def test_transformers_loads_a_merged_revision_with_the_merges_logits(served, tmp_path):
    script = """
import sys, torch
from transformers import AutoModelForCausalLM
repo, revision, out = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(repo, revision=revision or None).eval()
with torch.no_grad():
    torch.save(model(torch.arange(12).reshape(2, 6)).logits, out)
"""
    with lorahub.open(served.home) as hub:
        hub.merge(served.world / "llama", "sql:v1", out=tmp_path / "local-merge")
    env = client_env(served.home, served.url, tmp_path / "hf")
    import torch

    served_logits = client_logits(script, [SQL, "v1+llama"], env, tmp_path / "served.pt")
    local = [str(tmp_path / "local-merge"), ""]
    local_logits = client_logits(script, local, env, tmp_path / "local.pt")
    assert torch.allclose(served_logits, local_logits, rtol=0, atol=1e-6)
    # The adapter changed the model: these are not the base's logits.
    assert not torch.allclose(served_logits, _base_logits(served.world / "llama"), atol=1e-4)


def _base_logits(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(torch.arange(12).reshape(2, 6)).logits


def test_snapshot_of_a_merged_revision_is_the_merged_cache_byte_for_byte(api, served, tmp_path):
    snap = Path(api.snapshot_download(SQL, revision="v1+llama", cache_dir=tmp_path / "s"))
    content_hash = served.bases["llama"].content_hash
    assert snap.name == merged_commit_id(served.small.digest, content_hash)
    (entry,) = served.merged_for(served.small.digest, "llama")
    assert sorted(p.name for p in snap.iterdir()) == sorted(p.name for p in entry.iterdir())
    for p in entry.iterdir():
        assert (snap / p.name).read_bytes() == p.read_bytes(), p.name


def test_8_concurrent_first_downloads_merge_once(served, loopback_only, tmp_path):
    revision = "v1+llama"
    path = f"/{SOLO}/resolve/{revision}/model.safetensors"
    status, before, _ = served.server.request("HEAD", path)
    assert status == 200 and served.merged_for(served.solo.digest, "llama") == []

    def fetch(k: int) -> bytes:
        return _download(
            served, SOLO, "model.safetensors", revision, tmp_path / f"c{k}"
        ).read_bytes()

    with ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(fetch, range(8)))
    (entry,) = served.merged_for(served.solo.digest, "llama")
    weights = (entry / "model.safetensors").read_bytes()
    assert all(b == weights for b in bodies)
    merges = [line for line in served.server.output().splitlines() if MERGE_LINE in line]
    assert sum(entry.name in line for line in merges) == 1, merges
    # Ranges are served from the merged cache.
    status, headers, body = served.server.request("GET", path, headers={"Range": "bytes=8-99"})
    assert status == 206 and body == weights[8:100]
    # The ETag and size announced before the merge are those of the merged file.
    assert headers["x-linked-etag"] == before["x-linked-etag"] == before["etag"]
    assert headers["x-linked-size"] == before["x-linked-size"] == str(len(weights))
    assert before["x-linked-etag"].strip('"') != hashlib.sha256(weights).hexdigest()


def test_merged_revisions_that_cannot_be_served_are_revision_not_found(api, served, tmp_path):
    from huggingface_hub.errors import RevisionNotFoundError

    with pytest.raises(RevisionNotFoundError, match="no registered base model 'nobase'"):
        _download(served, SQL, "config.json", "v1+nobase", tmp_path / "c")
    with pytest.raises(RevisionNotFoundError, match="no registered base model 'nobase'"):
        api.model_info(SQL, revision="v1+nobase")
    with pytest.raises(RevisionNotFoundError, match="no adapter sql:v9"):
        api.model_info(SQL, revision="v9+llama")
    with pytest.raises(RevisionNotFoundError, match="fits"):  # solo has no variant for wide
        api.model_info(SOLO, revision="v1+wide")
    for bad in ("v1+..%2Fetc", "v1+a+b", "%24x+llama"):
        status, _, _ = served.server.request("GET", f"/api/models/{SQL}/revision/{bad}")
        assert status == 400, bad


def test_planned_files_of_a_sharded_merge_are_the_writers(hub, world, tmp_path):
    """What a merged revision announces before merging, for a base past the shard size: each
    shard's exact size and the index's bytes, as the merge then writes them."""
    from lorahub.base import open_base
    from lorahub.merge import merge_to_dir, plan_merge
    from lorahub.serve.merged import index_bytes

    base = open_base(world / "llama")
    adapter = hub.load_info(hub.add(world / "a", name="x").adapter)
    plan = plan_merge(base, [adapter], max_shard_size=40_000)
    merge_to_dir(base, [adapter], out=tmp_path / "m", max_shard_size=40_000)
    assert len(plan.shards) > 1
    assert (tmp_path / "m" / plan.index_name).read_bytes() == index_bytes(plan)
    for shard in plan.shards:
        assert (tmp_path / "m" / shard.name).stat().st_size == shard.file_bytes


def _entry(served: World, digest: str, base: str) -> MergedInfo:
    content_hash = served.bases[base].content_hash
    with lorahub.open(served.home) as hub:
        (entry,) = [
            e
            for e in hub.merged_list()
            if e.adapters == ((digest, 1.0),) and e.base_content_hash == content_hash
        ]
    return entry


def test_a_merge_in_progress_holds_no_request_thread(served, loopback_only):
    """48 downloads wait for a merge that cannot finish yet (another process holds the
    merged cache's lock, as while it merges): model info of another repo still answers at
    once, since the waiting downloads hold none of the server's request threads; once the
    lock is released, the merge runs once and every download gets the merged weights."""
    from lorahub.layout import merged_lock

    path = f"/{SOLO}/resolve/v1+llama-instruct/model.safetensors"
    started = f"merging {served.solo.short} into llama-instruct for {SOLO}"
    (served.home / "merged").mkdir(exist_ok=True)
    with ThreadPoolExecutor(48) as pool, contextlib.ExitStack() as held:
        for i in range(256):  # every lock file: whatever the checkpoint's key
            held.enter_context(merged_lock(served.home / "merged", f"{i:02x}"))
        downloads = [pool.submit(served.server.request, "GET", path) for _ in range(48)]
        deadline = time.monotonic() + 60
        while started not in served.server.output():
            assert time.monotonic() < deadline, served.server.output()
            time.sleep(0.05)
        time.sleep(0.5)  # every download has reached the server
        conn = http.client.HTTPConnection("127.0.0.1", served.server.port, timeout=10)
        t0 = time.monotonic()
        conn.request("GET", f"/api/models/{SQL}/revision/v1@llama")
        res = conn.getresponse()
        elapsed, body = time.monotonic() - t0, res.read()
        conn.close()
        assert res.status == 200 and json.loads(body)["sha"] == commit_id(served.small.digest)
        assert elapsed < 5 and not any(d.done() for d in downloads)
        held.close()  # the other process is done: the merge goes on
        results = [d.result(timeout=120) for d in downloads]
    entry = _entry(served, served.solo.digest, "llama-instruct")
    weights = (Path(entry.path) / "model.safetensors").read_bytes()
    assert all(status == 200 and body == weights for status, _, body in results)
    merges = [line for line in served.server.output().splitlines() if MERGE_LINE in line]
    assert sum(Path(entry.path).name in line for line in merges) == 1, merges


def test_each_download_marks_its_merged_checkpoint_used(served):
    """A checkpoint served from the server's memory still refreshes its catalog row's last
    use, so the merged cache does not evict the one served most first."""
    from lorahub.catalog import db
    from lorahub.catalog import merged as merged_q

    path = f"/{SQL}/resolve/v1+llama-instruct/model.safetensors"
    status, _, first = served.server.request("GET", path)
    assert status == 200
    entry = _entry(served, served.small.digest, "llama-instruct")
    old = entry.last_used_at - timedelta(days=30)
    with lorahub.open(served.home) as hub, db.write_session(hub.engine) as s:
        row = merged_q.get(s, entry.key)
        assert row is not None
        row.last_used_at = old
    status, _, again = served.server.request("GET", path)
    assert status == 200 and again == first
    assert _entry(served, served.small.digest, "llama-instruct").last_used_at > old


def test_a_checkpoint_evicted_before_its_shard_is_opened_is_merged_again(served):
    """The server knows a checkpoint's folder, but its files went (evicted by another
    process between the lookup and the send): the download merges it again, no 500."""
    path = f"/{SQL}/resolve/v1+wide/model.safetensors"
    status, _, first = served.server.request("GET", path)
    assert status == 200
    entry = _entry(served, served.wide.digest, "wide")
    with lorahub.open(served.home) as hub:
        assert hub.merged_remove([entry.key]) == [entry.key]
    Path(entry.path).mkdir()  # still a folder where the server looks, without the shard
    status, headers, again = served.server.request("GET", path)
    assert status == 200 and again == first, headers
    assert (Path(entry.path) / "model.safetensors").read_bytes() == first
    assert _entry(served, served.wide.digest, "wide").key == entry.key
