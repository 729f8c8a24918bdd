"""``lorahub serve`` (read slice): a real server process on 127.0.0.1, driven by the real
huggingface_hub client, PEFT and ``lorahub pull``."""

from __future__ import annotations

import hashlib
import http.client
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from factories import cli_runner
from servekit import client_env, client_logits, serving

import lorahub
from lorahub.formats.peft_folder import FILES
from lorahub.serve.mapping import commit_id

REPO = "local/sql-expert"
TEAM = "team/other"


class Served:
    def __init__(self, url: str, home: Path, digest: str, other: str, work: Path) -> None:
        self.url, self.home, self.digest, self.other, self.work = url, home, digest, other, work

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
        """A raw request (the path sent as is, never normalised)."""
        conn = http.client.HTTPConnection("127.0.0.1", int(self.url.rsplit(":", 1)[1]), timeout=30)
        try:
            conn.request("GET", path, headers=headers or {})
            res = conn.getresponse()
            return res.status, {k.lower(): v for k, v in res.getheaders()}, res.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def served(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A store holding ``sql-expert:v1`` (= latest, adapter ``a``) and ``team/other:v1``
    (adapter ``b``), served by ``lorahub serve --allow-anonymous`` in a subprocess."""
    work = tmp_path_factory.mktemp("serve")
    home = work / "store"
    run = cli_runner(home)
    run("add", world / "a", "--name", "sql-expert:v1")
    run("tag", "sql-expert:v1", "sql-expert:latest")
    run("add", world / "b", "--name", "team/other:v1")
    with lorahub.open(home) as hub:
        digest = hub.get("sql-expert:v1").digest
        other = hub.get("team/other:v1").digest
    with serving(home, work, "--allow-anonymous") as server:
        yield Served(server.url, home, digest, other, work)


@pytest.fixture
def api(served: Served, loopback_only: None, tmp_path: Path):
    from huggingface_hub import HfApi

    return HfApi(endpoint=served.url, token=False)


@pytest.fixture
def exported(served: Served, tmp_path: Path) -> dict[str, bytes]:
    """The files ``lorahub export`` writes for sql-expert:v1, and those a push uploads."""
    cli_runner(served.home)("export", "sql-expert:v1", tmp_path / "export")
    out = {n: (tmp_path / "export" / n).read_bytes() for n in FILES}
    from lorahub.export import recorded_base_repo
    from lorahub.remote.push import write_push_files

    with lorahub.open(served.home) as hub:
        info = hub.get("sql-expert:v1")
        (tmp_path / "push").mkdir()
        blob = hub.blobs.path(lorahub.digest.Digest.parse(info.weights_digest))
        pushed = write_push_files(
            info,
            blob,
            tmp_path / "push",
            title=REPO,
            recorded_base=recorded_base_repo(hub._store, info),
        )
    out |= {f"push/{n}": p.read_bytes() for n, p in pushed.items()}
    return out


def test_model_info_lists_the_peft_folder_with_a_stable_commit(api, served):
    info = api.model_info(REPO)
    assert info.id == REPO
    assert info.sha == commit_id(served.digest) and len(info.sha) == 40
    assert [s.rfilename for s in info.siblings] == list(FILES)
    assert api.model_info(REPO, revision="v1").sha == info.sha
    assert api.model_info(REPO, revision=info.sha).sha == info.sha
    assert api.model_info(TEAM, revision="v1").sha == commit_id(served.other)
    full = api.model_info(REPO, files_metadata=True)
    weights = next(s for s in full.siblings if s.rfilename == "adapter_model.safetensors")
    assert weights.lfs is not None and weights.lfs.size == weights.size > 0
    refs = api.list_repo_refs(REPO)
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", info.sha)]
    assert {t.name for t in refs.tags} == {"latest", "v1"}
    assert sorted(api.list_repo_files(REPO)) == sorted(FILES)


def test_each_file_downloads_byte_exact(api, served, exported, tmp_path):
    from huggingface_hub import hf_hub_download

    for name in FILES:
        path = hf_hub_download(
            REPO, name, revision="v1", endpoint=served.url, cache_dir=tmp_path / "c", token=False
        )
        expected = exported[name] if name.endswith("safetensors") else exported[f"push/{name}"]
        assert Path(path).read_bytes() == expected, name
    assert exported["adapter_config.json"] == exported["push/adapter_config.json"]
    snap = Path(api.snapshot_download(REPO, revision="main", cache_dir=tmp_path / "s"))
    assert sorted(p.name for p in snap.iterdir()) == sorted(FILES)
    assert snap.name == commit_id(served.digest)
    weights = (snap / "adapter_model.safetensors").read_bytes()
    assert weights == exported["adapter_model.safetensors"]


def test_resolve_headers_and_a_range_request(served, exported, loopback_only):
    weights = exported["adapter_model.safetensors"]
    path = f"/{REPO}/resolve/v1/adapter_model.safetensors"
    status, headers, body = served.get(path)
    assert status == 200 and body == weights
    assert headers["x-linked-etag"] == f'"{hashlib.sha256(weights).hexdigest()}"'
    assert headers["x-linked-size"] == str(len(weights))
    assert headers["x-repo-commit"] == commit_id(served.digest)
    assert not [h for h in headers if "xet" in h]
    status, headers, body = served.get(path, {"Range": "bytes=10-99"})
    assert status == 206 and body == weights[10:100]
    assert headers["content-range"] == f"bytes 10-99/{len(weights)}"
    # Offsets of thousands of digits (int() refuses past 4,300): a start past any file is
    # unsatisfiable; an end past the file's is its end.
    huge = "9" * 5000
    status, headers, _ = served.get(path, {"Range": f"bytes={huge}-"})
    assert status == 416 and headers["content-range"] == f"bytes */{len(weights)}"
    status, headers, body = served.get(path, {"Range": f"bytes=5-{huge}"})
    assert status == 206 and body == weights[5:]
    zeros = "0" * 25  # leading zeros say nothing of a number's size
    status, _, body = served.get(path, {"Range": f"bytes={zeros}5-"})
    assert status == 206 and body == weights[5:]
    status, _, body = served.get(path, {"Range": f"bytes=5-{zeros}10"})
    assert status == 206 and body == weights[5:11]
    assert headers["content-range"] == f"bytes 5-{len(weights) - 1}/{len(weights)}"


def test_list_models_by_search_author_and_base(api, served):
    assert [m.id for m in api.list_models(search="sql")] == [REPO]
    assert [m.id for m in api.list_models(author="team")] == [TEAM]
    assert {m.id for m in api.list_models()} == {REPO, TEAM}
    # The world's adapters name no Hub base: no base_model tag, so the filter finds none.
    assert list(api.list_models(filter="base_model:adapter:tiny/llama")) == []
    tags = api.model_info(REPO).tags
    assert "peft" in tags
    assert len(list(api.list_models(limit=1))) == 1
    for limit in ("0", "-1", "x"):
        status, _, body = served.get(f"/api/models?limit={limit}")
        assert status == 400 and b"invalid limit" in body


def test_unknown_repo_revision_and_file_raise_the_clients_errors(api, served, tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    with pytest.raises(RepositoryNotFoundError):
        api.model_info("local/nothing")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="v9")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="0" * 40)
    kw = {"endpoint": served.url, "cache_dir": tmp_path / "c", "token": False}
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.bin", **kw)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "adapter_config.json", revision="v9", **kw)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("nobody/nothing", "adapter_config.json", **kw)
    assert not api.file_exists(REPO, "missing.bin")
    assert api.file_exists(REPO, "adapter_config.json")
    # team/other has no `latest`: its main is empty, as a Hub repo's main always exists
    # (transformers probes main for adapter_config.json and takes only a missing file).
    with pytest.raises(EntryNotFoundError, match="no `latest` tag"):
        hf_hub_download(TEAM, "adapter_config.json", **kw)
    assert hf_hub_download(TEAM, "adapter_config.json", revision="v1", **kw)


@pytest.mark.parametrize(
    "path",
    [
        "/local/..%2F..%2Fetc/resolve/main/adapter_config.json",
        "/local/sql-expert/resolve/..%2F..%2Fmain/adapter_config.json",
        "/local/sql-expert/resolve/main/..%2F..%2Florahub.db",
        "/local/sql-expert/resolve/main/../../lorahub.db",
        "/api/models/local/sql-expert%00/revision/main",
        "/api/models/local/sql-expert/revision/v1%2F..%2F..",
        "/api/models/..%2Flocal/sql-expert",
    ],
)
def test_path_traversal_is_refused(served, path, loopback_only):
    status, _, body = served.get(path)
    assert 400 <= status < 500, (path, status)
    assert b"peft_type" not in body and b"SQLite" not in body


def test_whoami_is_401_for_anonymous_and_xet_is_never_offered(served, loopback_only):
    status, _, _ = served.get("/api/whoami-v2")
    assert status == 401
    status, headers, _ = served.get(f"/api/models/{REPO}/xet-read-token/main")
    assert status == 404 and not [h for h in headers if h.startswith("x-xet")]


def test_32_concurrent_downloads_are_byte_exact(served, exported, loopback_only):
    weights = exported["adapter_model.safetensors"]
    url = f"{served.url}/{REPO}/resolve/main/adapter_model.safetensors"

    def fetch(_: int) -> bytes:
        with urllib.request.urlopen(url, timeout=60) as r:
            return bytes(r.read())

    with ThreadPoolExecutor(32) as pool:
        bodies = list(pool.map(fetch, range(32)))
    assert all(b == weights for b in bodies)


def test_peft_from_pretrained_through_hf_endpoint_gives_the_adapters_logits(
    served, world, tmp_path
):
    script = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(base).eval()
model = PeftModel.from_pretrained(model, adapter, revision="v1").eval()
with torch.no_grad():
    torch.save(model(torch.arange(12).reshape(2, 6)).logits, out)
"""
    env = client_env(served.home, served.url, tmp_path / "hf")
    import torch

    base = str(world / "llama")
    served_logits = client_logits(script, [base, REPO], env, tmp_path / "served.pt")
    local_logits = client_logits(script, [base, str(world / "a")], env, tmp_path / "local.pt")
    assert torch.equal(served_logits, local_logits)


def test_lorahub_pull_from_the_server_gives_the_same_digest(served, tmp_path):
    other = tmp_path / "second"
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "from lorahub.cli import main; main()",
            "--home",
            str(other),
            "pull",
            f"{REPO}@v1",
            "--json",
        ],
        env=client_env(other, served.url, tmp_path / "hf"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["digest"] == served.digest
    with lorahub.open(other) as hub:
        assert hub.get(f"{REPO}:v1").digest == served.digest
