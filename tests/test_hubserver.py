"""The test Hub server, driven by the real ``huggingface_hub`` client.

These tests pin down that :mod:`tests.hubserver` is faithful enough for lorahub's push/pull tests to
mean something: each one goes through the public client API, over a socket, and checks both what
the client returned and what crossed the wire.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

# The client reads these at import time (Xet above all: with it on, uploads bypass LFS entirely and
# fail against a server without Xet). Only set them if nothing imported the client before us; a
# conftest that did so is expected to have set them itself.
if "huggingface_hub" not in sys.modules:
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_HUB_VERBOSITY"] = "error"
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

import huggingface_hub
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.hubserver import HubServer

ALICE = "hf_alice_write"
BOB = "hf_bob_write"
READER = "hf_alice_read"


@pytest.fixture(autouse=True)
def _isolated_client(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, loopback_only: None) -> None:
    """Keep the client on plain HTTP, away from the user's token and cache, and off the network.

    The runtime constants are patched too, because the client may have been imported before this
    module set the environment. ``loopback_only`` (conftest) refuses every name but loopback,
    which proves no test reaches beyond 127.0.0.1.
    """
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_token(ALICE, "alice")
        server.add_token(BOB, "bob")
        server.add_token(READER, "alice", can_write=False)
        yield server
        assert server.errors == [], "the server hit a bug:\n" + "\n".join(server.errors)


@pytest.fixture
def api(hub: HubServer) -> HfApi:
    return HfApi(endpoint=hub.url, token=ALICE)


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    """A small JSON config and a 1 MB binary weights file: one regular file and one LFS file."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16}\n')
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 16 + os.urandom(1024 * 1024))
    return folder


def _push_adapter(api: HfApi, hub: HubServer, folder: Path, repo_id: str = "alice/adapter") -> str:
    api.create_repo(repo_id)
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Add adapter")
    api.create_tag(repo_id, tag="v1", revision=info.oid)
    return info.oid


def test_upload_then_download_at_branch_tag_and_sha(
    hub: HubServer, api: HfApi, adapter_dir: Path, tmp_path: Path
) -> None:
    sha = _push_adapter(api, hub, adapter_dir)
    expected = {path.name: path.read_bytes() for path in adapter_dir.iterdir()}

    assert api.list_repo_files("alice/adapter") == [
        ".gitattributes",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert hub.lfs_paths("alice/adapter") == {"adapter_model.safetensors"}
    assert hub.commit_sha("alice/adapter", "v1") == sha
    assert api.model_info("alice/adapter").sha == sha

    for revision in ("main", "v1", sha):
        cache = tmp_path / f"cache-{revision}"
        for name, content in expected.items():
            path = hf_hub_download(
                "alice/adapter",
                name,
                revision=revision,
                cache_dir=cache,
                endpoint=hub.url,
                token=False,
            )
            assert Path(path).read_bytes() == content
        snapshot = snapshot_download(
            "alice/adapter",
            revision=revision,
            cache_dir=cache / "snap",
            endpoint=hub.url,
            token=False,
        )
        assert Path(snapshot).name == sha
        for name, content in expected.items():
            assert (Path(snapshot) / name).read_bytes() == content

    # LFS bytes came from the "CDN" origin, which the client reached without its credentials.
    cdn_gets = [r for r in hub.requests if r.method == "GET" and r.path.startswith("/_cdn/")]
    assert cdn_gets and all(r.headers["host"].startswith("localhost:") for r in cdn_gets)
    assert all("authorization" not in r.headers for r in cdn_gets)


def test_lfs_download_bytes_are_counted(hub: HubServer, api: HfApi, adapter_dir: Path) -> None:
    _push_adapter(api, hub, adapter_dir)
    hub.clear_log()
    hf_hub_download(
        "alice/adapter",
        "adapter_model.safetensors",
        cache_dir=adapter_dir.parent / "cache",
        endpoint=hub.url,
        token=ALICE,
    )
    assert hub.bytes_downloaded == (adapter_dir / "adapter_model.safetensors").stat().st_size
    assert hub.count("HEAD", "/resolve/main/adapter_model.safetensors") == 1
    resolve_head = next(r for r in hub.requests if r.method == "HEAD")
    assert resolve_head.status == 302
    assert resolve_head.headers["authorization"] == f"Bearer {ALICE}"


def test_identical_upload_makes_no_commit_and_sends_no_bytes(
    hub: HubServer, api: HfApi, adapter_dir: Path
) -> None:
    sha = _push_adapter(api, hub, adapter_dir)
    assert hub.bytes_uploaded == (adapter_dir / "adapter_model.safetensors").stat().st_size
    hub.clear_log()

    again = api.upload_folder(repo_id="alice/adapter", folder_path=adapter_dir)

    assert again.oid == sha
    assert hub.count("PUT") == 0
    assert hub.bytes_uploaded == 0
    assert hub.count("POST", "/commit/") == 0
    assert len(api.list_repo_commits("alice/adapter")) == 2  # initial commit + the adapter


def test_changed_file_is_committed_and_unchanged_one_is_not_reuploaded(
    hub: HubServer, api: HfApi, adapter_dir: Path
) -> None:
    first = _push_adapter(api, hub, adapter_dir)
    (adapter_dir / "adapter_config.json").write_text('{"r": 16}\n')
    hub.clear_log()

    second = api.upload_folder(repo_id="alice/adapter", folder_path=adapter_dir)

    assert second.oid != first
    assert hub.count("PUT") == 0
    assert hub.repo_files("alice/adapter")["adapter_config.json"] == b'{"r": 16}\n'
    assert hub.repo_files("alice/adapter", "v1")["adapter_config.json"] != b'{"r": 16}\n'


def test_private_repo_is_indistinguishable_from_a_missing_one(
    hub: HubServer, tmp_path: Path
) -> None:
    hub.seed_repo("alice/secret", {"adapter_config.json": b"{}"}, private=True)

    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(
            "alice/secret", "adapter_config.json", cache_dir=tmp_path, endpoint=hub.url, token=False
        )
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=BOB).model_info("alice/secret")
    assert HfApi(endpoint=hub.url, token=READER).model_info("alice/secret").private is True


def test_unknown_token_is_an_auth_error_not_a_missing_repo(hub: HubServer) -> None:
    hub.seed_repo("alice/public", {"adapter_config.json": b"{}"})

    with pytest.raises(HfHubHTTPError) as caught:
        HfApi(endpoint=hub.url, token="hf_forged").model_info("alice/public")

    assert not isinstance(caught.value, RepositoryNotFoundError)
    assert caught.value.response.status_code == 401


def test_writes_need_a_write_token_for_the_namespace(hub: HubServer, adapter_dir: Path) -> None:
    hub.seed_repo("alice/adapter", {"adapter_config.json": b"{}"})

    for token in (READER, BOB):
        with pytest.raises(HfHubHTTPError) as caught:
            HfApi(endpoint=hub.url, token=token).upload_folder(
                repo_id="alice/adapter", folder_path=adapter_dir
            )
        assert caught.value.response.status_code == 403
    assert hub.count("PUT") == 0


def test_missing_revision_file_and_gated_repo_raise_the_client_errors(
    hub: HubServer, tmp_path: Path
) -> None:
    hub.seed_repo("alice/public", {"adapter_config.json": b"{}"})
    hub.seed_repo("alice/gated", {"adapter_config.json": b"{}"}, gated=True)

    def download(
        repo_id: str, filename: str, revision: str = "main", token: str | bool = False
    ) -> str:
        return hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            cache_dir=tmp_path,
            endpoint=hub.url,
            token=token,
        )

    with pytest.raises(RevisionNotFoundError):
        download("alice/public", "adapter_config.json", revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        download("alice/public", "missing.json")
    with pytest.raises(GatedRepoError):
        download("alice/gated", "adapter_config.json")
    with pytest.raises(GatedRepoError):
        download("alice/gated", "adapter_config.json", token=BOB)

    hub.grant_access("alice/gated", "bob")
    assert Path(download("alice/gated", "adapter_config.json", token=BOB)).read_bytes() == b"{}"


def test_create_repo_conflict_and_exist_ok(hub: HubServer, api: HfApi) -> None:
    url = api.create_repo("alice/adapter")
    assert url.repo_id == "alice/adapter"
    assert api.list_repo_files("alice/adapter") == [".gitattributes"]

    with pytest.raises(HfHubHTTPError) as caught:
        api.create_repo("alice/adapter")
    assert caught.value.response.status_code == 409
    assert api.create_repo("alice/adapter", exist_ok=True).repo_id == "alice/adapter"

    api.delete_repo("alice/adapter")
    assert not api.repo_exists("alice/adapter")


def test_refs_tags_branches_and_commits(hub: HubServer, api: HfApi, adapter_dir: Path) -> None:
    sha = _push_adapter(api, hub, adapter_dir)
    api.create_branch("alice/adapter", branch="dev", revision="v1")

    refs = api.list_repo_refs("alice/adapter")
    assert {(b.name, b.target_commit) for b in refs.branches} == {("main", sha), ("dev", sha)}
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", sha)]

    commits = api.list_repo_commits("alice/adapter", revision="dev")
    assert commits[0].commit_id == sha
    assert commits[0].title == "Add adapter"

    api.delete_tag("alice/adapter", tag="v1")
    assert api.list_repo_refs("alice/adapter").tags == []
    assert not api.revision_exists("alice/adapter", "v1")


def test_safetensors_metadata_is_read_with_a_range_request(
    hub: HubServer, api: HfApi, tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch")
    save_file = pytest.importorskip("safetensors.torch").save_file
    folder = tmp_path / "model"
    folder.mkdir()
    save_file(
        {"lora_A": torch.zeros(4, 8), "lora_B": torch.ones(8, 4)}, folder / "model.safetensors"
    )
    api.create_repo("alice/model")
    api.upload_folder(repo_id="alice/model", folder_path=folder)
    hub.clear_log()

    metadata = api.get_safetensors_metadata("alice/model")

    tensors = metadata.files_metadata["model.safetensors"].tensors
    assert tensors["lora_A"].shape == [4, 8]
    assert tensors["lora_B"].dtype == "F32"
    ranged = [r for r in hub.requests if "range" in r.headers]
    assert ranged and all(r.status == 206 for r in ranged if r.path.startswith("/_cdn/"))


def test_hostile_downloads(hub: HubServer, tmp_path: Path) -> None:
    weights = b"\0" + os.urandom(64 * 1024)
    hub.seed_repo(
        "eve/adapter",
        {
            "adapter_model.safetensors": weights,
            "adapter_config.json": b"{}",
            "../escape.txt": b"!",
            "/abs.txt": b"!",
        },
    )

    def download(filename: str, cache: str) -> bytes:
        path = hf_hub_download(
            "eve/adapter", filename, cache_dir=tmp_path / cache, endpoint=hub.url, token=False
        )
        return Path(path).read_bytes()

    hub.truncate_downloads = {"adapter_model.safetensors": 1000}
    with pytest.raises(OSError, match="Consistency check failed"):
        download("adapter_model.safetensors", "truncated")

    hub.truncate_downloads = {}
    hub.replace_downloads = {"adapter_model.safetensors": b"x" * len(weights)}
    # The client checks sizes only, so same-size tampering gets through: lorahub must hash itself.
    assert download("adapter_model.safetensors", "tampered") == b"x" * len(weights)

    listed = HfApi(endpoint=hub.url).list_repo_files("eve/adapter", token=False)
    assert {"../escape.txt", "/abs.txt"} <= set(listed)
    with pytest.raises(ValueError, match="Invalid filename"):
        snapshot_download("eve/adapter", cache_dir=tmp_path / "snap", endpoint=hub.url, token=False)
