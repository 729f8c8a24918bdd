"""``lorahub serve``, the write API: ``create_repo``, preupload, LFS batch and PUT, the NDJSON
commit, driven by the real huggingface_hub client, PEFT's ``push_to_hub`` and ``lorahub push
--endpoint`` against a real server process; hostile uploads (too big, wrong bytes, dropped,
a killed server) leave the store as it was."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest
from factories import cli_runner
from servekit import Server, client_env, serving

import lorahub
from lorahub.serve.mapping import commit_id

CAP = 1_000_000  # --max-upload-size of the module's server
LORAHUB = [sys.executable, "-c", "from lorahub.cli import main; main()"]
WEIGHTS = "adapter_model.safetensors"
T = TypeVar("T")


@dataclass
class Served:
    server: Server
    home: Path
    work: Path
    writer: str  # a write token
    reader: str  # a read-only token

    @property
    def url(self) -> str:
        return self.server.url

    def api(self, token: str | None = None):  # huggingface_hub's HfApi
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.url, token=token or self.writer)

    def digest(self, reference: str) -> str:
        with lorahub.open(self.home) as hub:
            return hub.get(reference).digest

    def tmp_files(self) -> list[str]:
        tmp = self.home / "tmp"
        return sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else []


def _tokens(home: Path) -> tuple[str, str]:
    run = cli_runner(home)
    writer = run("token", "add", "alice", "--write", "-q").stdout.strip()
    reader = run("token", "add", "bob", "-q").stdout.strip()
    return writer, reader


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """An empty store with a write token and a read token, served with a 1 MB upload cap."""
    work = tmp_path_factory.mktemp("serve-write")
    home = work / "store"
    writer, reader = _tokens(home)
    with serving(home, work, "--max-upload-size", str(CAP)) as server:
        yield Served(server, home, work, writer, reader)


def _added_digest(folder: Path, tmp: Path) -> str:
    """The digest ``lorahub add`` gives ``folder`` in a store of its own."""
    home = tmp / f"reference-{folder.name}"
    cli_runner(home)("add", folder, "--name", "ref")
    with lorahub.open(home) as hub:
        return hub.get("ref").digest


def _ls(home: Path) -> dict[str, str]:
    rows = json.loads(cli_runner(home)("ls", "--json").stdout)
    return {ref: row["digest"] for row in rows for ref in row.get("refs", [])}


# ---------------------------------------------------------------------- real clients


def test_upload_folder_stores_the_adapter_as_add_does(served, world, tmp_path, loopback_only):
    api = served.api()
    url = api.create_repo("local/uploaded", exist_ok=True)
    assert str(url).rstrip("/").endswith("/local/uploaded")
    assert api.repo_exists("local/uploaded")  # created, still empty
    assert api.list_repo_files("local/uploaded") == []
    info = api.upload_folder(folder_path=world / "a", repo_id="local/uploaded")
    expected = _added_digest(world / "a", tmp_path)
    assert _ls(served.home)["uploaded:latest"] == expected  # default namespace: the bare name
    assert info.oid == commit_id(expected)
    assert api.model_info("local/uploaded").sha == commit_id(expected)
    # Again: create_repo's 409 carries the url, and no file is uploaded twice.
    api.create_repo("local/uploaded", exist_ok=True)
    again = api.upload_folder(folder_path=world / "a", repo_id="local/uploaded")
    assert again.oid == info.oid
    assert served.digest("uploaded:latest") == expected
    assert not [n for n in served.tmp_files() if n.startswith("serve-commit-")]
    assert not [n for n in _staging(served) if n.startswith("local/uploaded/")]  # stored


def test_a_branch_is_a_tag_and_a_commit_to_it_moves_only_that_tag(
    served, world, tmp_path, loopback_only
):
    api = served.api()
    api.create_repo("team/branched", exist_ok=True)
    api.upload_folder(folder_path=world / "a", repo_id="team/branched")
    main = served.digest("team/branched:latest")
    api.create_branch("team/branched", branch="v2")
    assert served.digest("team/branched:v2") == main
    api.upload_folder(folder_path=world / "ad2", repo_id="team/branched", revision="v2")
    assert served.digest("team/branched:v2") == _added_digest(world / "ad2", tmp_path)
    assert served.digest("team/branched:latest") == main
    api.create_tag("team/branched", tag="v1", revision="main")
    refs = api.list_repo_refs("team/branched")
    assert {t.name: t.target_commit for t in refs.tags}["v1"] == commit_id(main)
    # A commit to a revision that does not exist yet makes it.
    api.upload_folder(folder_path=world / "b", repo_id="team/branched", revision="v3")
    assert served.digest("team/branched:v3") == _added_digest(world / "b", tmp_path)


def test_a_partial_commit_changes_the_parent_revisions_folder(served, world, loopback_only):
    api = served.api()
    api.create_repo("local/partial", exist_ok=True)
    api.upload_folder(folder_path=world / "a", repo_id="local/partial")
    before = served.digest("partial:latest")
    config = json.loads((world / "a" / "adapter_config.json").read_text())
    config["lora_alpha"] = 16
    api.upload_file(
        path_or_fileobj=json.dumps(config).encode(),
        path_in_repo="adapter_config.json",
        repo_id="local/partial",
    )
    after = served.digest("partial:latest")
    assert after != before
    with lorahub.open(served.home) as hub:
        assert hub.get(after).alpha == 16 and hub.get(after).weights_digest == (
            hub.get(before).weights_digest
        )


def test_peft_push_to_hub_then_from_pretrained_gives_the_adapters_logits(served, world, tmp_path):
    script = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out, push = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(base).eval()
model = PeftModel.from_pretrained(model, adapter).eval()
if push:
    model.push_to_hub(push)
    model.save_pretrained(out + ".saved")  # what was pushed, for lorahub add
with torch.no_grad():
    torch.save(model(torch.arange(12).reshape(2, 6)).logits, out)
"""
    env = client_env(served.home, served.url, tmp_path / "hf") | {"HF_TOKEN": served.writer}
    env.pop("HF_HUB_DISABLE_IMPLICIT_TOKEN", None)  # the token comes from HF_TOKEN
    runs = (
        (str(world / "a"), "local.pt", "local/peft-pushed"),
        ("local/peft-pushed", "served.pt", ""),
    )
    for adapter, out, push in runs:
        res = subprocess.run(
            [
                sys.executable,
                "-c",
                script,
                str(world / "llama"),
                adapter,
                str(tmp_path / out),
                push,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr
    import torch

    assert torch.equal(torch.load(tmp_path / "served.pt"), torch.load(tmp_path / "local.pt"))
    saved = tmp_path / "local.pt.saved"
    assert served.digest("peft-pushed:latest") == _added_digest(saved, tmp_path)


def test_lorahub_push_endpoint_from_a_second_store(served, world, tmp_path):
    other = tmp_path / "second"
    cli_runner(other)("add", world / "b", "--name", "mine:v1")
    with lorahub.open(other) as hub:
        digest = hub.get("mine:v1").digest
    env = client_env(other, "http://127.0.0.1:9", tmp_path / "hf") | {"HF_TOKEN": served.writer}
    env.pop("HF_HUB_DISABLE_XET")  # push --endpoint turns Xet off itself
    cmd = [*LORAHUB, "--home", str(other), "push", "mine:v1", "team/pushed"]
    cmd += ["--endpoint", served.url, "--tag", "v1", "--json"]
    for attempt in range(2):
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        result = json.loads(res.stdout)
        assert result["commit"] == commit_id(digest)
        assert result["committed"] is (attempt == 0)  # the second push changes nothing
    assert _ls(served.home)["team/pushed:latest"] == digest  # lorahub.json kept its identity
    assert served.digest("team/pushed:v1") == digest


# ---------------------------------------------------------------------- refusals


def test_writes_need_a_write_token(served, world, loopback_only):
    from huggingface_hub.errors import HfHubHTTPError

    body = json.dumps({"name": "nope", "organization": "local"}).encode()
    status, _, _ = served.server.request("POST", "/api/repos/create", body)
    assert status == 401
    with pytest.raises(HfHubHTTPError) as err:
        served.api(served.reader).upload_folder(folder_path=world / "a", repo_id="local/nope")
    assert err.value.response.status_code == 403
    assert not served.api().repo_exists("local/nope")


def test_a_non_lora_and_a_bad_config_are_refused_with_a_clear_error(
    served, world, tmp_path, loopback_only
):
    import torch
    from huggingface_hub.errors import HfHubHTTPError
    from safetensors.torch import save_file

    api = served.api()
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(world / "a" / "adapter_config.json", plain)
    save_file({"model.weight": torch.ones(4, 4)}, plain / "adapter_model.safetensors")
    before = _ls(served.home)
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_folder(folder_path=plain, repo_id="local/not-lora")
    assert err.value.response.status_code == 422
    assert "not stored" in str(err.value) and "LoRA" in str(err.value)
    assert str(served.home) not in str(err.value)  # the server's own paths stay its own
    bad = tmp_path / "bad"
    shutil.copytree(world / "a", bad)
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_folder(folder_path=bad, repo_id="local/not-lora")
    assert err.value.response.status_code == 422
    assert _ls(served.home) == before
    assert cli_runner(served.home)("verify").exit_code == 0


def test_a_commit_naming_an_unknown_oid_is_refused(served, world, loopback_only):
    header = {"key": "header", "value": {"summary": "x", "description": ""}}
    lfs = {"key": "lfsFile", "value": {"path": "adapter_model.safetensors", "algo": "sha256"}}
    lfs["value"] |= {"oid": "ab" * 32, "size": 10}
    config = (world / "a" / "adapter_config.json").read_bytes()
    import base64

    cfg = {"key": "file", "value": {"path": "adapter_config.json", "encoding": "base64"}}
    cfg["value"]["content"] = base64.b64encode(config).decode()
    body = "\n".join(json.dumps(x) for x in (header, cfg, lfs)).encode()
    status, headers, answer = served.server.request(
        "POST",
        "/api/models/local/unknown-oid/commit/main",
        body,
        {"Authorization": f"Bearer {served.writer}", "Content-Type": "application/x-ndjson"},
    )
    assert status == 422
    assert "never uploaded" in json.loads(answer)["error"]
    assert "never uploaded" in headers["x-error-message"]


def _batch(served: Served, repo: str, oid: str, size: int, token: str | None = None) -> dict:
    """The LFS batch API's answer for one object to upload to ``repo``."""
    body = {"operation": "upload", "transfers": ["basic"], "hash_algo": "sha256"}
    body["objects"] = [{"oid": oid, "size": size}]
    status, _, answer = served.server.request(
        "POST",
        f"/{repo}.git/info/lfs/objects/batch",
        json.dumps(body).encode(),
        {"Authorization": f"Bearer {token or served.writer}"},
    )
    assert status == 200, answer
    obj = json.loads(answer)["objects"][0]
    assert "error" not in obj, obj
    return dict(obj)


def _upload_url(served: Served, repo: str, oid: str, size: int, token: str | None = None) -> str:
    obj = _batch(served, repo, oid, size, token)
    return str(obj["actions"]["upload"]["href"]).removeprefix(served.url)


def _put(
    served: Served,
    path: str,
    chunks: Iterator[bytes],
    length: int | None = None,
) -> tuple[int | None, int]:
    """A PUT sent chunk by chunk on a raw socket (chunked unless ``length``): the status
    the server answers (None if none) and the bytes it took before answering."""
    sock = socket.create_connection(("127.0.0.1", served.server.port), timeout=30)
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    sock.sendall(f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{framing}\r\n\r\n".encode())
    sent = 0
    try:
        for chunk in chunks:
            if length is None:
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            else:
                sock.sendall(chunk)
            sent += len(chunk)
        if length is None:
            sock.sendall(b"0\r\n\r\n")
    except OSError:  # the server answered and closed while we were still sending
        pass
    try:
        head = sock.recv(4096).split(b"\r\n", 1)[0]
        return int(head.split()[1]), sent
    except (OSError, IndexError):
        return None, sent
    finally:
        sock.close()


def _staging(served: Served) -> list[str]:
    """The files of the upload staging area (``serve/lfs/<ns>/<name>/``), as ``ns/name/file``."""
    root = served.home / "serve" / "lfs"
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _partials(served: Served) -> list[str]:
    return [n for n in _staging(served) if n.endswith(".partial")]


def test_an_oversized_upload_is_refused_while_it_streams(served, tmp_path, loopback_only):
    from huggingface_hub.errors import HfHubHTTPError

    big = tmp_path / "big"
    big.mkdir()
    (big / "adapter_model.safetensors").write_bytes(os.urandom(CAP + 1))
    with pytest.raises((HfHubHTTPError, ValueError)) as err:
        served.api().upload_folder(folder_path=big, repo_id="local/too-big")
    assert "--max-upload-size" in str(err.value)  # the batch answer refused it already
    data = b"x" * 1000
    path = _upload_url(served, "local/too-big", hashlib.sha256(data).hexdigest(), len(data))
    endless = (b"y" * 65536 for _ in range(16_384))  # 1 GiB, never all sent
    status, sent = _put(served, path, endless)
    assert status == 413 and sent < 1 << 30
    status, _ = _put(served, path, iter([b"z" * 100]), length=CAP * 10)
    assert status == 413  # refused from its Content-Length, before a byte is read
    assert _partials(served) == []
    assert served.api().whoami()["name"] == "alice"  # still serving


def test_bytes_that_do_not_match_the_oid_are_refused(served, loopback_only):
    data = b"the announced bytes" * 100
    path = _upload_url(served, "local/mismatch", hashlib.sha256(data).hexdigest(), len(data))
    status, _ = _put(served, path, iter([b"X" * len(data)]), length=len(data))
    assert status == 400
    status, _ = _put(served, path.replace("sig=", "sig=0"), iter([data]), length=len(data))
    assert status == 403  # a URL this server did not sign
    assert _partials(served) == []
    assert f"local/mismatch/{hashlib.sha256(data).hexdigest()}" not in _staging(served)
    status, _ = _put(served, path, iter([data]), length=len(data))
    assert status == 200
    assert f"local/mismatch/{hashlib.sha256(data).hexdigest()}" in _staging(served)


def test_a_client_that_drops_mid_put_leaves_no_partial_file(served, loopback_only):
    data = os.urandom(500_000)
    path = _upload_url(served, "local/dropped", hashlib.sha256(data).hexdigest(), len(data))
    sock = socket.create_connection(("127.0.0.1", served.server.port), timeout=30)
    sock.sendall(f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode())
    sock.sendall(data[:100_000])
    # The server holds the partial file while it waits for the rest; only then drop.
    deadline = time.monotonic() + 20
    while not _partials(served) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _partials(served), "the upload never started"
    sock.close()
    deadline = time.monotonic() + 20
    while _partials(served) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _partials(served) == []


def test_sigkill_during_an_upload_then_a_restart_leaves_a_clean_store(
    world, tmp_path, loopback_only
):
    home = tmp_path / "store"
    writer, _ = _tokens(home)
    data = os.urandom(4_000_000)
    oid = hashlib.sha256(data).hexdigest()
    with serving(home, tmp_path / "one") as server:
        served = Served(server, home, tmp_path, writer, "")
        path = _upload_url(served, "local/killed", oid, len(data))
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.sendall(
            f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        )
        sock.sendall(data[:2_000_000])
        deadline = time.monotonic() + 20
        while not _partials(served) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _partials(served), "the upload never started"
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        sock.close()
    assert _partials(served)  # what the killed server left
    assert cli_runner(home)("verify").exit_code == 0
    with serving(home, tmp_path / "two") as server:
        served = Served(server, home, tmp_path, writer, "")
        assert _partials(served) == []  # a starting server removes its dead processes' files
        api = served.api()
        api.create_repo("local/killed", exist_ok=True)
        api.upload_folder(folder_path=world / "a", repo_id="local/killed")
        assert served.digest("killed:latest") == _added_digest(world / "a", tmp_path)
    assert cli_runner(home)("verify").exit_code == 0


# ---------------------------------------------------------------------- review findings


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _ndjson(*lines: dict) -> bytes:
    return "\n".join(json.dumps(x) for x in lines).encode()


def _header(parent: str | None = None) -> dict:
    value: dict = {"summary": "test", "description": ""}
    if parent:
        value["parentCommit"] = parent
    return {"key": "header", "value": value}


def _file(folder: Path, name: str) -> dict:
    import base64

    content = base64.b64encode((folder / name).read_bytes()).decode()
    return {"key": "file", "value": {"path": name, "content": content, "encoding": "base64"}}


def _lfs(name: str, data: bytes) -> dict:
    oid = hashlib.sha256(data).hexdigest()
    return {"key": "lfsFile", "value": {"path": name, "algo": "sha256", "oid": oid}}


def _commit(
    served: Served, repo: str, body: bytes, token: str, revision: str = "main"
) -> tuple[int, str]:
    status, _, answer = served.server.request(
        "POST",
        f"/api/models/{repo}/commit/{revision}",
        body,
        _auth(token) | {"Content-Type": "application/x-ndjson"},
    )
    return status, answer.decode(errors="replace")


def _stage(served: Served, repo: str, data: bytes, token: str | None = None) -> None:
    """Upload ``data`` as an LFS object for ``repo`` (the batch call, then the PUT)."""
    path = _upload_url(served, repo, hashlib.sha256(data).hexdigest(), len(data), token)
    status, _ = _put(served, path, iter([data]), length=len(data))
    assert status == 200


def _send(
    served: Served, head: str, chunks: Iterator[bytes], wait: float = 30
) -> tuple[int | None, int, float]:
    """A chunked request sent on a raw socket while the server may answer: its status
    (None if none), the body bytes sent before the answer came, and the seconds taken."""
    import select

    start = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", served.server.port), timeout=wait)
    sock.sendall(f"{head}\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    sent = 0
    try:
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # the server answered: stop sending
            try:
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            except OSError:
                break
            sent += len(chunk)
        try:
            line = sock.recv(4096).split(b"\r\n", 1)[0]
            return int(line.split()[1]), sent, time.monotonic() - start
        except (OSError, IndexError):
            return None, sent, time.monotonic() - start
    finally:
        sock.close()


def _rss(pid: int) -> int:
    """The process's resident memory, in bytes (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_write_without_the_right_is_refused_before_its_body_is_read(served, loopback_only):
    endless = (b"x" * 65536 for _ in range(16_384))  # 1 GiB, never all sent
    before = _rss(served.server.proc.pid)
    status, sent, took = _send(served, "POST /api/models/a/b/commit/main HTTP/1.1", endless)
    assert status == 401  # before: the body was read first (up to 17 MB here), then refused
    assert sent < 8 << 20 and took < 20
    assert _rss(served.server.proc.pid) - before < 16 << 20  # none of it was buffered
    head = "POST /local/x.git/info/lfs/objects/batch HTTP/1.1\r\n"
    head += f"Authorization: Bearer {served.reader}"
    status, sent, _ = _send(served, head, (b"{" * 65536 for _ in range(16_384)))
    assert status == 403 and sent < 8 << 20  # a read token may not write: same answer
    status, _, _ = _send(served, "POST /api/validate-yaml HTTP/1.1", iter([b"{}"] * 4))
    assert status == 401
    assert served.api().whoami()["name"] == "alice"  # still serving


def test_an_oversized_commit_or_json_body_is_refused(served, loopback_only):
    from lorahub.serve.write import COMMIT_CAP, JSON_CAP

    auth = f"Authorization: Bearer {served.writer}"
    line = b'{"key": "file", "value": {"path": "README.md", "content": "'
    endless = iter([line] + [b"A" * 65536] * (COMMIT_CAP // 65536 + 64))
    head = f"POST /api/models/local/big-commit/commit/main HTTP/1.1\r\n{auth}"
    status, sent, _ = _send(served, head, endless, wait=120)
    assert status == 413 and sent <= COMMIT_CAP + (16 << 20)  # less what the sockets buffer
    status, _, _ = served.server.request(
        "POST",
        "/api/models/local/big-commit/commit/main",
        b"x" * 10,
        _auth(served.writer) | {"Content-Length": str(COMMIT_CAP + 1)},
    )
    assert status == 413  # from its Content-Length, before a byte is read
    body = json.dumps({"files": [{"path": "x" * (JSON_CAP + 1)}]}).encode()
    status, _, _ = served.server.request(
        "POST", "/api/models/local/big-commit/preupload/main", body, _auth(served.writer)
    )
    assert status == 413
    assert not served.api().repo_exists("local/big-commit")


def test_gc_during_an_upload_and_before_the_commit_collects_nothing_of_it(
    served, world, tmp_path, loopback_only
):
    weights = (world / "a" / "adapter_model.safetensors").read_bytes()
    oid = hashlib.sha256(weights).hexdigest()
    served.api().create_repo("local/gc-race", exist_ok=True)
    path = _upload_url(served, "local/gc-race", oid, len(weights))
    sock = socket.create_connection(("127.0.0.1", served.server.port), timeout=30)
    try:
        sock.sendall(
            f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(weights)}\r\n\r\n".encode()
        )
        half = len(weights) // 2
        sock.sendall(weights[:half])
        deadline = time.monotonic() + 20
        while not _partials(served) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _partials(served), "the upload never started"
        cli_runner(served.home)("gc", "--grace", "0")  # while the upload is in flight
        sock.sendall(weights[half:])
        assert sock.recv(4096).split(b"\r\n", 1)[0].split()[1] == b"200"
    finally:
        sock.close()
    cli_runner(served.home)("gc", "--grace", "0")  # between the upload and the commit
    body = _ndjson(_header(), _file(world / "a", "adapter_config.json"), _lfs(WEIGHTS, weights))
    status, answer = _commit(served, "local/gc-race", body, served.writer)
    assert status == 200, answer
    assert served.digest("gc-race:latest") == _added_digest(world / "a", tmp_path)


def test_two_pushes_of_the_same_object_both_commit(served, world, tmp_path, loopback_only):
    """The first commit stores (and unstages) the object; the second, to another branch
    of the repo, was told it need not upload it, and finds it among the repo's weights."""
    weights = (world / "ad2" / "adapter_model.safetensors").read_bytes()
    oid = hashlib.sha256(weights).hexdigest()
    served.api().create_repo("local/two-pushes", exist_ok=True)
    _stage(served, "local/two-pushes", weights)  # push one uploads it
    again = _batch(served, "local/two-pushes", oid, len(weights))
    assert "actions" not in again  # push two: already staged, nothing to upload
    body = _ndjson(_header(), _file(world / "ad2", "adapter_config.json"), _lfs(WEIGHTS, weights))
    assert _commit(served, "local/two-pushes", body, served.writer)[0] == 200
    assert not [n for n in _staging(served) if n.startswith("local/two-pushes/")]
    status, answer = _commit(served, "local/two-pushes", body, served.writer, "v2")
    assert status == 200, answer
    expected = _added_digest(world / "ad2", tmp_path)
    assert served.digest("two-pushes:latest") == served.digest("two-pushes:v2") == expected


def test_an_object_staged_for_one_repo_is_not_found_from_another(served, world, loopback_only):
    """A writer of ``team-a`` cannot commit (then download) an object uploaded for a repo
    of another namespace it has no right to."""
    run = cli_runner(served.home)
    carol = run("token", "add", "carol", "--write", "--namespace", "team-a", "-q").stdout.strip()
    secret = os.urandom(3000)
    oid = hashlib.sha256(secret).hexdigest()
    served.api().create_repo("private/secret", exist_ok=True)
    _stage(served, "private/secret", secret)  # alice's upload, never committed
    answer = _batch(served, "team-a/stolen", oid, len(secret), carol)
    assert "actions" in answer  # carol is asked to upload the bytes herself
    body = _ndjson(_header(), _file(world / "a", "adapter_config.json"), _lfs(WEIGHTS, secret))
    status, text = _commit(served, "team-a/stolen", body, carol)
    assert status == 422 and "never uploaded" in text
    assert f"private/secret/{oid}" in _staging(served)  # still there for its own repo


def _at_once(*calls: Callable[[], T]) -> list[T]:
    """Run ``calls`` in threads released together; their results, in order."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], T]) -> T:
        barrier.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def test_concurrent_commits_with_the_same_parent_one_wins_the_other_412(
    served, world, loopback_only
):
    from lorahub.serve.write import empty_commit

    for round_ in range(3):  # without the repo lock, both commits pass the check at once
        repo = f"local/race-{round_}"
        served.api().create_repo(repo, exist_ok=True)
        parent = empty_commit(repo)
        bodies = [
            _ndjson(_header(parent), _file(f, "adapter_config.json"), _file(f, WEIGHTS))
            for f in (world / "a", world / "b")
        ]
        results = _at_once(*(partial(_commit, served, repo, b, served.writer) for b in bodies))
        assert sorted(s for s, _ in results) == [200, 412], results
        winner = next(json.loads(text) for s, text in results if s == 200)
        assert served.api().model_info(repo).sha == winner["commitOid"]
    # A tag: of four creations of the same name at once, one is made, three get a 409.
    request = partial(
        served.server.request,
        "POST",
        "/api/models/local/race-0/tag/main",
        json.dumps({"tag": "v9"}).encode(),
        _auth(served.writer),
    )
    assert sorted(s for s, _, _ in _at_once(*[request] * 4)) == [200, 409, 409, 409]


def test_bad_field_types_and_sizes_are_a_400_not_a_500(served, world, loopback_only):
    served.api().create_repo("local/bad-input", exist_ok=True)
    preupload = {"files": [{"path": "adapter_config.json", "sample": 123, "size": 4}]}
    status, _, answer = served.server.request(
        "POST",
        "/api/models/local/bad-input/preupload/main",
        json.dumps(preupload).encode(),
        _auth(served.writer),
    )
    assert status == 400 and b"sample" in answer
    content = {"path": "adapter_config.json", "content": [1, 2], "encoding": "base64"}
    body = _ndjson(_header(), {"key": "file", "value": content})
    status, text = _commit(served, "local/bad-input", body, served.writer)
    assert status == 400 and "content" in text
    oid = "ab" * 32
    for size in ("9" * 5000, "%C2%B2"):  # over int()'s 4300 digits; a Unicode digit
        status, _, _ = served.server.request(
            "PUT", f"/lorahub-lfs/local/bad-input/{oid}/{size}?expires=1&sig=x", b"x"
        )
        assert status == 400
    deep = b"[" * 200_000  # nested past the parser's recursion limit, under the cap
    status, _, _ = served.server.request(
        "POST", "/api/models/local/bad-input/preupload/main", deep, _auth(served.writer)
    )
    assert status == 400
    assert served.api().whoami()["name"] == "alice"


def test_hostile_values_in_write_requests_are_a_4xx_and_the_server_goes_on(
    served, world, loopback_only
):
    # Each of these was a 500 (an exception the routes did not expect), found by a review,
    # but the tag that is not a string, which was a 409.
    served.api().create_repo("local/hostile-empty", exist_ok=True)
    served.api().upload_folder(folder_path=world / "a", repo_id="local/hostile")
    before = _ls(served.home)
    oid = "ab" * 32
    # A non-ASCII signature on an upload URL: hmac's compare refused to compare it.
    status, _, _ = served.server.request(
        "PUT", f"/lorahub-lfs/local/hostile/{oid}/1?expires=1&sig=%C3%A9", b"x"
    )
    assert status == 403
    writer = _auth(served.writer)
    # A lone surrogate (JSON "\ud800") where a path goes: it cannot be encoded to answer
    # with it, nor be a file name.
    preupload = b'{"files":[{"path":"\\ud800","size":1}]}'
    status, _, answer = served.server.request(
        "POST", "/api/models/local/hostile/preupload/main", preupload, writer
    )
    assert status == 400, answer
    header = json.dumps(_header()).encode()
    for line in (
        b'{"key":"file","value":{"path":"a\\ud800","content":"aGk="}}',
        b'{"key":"deletedFile","value":{"path":"\\ud800"}}',
        b'{"key":"file","value":{"path":"d\\ud800/x","content":"aGk="}}',
    ):
        status, text = _commit(served, "local/hostile", header + b"\n" + line, served.writer)
        assert 400 <= status < 500, text
    # 200 characters, 400 bytes of UTF-8: longer than a file name may be.
    long_name = _ndjson(_header(), {"key": "file", "value": {"path": "é" * 200, "content": ""}})
    status, text = _commit(served, "local/hostile", long_name, served.writer)
    assert status == 400 and "invalid path" in text
    # A tag that is not a string; a branch name lorahub refuses, on a repo with an adapter
    # and on one still empty.
    status, _, answer = served.server.request(
        "POST", "/api/models/local/hostile/tag/main", b'{"tag": 5}', writer
    )
    assert status == 400, answer
    for repo in ("hostile", "hostile-empty"):
        status, _, answer = served.server.request(
            "POST", f"/api/models/local/{repo}/branch/..x", b"{}", writer
        )
        assert status == 400, answer
    # verify with a size that is not a number of bytes
    status, _, answer = served.server.request(
        "POST",
        "/lorahub-lfs/verify/local/hostile",
        json.dumps({"oid": oid, "size": [1]}).encode(),
        writer,
    )
    assert status == 400, answer
    # Thousands of tiny files: refused as the lines arrive, before any is written.
    from lorahub.serve.write import COMMIT_FILES

    many = [{"key": "file", "value": {"path": f"f{i}.txt", "content": ""}} for i in range(2000)]
    status, text = _commit(served, "local/hostile", _ndjson(_header(), *many), served.writer)
    assert status == 400 and f"at most {COMMIT_FILES} files" in text
    assert "Traceback" not in served.server.output()
    assert served.api().whoami()["name"] == "alice"
    assert served.tmp_files() == []
    assert _ls(served.home) == before


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MB file system of its own (tmpfs), to fill up; needs root to mount."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small file system needs root")
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode(errors='replace')}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    """A file taking every free byte of ``disk``."""
    filler = disk / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_is_a_507_that_stores_nothing_and_the_push_works_once_freed(
    small_disk, world, tmp_path, loopback_only
):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    home = small_disk / "store"
    writer, _ = _tokens(home)
    with serving(home, tmp_path / "work") as server:
        api = HfApi(endpoint=server.url, token=writer)
        api.create_repo("local/full")

        def refused(repo: str, folder: Path, where: str) -> None:
            filler = _fill(small_disk)
            before = _ls(home)
            with pytest.raises((HfHubHTTPError, RuntimeError)) as err:
                api.upload_folder(folder_path=folder, repo_id=repo)
            filler.unlink()
            http = err.value  # an LFS upload's error comes as the cause of a RuntimeError
            while not isinstance(http, HfHubHTTPError) and http.__cause__ is not None:
                http = http.__cause__
            assert isinstance(http, HfHubHTTPError), err.value
            assert http.response.status_code == 507, http
            assert where in str(http.response.url)
            assert "no space left on the server's disk" in str(http)
            assert _ls(home) == before
            assert not list((home / "serve").rglob("*.partial"))
            assert not list((home / "serve").rglob(".upload.key.*"))
            assert not list((home / "tmp").iterdir())

        # The first upload ever makes the store's upload key: the LFS batch fails to.
        refused("local/full", world / "a", "/info/lfs/objects/batch")
        api.upload_folder(folder_path=world / "b", repo_id="local/first")
        # With the key made, the weights' PUT is what meets the full disk.
        refused("local/full", world / "a", "/lorahub-lfs/")
        api.upload_folder(folder_path=world / "a", repo_id="local/full")
        assert _ls(home)["full:latest"] == _added_digest(world / "a", tmp_path)
        assert "Traceback" not in server.output()
