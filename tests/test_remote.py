"""Push and pull with the real huggingface_hub client, over HTTP, against tests.hubserver.

Every test talks to a Hub look-alike on 127.0.0.1 (no request may leave loopback), so what is
asserted about "what crossed the wire" is counted from the requests the server received.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from factories import cli_runner, peft_adapter, tiny_llama, write_peft_adapter
from hubserver import HubServer
from huggingface_hub import HfApi, ModelCard, constants, snapshot_download

import lorahub
from lorahub import remote
from lorahub.digest import hash_bytes
from lorahub.errors import IntegrityError, InvalidAdapter, InvalidReference, RemoteError
from lorahub.formats.peft import read_peft_dir
from lorahub.manifest import BaseRef, digest_of

# Every LFS upload of huggingface_hub 2.4 trips an httpx2 deprecation warning; it is not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CANARY = "hf_CANARY_tok3n_that_must_never_leak_0123456789"
READER = "hf_alice_read_only"
BOB = "hf_bob_write"
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md", "lorahub.json"}


@pytest.fixture(autouse=True)
def hf_client(monkeypatch, tmp_path, loopback_only):
    """The client as a user has it (implicit token, HF_TOKEN), minus Xet, plus a private cache,
    and only loopback to reach.

    The constants are patched because the client read the environment when it was imported.
    """
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-stored-tokens"))
    monkeypatch.setenv("HF_TOKEN", CANARY)


@pytest.fixture
def server(hub_server):
    """The shared test Hub, where alice (the canary token, of org myorg) and bob may write."""
    hub_server.add_token(CANARY, "alice", orgs=["myorg"])
    hub_server.add_token(READER, "alice", can_write=False)
    hub_server.add_token(BOB, "bob")
    return hub_server


@pytest.fixture
def stores(tmp_path):
    opened = []

    def make(name: str):
        hub = lorahub.open(tmp_path / f"store-{name}")
        opened.append(hub)
        return hub

    yield make
    for hub in opened:
        hub.close()


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def state(hub) -> tuple[list, dict[str, bytes]]:
    """What a store holds: catalog entries and blob files, to assert 'unchanged'."""
    blobs = {
        str(p.relative_to(hub.home)): p.read_bytes()
        for p in sorted((hub.home / "blobs").rglob("*"))
        if p.is_file()
    }
    return [(i.digest, i.refs, i.origin) for i in hub.list_adapters()], blobs


def resolved_paths(server: HubServer) -> list[str]:
    return [r.path for r in server.requests if "/resolve/" in r.path or r.path.startswith("/_cdn/")]


# ---------------------------------------------------------------------- push


def test_push_writes_a_peft_repo_with_card_and_manifest(server, stores, tmp_path):
    hub = stores("a")
    info = hub.add(write_peft_adapter(tmp_path / "src"), name="sql-expert:v1").adapter

    result = hub.push("sql-expert:v1", "myorg/sql-expert")

    files = server.repo_files("myorg/sql-expert")
    assert set(files) == {".gitattributes"} | ADAPTER_FILES
    assert server.lfs_paths("myorg/sql-expert") == {"adapter_model.safetensors"}
    assert str(hash_bytes(files["adapter_model.safetensors"])) == info.weights_digest
    assert json.loads(files["adapter_config.json"]) == info.config

    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "peft"
    assert card.data.base_model == "tiny/llama"
    assert card.data.base_model_relation == "adapter"
    assert {"lora", "lorahub"} <= set(card.data.tags)
    for text in ("rank: 4", "alpha: 8", "q_proj, v_proj", "base fingerprint", "provenance"):
        assert text in card.text

    doc = json.loads(files["lorahub.json"])
    assert doc["digest"] == info.digest == str(digest_of(doc["manifest"]))
    assert doc["manifest"]["base"] == {"name": "tiny/llama"}
    assert doc["manifest"]["provenance"] == {"kind": "import"}

    sha = server.commit_sha("myorg/sql-expert")
    assert (result.commit, result.committed, result.revision) == (sha, True, "main")
    assert result.commit_url == f"{server.url}/myorg/sql-expert/commit/{sha}"
    assert result.url == f"{server.url}/myorg/sql-expert"
    assert result.digest == info.digest
    assert set(result.files_uploaded) == ADAPTER_FILES
    assert result.bytes_uploaded == sum(len(files[f]) for f in ADAPTER_FILES)
    assert server.bytes_uploaded == len(files["adapter_model.safetensors"])


def test_pushing_again_makes_no_commit_and_uploads_nothing(server, stores, tmp_path):
    hub = stores("a")
    hub.add(write_peft_adapter(tmp_path / "src"), name="sql-expert:v1")
    first = hub.push("sql-expert:v1", "myorg/sql-expert", tag="v1")
    hub.tag("sql-expert:v1", "other-name:x")  # local names must not leak into the repo
    server.clear_log()

    again = hub.push("sql-expert:v1", "myorg/sql-expert", tag="v1")

    assert server.count("PUT") == 0 and server.bytes_uploaded == 0
    assert server.count("POST", "/commit/") == 0
    assert server.count("POST", "/tag/") == 1  # tried; already there at this very commit
    assert (again.commit, again.committed, again.bytes_uploaded) == (first.commit, False, 0)
    assert again.files_uploaded == ()
    assert len(HfApi(endpoint=server.url).list_repo_commits("myorg/sql-expert")) == 2


def test_push_to_a_private_repo_a_new_branch_with_a_tag(server, stores, tmp_path):
    hub = stores("a")
    hub.add(write_peft_adapter(tmp_path / "src"), name="sql-expert:v1")

    result = hub.push("sql-expert:v1", "myorg/sql-expert", private=True, revision="dev", tag="v1")

    api = HfApi(endpoint=server.url, token=CANARY)
    assert api.model_info("myorg/sql-expert").private is True
    assert set(server.repo_files("myorg/sql-expert", "dev")) >= ADAPTER_FILES
    assert set(server.repo_files("myorg/sql-expert", "main")) == {".gitattributes"}
    assert server.commit_sha("myorg/sql-expert", "v1") == result.commit
    assert result.url.endswith("/myorg/sql-expert/tree/dev")
    with pytest.raises(huggingface_hub.errors.RepositoryNotFoundError):
        HfApi(endpoint=server.url, token=False).model_info("myorg/sql-expert")

    # The same tag for another adapter is refused before anything is committed.
    hub.add(write_peft_adapter(tmp_path / "other", seed=7), name="other:v1")
    with pytest.raises(RemoteError, match=r"tag 'v1' already exists in myorg/sql-expert"):
        hub.push("other:v1", "myorg/sql-expert", revision="dev", tag="v1")
    assert server.commit_sha("myorg/sql-expert", "v1") == result.commit
    assert server.commit_sha("myorg/sql-expert", "dev") == result.commit  # the branch stayed
    # Pushing the same adapter again with the same tag is a no-op, not an error.
    again = hub.push("sql-expert:v1", "myorg/sql-expert", revision="dev", tag="v1")
    assert again.commit == result.commit and not again.committed


def test_private_flag_on_an_existing_public_repo_is_refused_before_upload(server, stores, tmp_path):
    hub = stores("a")
    hub.add(write_peft_adapter(tmp_path / "src"), name="a:v1")
    HfApi(endpoint=server.url, token=CANARY).create_repo("myorg/public")
    server.clear_log()
    with pytest.raises(RemoteError, match="already exists and is public"):
        hub.push("a:v1", "myorg/public", private=True)
    assert server.count("POST", "/commit/") == 0 and server.count("PUT") == 0


def test_push_into_a_folder_and_pull_it_back(server, stores, tmp_path):
    hub = stores("a")
    info = hub.add(write_peft_adapter(tmp_path / "src"), name="a:v1").adapter
    result = hub.push("a:v1", "myorg/many", path_in_repo="adapters/sql/")
    assert result.path_in_repo == "adapters/sql"
    assert {f"adapters/sql/{f}" for f in ADAPTER_FILES} <= set(server.repo_files("myorg/many"))

    pulled = stores("b").pull("myorg/many", subfolder="adapters/sql")
    assert pulled.digest == info.digest
    assert pulled.origin["subfolder"] == "adapters/sql"
    assert pulled.refs == ("myorg/many-adapters-sql:latest",)
    with pytest.raises(InvalidReference, match="not a plain relative folder"):
        hub.push("a:v1", "myorg/many", path_in_repo="../up")


@pytest.mark.parametrize(
    ("token", "match"),
    [
        (None, r"needs a Hugging Face token with write access: log in with `hf auth login`"),
        (READER, r"your token cannot write to myorg/sql-expert"),
        (BOB, r"your token cannot write to myorg/sql-expert"),
        ("hf_forged", r"refused the credentials"),
    ],
    ids=["no-token", "read-only", "other-user", "unknown-token"],
)
def test_push_without_the_right_token_says_what_to_do(
    server, stores, tmp_path, monkeypatch, token, match
):
    hub = stores("a")
    hub.add(write_peft_adapter(tmp_path / "src"), name="a:v1")
    HfApi(endpoint=server.url, token=CANARY).create_repo("myorg/sql-expert")
    if token is None:
        monkeypatch.delenv("HF_TOKEN")
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    with pytest.raises(RemoteError, match=match) as caught:
        hub.push("a:v1", "myorg/sql-expert")
    assert token is None or token not in str(caught.value)
    assert set(server.repo_files("myorg/sql-expert")) == {".gitattributes"}


# ---------------------------------------------------------------------- round trip


def test_round_trip_same_digest_same_show_same_logits(server, tmp_path, monkeypatch):
    from peft import PeftModel

    src = tmp_path / "src"
    peft_adapter(tiny_llama(), src, r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    on_a, on_b = cli_runner(tmp_path / "home-a"), cli_runner(tmp_path / "home-b")

    def lh(run, *args):
        return run(*args).output

    lh(on_a, "add", src, "--name", "sql-expert:v1")
    pushed = lh(on_a, "push", "sql-expert:v1", "myorg/sql-expert", "--tag", "v1")
    assert pushed.startswith("pushed") and "/myorg/sql-expert/commit/" in pushed
    pulled = lh(on_b, "pull", "myorg/sql-expert@v1", "--name", "sql-expert:v1")
    assert pulled.startswith("pulled")

    a = json.loads(lh(on_a, "show", "sql-expert:v1", "--json"))
    b = json.loads(lh(on_b, "show", "sql-expert:v1", "--json"))
    assert a["digest"] == b["digest"] and a["manifest"] == b["manifest"]
    sha = server.commit_sha("myorg/sql-expert", "v1")
    assert b["origin_kind"] == "pull"
    # The model card PEFT saved beside the adapter went along (kept apart from identity).
    assert "# Model Card for Model ID" in b["card"]
    listed = json.loads(lh(on_b, "ls", "--json"))[0]  # a listing gives the card's size only
    assert "card" not in listed and listed["card_bytes"] == len(b["card"].encode())
    assert b["origin"] == {
        "endpoint": server.url,
        "repo_id": "myorg/sql-expert",
        "revision": "v1",
        "commit": sha,
        "format": "peft-safetensors",
    }

    def identity_lines(text):
        lines = text.splitlines()
        cut = next(i for i, line in enumerate(lines) if line.startswith("origin"))
        return [" ".join(line.split()) for line in lines[:cut]]  # widths follow the longest key

    show_b = lh(on_b, "show", "sql-expert:v1")
    assert identity_lines(lh(on_a, "show", "sql-expert:v1")) == identity_lines(show_b)
    shown = {" ".join(line.split()) for line in show_b.splitlines()}
    assert {"origin pull", f"commit {sha}", "repo_id myorg/sql-expert", "revision v1"} <= shown

    lh(on_b, "export", "sql-expert:v1", tmp_path / "exported")
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = tiny_llama()(input_ids=ids).logits
        original = PeftModel.from_pretrained(tiny_llama(), str(src)).eval()(input_ids=ids).logits
        exported = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "exported")).eval()
        exported = exported(input_ids=ids).logits
        # The pushed repo, downloaded as it is, loads in PEFT. (PEFT's own Hub calls go through
        # huggingface_hub's module-level HfApi, whose endpoint was fixed at import.)
        repo = snapshot_download("myorg/sql-expert", revision="v1", endpoint=server.url)
        from_hub = PeftModel.from_pretrained(tiny_llama(), repo).eval()(input_ids=ids).logits
    assert not torch.allclose(original, plain, atol=1e-4), "the adapter must change the output"
    torch.testing.assert_close(exported, original, rtol=0, atol=0)
    torch.testing.assert_close(from_hub, original, rtol=0, atol=0)


def test_manifest_base_and_provenance_survive_the_trip(server, stores, tmp_path):
    hub = stores("a")
    adapter = read_peft_dir(write_peft_adapter(tmp_path / "src"))
    base = BaseRef("tiny/llama", "r1", "xxh128:" + "1" * 32, "xxh128:" + "2" * 32)
    provenance = {"kind": "compose", "method": "cat", "parents": ["xxh128:" + "3" * 32]}
    info, _ = hub.store(
        adapter, name="mix:v1", origin_kind="compose", origin={}, provenance=provenance, base=base
    )
    hub.push("mix:v1", "myorg/mix")

    pulled = stores("b").pull("myorg/mix")
    assert pulled.digest == info.digest
    assert pulled.base == base and pulled.base.verified
    assert pulled.provenance == provenance
    card = server.repo_files("myorg/mix")["README.md"].decode()
    assert "1" * 32 in card and "2" * 32 in card and "composed with `cat`" in card


# ---------------------------------------------------------------------- pull


def seed_peft(server, repo_id, folder: Path, prefix="", **kwargs) -> str:
    files = {f"{prefix}{name}": data for name, data in files_of(folder).items()}
    return server.seed_repo(repo_id, files, **kwargs)


def test_pull_any_peft_repo_at_tag_branch_and_commit(server, stores, tmp_path):
    v1 = write_peft_adapter(tmp_path / "v1", seed=1, extra_config={"revision": "abc123"})
    v2 = write_peft_adapter(tmp_path / "v2", seed=2)
    ref = stores("ref")
    d1 = ref.add(v1).adapter.digest
    d2 = ref.add(v2).adapter.digest
    sha1 = seed_peft(server, "someone/peft", v1, tag="v1")
    seed_peft(server, "someone/peft", v2)
    hub = stores("b")

    at_tag = hub.pull("someone/peft@v1")
    assert at_tag.digest == d1 and at_tag.refs == ("someone/peft:v1",)
    assert at_tag.base == BaseRef("tiny/llama", "abc123") and not at_tag.base.verified
    assert (at_tag.origin["revision"], at_tag.origin["commit"]) == ("v1", sha1)
    assert hub.pull("someone/peft").digest == d2
    at_sha = hub.pull("someone/peft", revision=sha1, name="pinned")
    assert at_sha.digest == d1 and "pinned:latest" in at_sha.refs
    assert at_sha.origin["commit"] == sha1
    assert hub.get("someone/peft:latest").digest == d2
    with pytest.raises(InvalidReference, match="give one"):
        hub.pull("someone/peft@v1", revision="main")


def test_pull_from_a_subfolder_downloads_only_the_adapter_files(server, stores, tmp_path):
    src = write_peft_adapter(tmp_path / "src", seed=4)
    expected = stores("ref").add(src).adapter.digest
    files = {f"my_adapter/{n}": d for n, d in files_of(src).items()}
    files |= {
        "README.md": b"# a repo with more than an adapter\n",
        "model.safetensors": b"\0" * 4096,
        "other/adapter_config.json": b"{}",
        "my_adapter/optimizer.pt": b"\0" * 2048,
    }
    server.seed_repo("someone/their-peft-adapter", files)

    info = stores("b").pull("someone/their-peft-adapter", subfolder="my_adapter")

    assert info.digest == expected
    assert info.refs == ("someone/their-peft-adapter-my_adapter:latest",)
    downloads = [p for p in resolved_paths(server) if "/resolve/" in p]
    # (and one ask for my_adapter/lorahub.json, whose 404 the client records in its cache)
    assert downloads and all(
        p.endswith(
            (
                "my_adapter/adapter_config.json",
                "my_adapter/adapter_model.safetensors",
                "my_adapter/lorahub.json",
            )
        )
        for p in downloads
    ), downloads
    assert server.bytes_downloaded == len(files["my_adapter/adapter_model.safetensors"])


def test_pulling_a_commit_already_here_downloads_no_weights(server, stores, tmp_path):
    hub = stores("a")
    hub.add(write_peft_adapter(tmp_path / "src"), name="a:v1")
    hub.push("a:v1", "myorg/a", tag="v1")
    first = stores("b").pull("myorg/a@v1")
    assert server.bytes_downloaded > 0
    server.clear_log()

    again = stores("c").pull("myorg/a@v1")

    assert again.digest == first.digest
    assert server.bytes_downloaded == 0
    assert resolved_paths(server) == []  # no HEAD, no GET of any file
    assert server.count("GET", "/api/") <= 2  # metadata only


def test_a_repo_already_in_the_hf_cache_downloads_nothing(server, stores, tmp_path):
    hub = stores("a")
    hub.add(write_peft_adapter(tmp_path / "src"), name="a:v1")
    hub.push("a:v1", "myorg/a")
    snapshot_download("myorg/a", endpoint=server.url)  # the user ran `hf download myorg/a`
    server.clear_log()

    stores("b").pull("myorg/a")

    assert server.bytes_downloaded == 0 and resolved_paths(server) == []


@pytest.mark.parametrize(
    ("setup", "spec", "token", "error", "match"),
    [
        ("public", "alice/missing", CANARY, RemoteError, "alice/missing was not found"),
        ("private", "alice/secret", None, RemoteError, "private and no token was sent"),
        ("private", "alice/secret", BOB, RemoteError, "private and your token cannot see it"),
        ("public", "alice/public@nope", CANARY, RemoteError, "alice/public has no revision 'nope'"),
        ("gated", "alice/gated", BOB, RemoteError, "alice/gated is gated and the token sent"),
        ("gated", "alice/gated", None, RemoteError, "alice/gated is gated and no token was sent"),
        ("no-config", "alice/empty", CANARY, InvalidAdapter, "has no adapter_config.json"),
        ("nested", "alice/nested", CANARY, InvalidAdapter, "found in sub: pass --subfolder"),
        ("no-weights", "alice/noweights", CANARY, InvalidAdapter, "neither adapter_model"),
        ("public", "not a repo!", CANARY, InvalidReference, "not a Hub repo id"),
    ],
)
def test_pull_errors_name_the_repo_and_what_to_do(
    server, stores, tmp_path, monkeypatch, setup, spec, token, error, match
):
    src = write_peft_adapter(tmp_path / "src")
    files = files_of(src)
    if setup in ("public", "private", "gated"):
        server.seed_repo(
            {"public": "alice/public", "private": "alice/secret", "gated": "alice/gated"}[setup],
            files,
            private=setup == "private",
            gated=setup == "gated",
        )
    elif setup == "no-config":
        server.seed_repo("alice/empty", {"README.md": b"hi"})
    elif setup == "nested":
        server.seed_repo("alice/nested", {f"sub/{n}": d for n, d in files.items()})
    elif setup == "no-weights":
        server.seed_repo("alice/noweights", {"adapter_config.json": files["adapter_config.json"]})
    if token is None:
        monkeypatch.delenv("HF_TOKEN")
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    hub = stores("b")
    before = state(hub)
    with pytest.raises(error, match=match) as caught:
        hub.pull(spec)
    assert CANARY not in str(caught.value)
    assert state(hub) == before


def test_unreachable_hub_is_a_clear_error(server, stores, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(RemoteError, match=r"cannot reach http://127.0.0.1:9 .*HF_ENDPOINT"):
        stores("b").pull("alice/anything")


# ---------------------------------------------------------------------- hostile remotes


@pytest.mark.parametrize("bad", ["../escape.txt", "/abs.txt", "a/../../b.txt"])
def test_file_names_escaping_the_repo_are_refused(server, stores, tmp_path, bad):
    files = files_of(write_peft_adapter(tmp_path / "src")) | {bad: b"!"}
    server.seed_repo("eve/adapter", files)
    hub = stores("b")
    with pytest.raises(RemoteError, match="point outside the repository"):
        hub.pull("eve/adapter")
    assert resolved_paths(server) == [] and hub.list_adapters() == []


def _lying_header(data: bytes) -> bytes:
    """The same file with one tensor's shape doubled in its header (offsets unchanged)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [header[key]["shape"][0], header[key]["shape"][1] * 2]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


@pytest.mark.parametrize("precheck", [False, True], ids=["after-download", "before-download"])
def test_a_lying_safetensors_header_is_refused(server, stores, tmp_path, monkeypatch, precheck):
    files = files_of(write_peft_adapter(tmp_path / "src"))
    files["adapter_model.safetensors"] = _lying_header(files["adapter_model.safetensors"])
    server.seed_repo("eve/liar", files)
    if precheck:
        monkeypatch.setattr(remote.pull, "HEADER_CHECK_MIN_BYTES", 0)
    hub = stores("b")
    match = "header lies" if precheck else "not a valid safetensors file"
    with pytest.raises(InvalidAdapter, match=match) as caught:
        hub.pull("eve/liar")
    assert "eve/liar" in str(caught.value)
    assert hub.list_adapters() == [] and not list((hub.home / "blobs").rglob("*/*"))
    if precheck:
        assert server.count("HEAD", "adapter_model.safetensors") == 0


@pytest.mark.parametrize("code", ["F8_E8M0", "F8_E4M3FNUZ", "F4", "F6_E2M3", "C64"])
def test_a_header_lying_about_a_narrow_or_complex_tensor_is_refused(
    server, stores, monkeypatch, code
):
    # 16 elements of any of these take 6 to 128 bytes, never the 32 the header claims.
    lie = {"dtype": code, "shape": [4, 4], "data_offsets": [0, 32]}
    header = json.dumps({"base_model.model.x.lora_A.weight": lie}).encode()
    weights = struct.pack("<Q", len(header)) + header + bytes(32)
    config = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}).encode()
    server.seed_repo(
        "eve/narrow", {"adapter_config.json": config, "adapter_model.safetensors": weights}
    )
    monkeypatch.setattr(remote.pull, "HEADER_CHECK_MIN_BYTES", 0)
    hub = stores("b")
    with pytest.raises(InvalidAdapter, match=f"header lies about tensor .*{code}"):
        hub.pull("eve/narrow")
    assert hub.list_adapters() == [] and server.count("HEAD", "adapter_model.safetensors") == 0


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": ["a"], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [[1]], "data_offsets": [0, 4]},
        "not an object",
        {"dtype": "F32", "shape": [1], "data_offsets": 5},
    ],
    ids=["shape-of-strings", "nested-shape", "entry-string", "offsets-number"],
)
def test_a_header_of_the_wrong_json_types_is_refused(server, stores, monkeypatch, entry):
    header = json.dumps({"base_model.model.x.lora_A.weight": entry}).encode()
    weights = struct.pack("<Q", len(header)) + header + bytes(64)
    config = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}).encode()
    server.seed_repo(
        "eve/odd", {"adapter_config.json": config, "adapter_model.safetensors": weights}
    )
    monkeypatch.setattr(remote.pull, "HEADER_CHECK_MIN_BYTES", 0)
    hub = stores("b")
    with pytest.raises(InvalidAdapter, match="eve/odd"):
        hub.pull("eve/odd")
    assert hub.list_adapters() == [] and server.count("HEAD", "adapter_model.safetensors") == 0


def test_lorahub_json_must_match_the_weights(server, stores, tmp_path):
    hub = stores("a")
    hub.add(write_peft_adapter(tmp_path / "src"), name="a:v1")
    hub.push("a:v1", "myorg/a")
    good = server.repo_files("myorg/a")
    other = files_of(write_peft_adapter(tmp_path / "other", seed=9))
    server.seed_repo(
        "eve/swapped", good | {"adapter_model.safetensors": other["adapter_model.safetensors"]}
    )
    doc = json.loads(good["lorahub.json"])
    doc["digest"] = "xxh128:" + "0" * 32
    server.seed_repo("eve/edited", good | {"lorahub.json": json.dumps(doc).encode()})
    doc = json.loads(good["lorahub.json"])
    doc["manifest"]["config"]["lora_alpha"] = 64
    doc["digest"] = str(digest_of(doc["manifest"]))
    server.seed_repo("eve/realpha", good | {"lorahub.json": json.dumps(doc).encode()})
    b = stores("b")

    with pytest.raises(IntegrityError, match=r"do not match lorahub.json: .*weights.*weights hash"):
        b.pull("eve/swapped")
    with pytest.raises(IntegrityError, match="its manifest hashes to"):
        b.pull("eve/edited")
    with pytest.raises(IntegrityError, match=r"do not match lorahub.json: config"):
        b.pull("eve/realpha")
    assert b.list_adapters() == []
    assert b.pull("myorg/a").digest == hub.get("a:v1").digest


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


def test_a_bin_only_repo_loads_only_plain_tensors(server, stores, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = write_peft_adapter(tmp_path / "bin", fmt="bin")
    expected = stores("ref").add(write_peft_adapter(tmp_path / "st")).adapter.digest
    server.seed_repo("someone/old-adapter", files_of(src))
    evil = files_of(src) | {"adapter_model.bin": pickle.dumps({"x": _Boom()})}
    server.seed_repo("eve/pickle", evil)
    hub = stores("b")

    info = hub.pull("someone/old-adapter")
    assert info.digest == expected and info.origin["format"] == "peft-bin"
    with pytest.raises(InvalidAdapter, match=r"eve/pickle.*weights_only=True"):
        hub.pull("eve/pickle")
    assert not (tmp_path / "pwned-by-pickle").exists()
    assert [i.digest for i in hub.list_adapters()] == [expected]


def test_truncated_and_tampered_downloads_store_nothing(server, stores, tmp_path):
    src = write_peft_adapter(tmp_path / "src")
    files = files_of(src)
    server.seed_repo("alice/a", files)
    hub = stores("b")
    weights = files["adapter_model.safetensors"]

    server.truncate_downloads = {"adapter_model.safetensors": 100}
    with pytest.raises(IntegrityError, match="cut short"):
        hub.pull("alice/a")
    server.truncate_downloads = {}
    server.replace_downloads = {"adapter_model.safetensors": b"\1" * len(weights)}
    with pytest.raises(IntegrityError, match="does not match the hash"):
        hub.pull("alice/a")
    assert hub.list_adapters() == []

    server.replace_downloads = {}
    assert hub.pull("alice/a").digest == stores("ref").add(src).adapter.digest


# ---------------------------------------------------------------------- offline


def test_offline_pull_uses_the_cache_or_says_it_cannot(server, stores, tmp_path, monkeypatch):
    hub = stores("a")
    info = hub.add(write_peft_adapter(tmp_path / "src"), name="a:v1").adapter
    hub.push("a:v1", "myorg/a", tag="v1")
    sha = server.commit_sha("myorg/a")
    stores("b").pull("myorg/a@v1")
    server.clear_log()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    offline = stores("c")
    got = offline.pull("myorg/a@v1")
    assert got.digest == info.digest and got.origin["commit"] == sha
    assert offline.pull("myorg/a", revision=sha).digest == info.digest
    with pytest.raises(RemoteError, match=r"HF_HUB_OFFLINE is set and myorg/b@main is not in"):
        offline.pull("myorg/b")
    with pytest.raises(RemoteError, match="HF_HUB_OFFLINE is set"):
        hub.push("a:v1", "myorg/a")
    assert server.requests == []


def test_offline_push_without_a_token_says_offline(stores, tmp_path, monkeypatch):
    hub = stores("a")
    hub.add(write_peft_adapter(tmp_path / "src"), name="a:v1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RemoteError, match="HF_HUB_OFFLINE is set"):
        hub.push("a:v1", "myorg/a")


def test_a_push_with_hf_hub_offline_set_after_import_refuses_before_any_request(
    server, stores, tmp_path, monkeypatch
):
    hub = stores("a")
    hub.add(write_peft_adapter(tmp_path / "src"), name="a:v1")
    server.clear_log()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # huggingface_hub read it as unset at import
    with pytest.raises(RemoteError, match=r"HF_HUB_OFFLINE is set, so .* unset it to push"):
        hub.push("a:v1", "myorg/a")
    assert server.requests == []


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_a_pull_uses_the_cache_folder_set_after_import(
    server, stores, tmp_path, monkeypatch, variable
):
    hub = stores("a")
    hub.add(write_peft_adapter(tmp_path / "src"), name="a:v1")
    hub.push("a:v1", "myorg/a")
    # The cache as huggingface_hub read it at import: under HF_HOME, not set apart.
    early = tmp_path / "early-home"
    monkeypatch.setattr(constants, "HF_HOME", str(early))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(early / "hub"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    late = tmp_path / "late"
    monkeypatch.setenv(variable, str(late))
    cache = late if variable == "HF_HUB_CACHE" else late / "hub"
    stores("b").pull("myorg/a")
    assert list(cache.glob("models--myorg--a/snapshots/*/adapter_config.json"))
    assert not list(early.rglob("models--myorg--a"))


def test_offline_pull_says_when_it_cannot_check_identity(server, stores, tmp_path, monkeypatch):
    import logging

    hub = stores("a")
    hub.add(write_peft_adapter(tmp_path / "src"), name="a:v1")
    hub.push("a:v1", "myorg/peft-only")
    # What PeftModel.from_pretrained leaves in the cache: the config and the weights only.
    huggingface_hub.snapshot_download(
        "myorg/peft-only",
        allow_patterns=["adapter_config.json", "adapter_model.safetensors"],
        endpoint=server.url,
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with _capture("lorahub") as records:
        stores("c").pull("myorg/peft-only")
    assert any(
        r.levelno == logging.WARNING and "without its identity check" in r.getMessage()
        for r in records
    )


# ---------------------------------------------------------------------- CLI and secrets


def test_cli_push_pull_outputs(server, tmp_path):
    on_a, on_b = cli_runner(tmp_path / "a"), cli_runner(tmp_path / "b")
    src = write_peft_adapter(tmp_path / "src")
    on_a("add", src, "-n", "x:v1")

    out = on_a("push", "x:v1", "myorg/x", "--json", code=None)
    data = json.loads(out.output)
    assert data["committed"] is True and data["repo_id"] == "myorg/x"
    quiet = on_a("push", "x:v1", "myorg/x", "-q", code=None)
    assert quiet.output.strip() == data["commit_url"]
    human = on_a("push", "x:v1", "myorg/x", code=None).output
    assert human.startswith("unchanged") and "nothing uploaded" in human

    digest = on_b("pull", "myorg/x", "-q", code=None).output.strip()
    assert digest == f"@{data['digest']}"
    shown = json.loads(on_b("pull", "myorg/x", "--json", code=None).output)
    assert shown["refs"] == ["myorg/x:latest"] and shown["origin"]["repo_id"] == "myorg/x"

    bad = on_b("pull", "myorg/nothing-here", code=1)
    assert bad.stderr.startswith("Error: myorg/nothing-here was not found")
    assert "Traceback" not in bad.output


def test_the_token_never_shows_up_anywhere(server, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    src = write_peft_adapter(tmp_path / "src")
    server.seed_repo("alice/secret", files_of(src), private=True)
    outputs = []
    for home, args in [
        (home_a, ["add", str(src), "-n", "x:v1"]),
        (home_a, ["push", "x:v1", "myorg/x", "--private", "--tag", "v1"]),
        (home_a, ["push", "x:v1", "myorg/x", "--json"]),
        (home_b, ["pull", "myorg/x@v1"]),
        (home_b, ["pull", "alice/secret", "--json"]),
        (home_b, ["pull", "myorg/x@nope"]),
        (home_b, ["pull", "alice/missing"]),
        (home_a, ["push", "x:v1", "bob/not-mine"]),
        (home_b, ["show", "myorg/x:v1"]),
        (home_b, ["show", "myorg/x:v1", "--json"]),
    ]:
        result = cli_runner(home)(*args, code=None)
        outputs.append(result.output + result.stderr)
    monkeypatch.setenv("HF_TOKEN", "hf_forged")
    outputs.append(cli_runner(home_b)("pull", "myorg/x", code=None).stderr)

    sent = [r for r in server.requests if r.headers.get("authorization") == f"Bearer {CANARY}"]
    assert sent, "the canary must really have been used"
    assert any("Error:" in o for o in outputs) and any("pulled" in o for o in outputs)
    assert all(CANARY not in o for o in outputs)
    assert CANARY not in caplog.text
    assert all(CANARY not in str(r.args) for r in caplog.records)
    for home in (home_a, home_b):
        for path in home.rglob("*"):
            if path.is_file():
                assert CANARY.encode() not in path.read_bytes(), path


# ---------------------------------------------------------------------- the example


def test_the_example_runs_against_the_local_test_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LORAHUB_"))}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / "push_pull.py"), "--local"],
        env=env | {"HOME": str(tmp_path)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "second push: no commit, 0 bytes uploaded" in out
    assert "second pull: 0 weight bytes downloaded" in out
    assert "same digest in both stores: True" in out


@contextlib.contextmanager
def _capture(name: str):
    """Records logged to ``name``, whatever its propagation setting."""
    import logging

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger, handler = logging.getLogger(name), Keep(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_own_online_pull_lets_offline_pulls_know_lorahub_json_is_absent(
    server, stores, tmp_path, monkeypatch
):
    files = files_of(write_peft_adapter(tmp_path / "src"))
    server.seed_repo("plain/peft", files)  # no lorahub.json: a repo made by PEFT alone
    stores("a").pull("plain/peft")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with _capture("lorahub") as records:
        stores("b").pull("plain/peft")
    assert not [r for r in records if "identity check" in r.getMessage()]


def test_lorahub_json_of_an_older_schema_imports_as_plain_peft(server, stores, tmp_path):
    hub = stores("a")
    hub.add(write_peft_adapter(tmp_path / "src"), name="a:v1")
    hub.push("a:v1", "myorg/old")
    files = server.repo_files("myorg/old")
    doc = json.loads(files["lorahub.json"])
    doc["manifest"]["schema"] = 1
    doc["manifest"]["metadata"] = {}
    doc["digest"] = str(digest_of(doc["manifest"]))
    server.seed_repo("myorg/older", files | {"lorahub.json": json.dumps(doc).encode()})
    with _capture("lorahub") as records:
        got = stores("b").pull("myorg/older")
    assert got.provenance == {"kind": "import"}
    assert any("manifest schema 1" in r.getMessage() for r in records)
