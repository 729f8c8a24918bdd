"""``lorahub serve`` with tokens: a real server process, driven by the real huggingface_hub
client. Reads need a token unless ``--allow-anonymous``; a token may be limited to
namespaces; ``--gated`` namespaces need one for downloads; ``lorahub token rm`` takes effect
in running servers; and no secret ever appears in the server's output or in an answer."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from factories import cli_runner
from servekit import Server, serving

REPO = "local/sql-expert"
TEAM = "team/other"
CANARY = "lh_CANARY_auth_t0ken_never_printed_0123456789abcdef"


@dataclass
class Store:
    home: Path
    work: Path
    read: str  # every namespace
    write: str  # every namespace, write
    team: str  # read, namespace "team" only
    local: str  # read, namespace "local" only


@pytest.fixture(scope="module")
def store(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Store:
    """``sql-expert:v1`` (repo local/sql-expert) and ``team/other:v1``, and three tokens."""
    work = tmp_path_factory.mktemp("serve-auth")
    home = work / "store"
    run = cli_runner(home)
    run("add", world / "a", "--name", "sql-expert:v1")
    run("tag", "sql-expert:v1", "sql-expert:latest")
    run("add", world / "b", "--name", "team/other:v1")
    run("tag", "team/other:v1", "team/other:latest")
    read = run("token", "add", "reader", "-q").stdout.strip()
    write = run("token", "add", "writer", "--write", "-q").stdout.strip()
    team = run("token", "add", "teamer", "--namespace", "team", "-q").stdout.strip()
    local = run("token", "add", "locals", "--namespace", "local", "-q").stdout.strip()
    return Store(home, work, read, write, team, local)


@pytest.fixture(scope="module")
def private(store: Store) -> Iterator[Server]:
    """A server without --allow-anonymous, logging at DEBUG (the canary test reads it)."""
    with serving(store.home, store.work, env={"LORAHUB_LOG_LEVEL": "DEBUG"}) as server:
        yield server


@pytest.fixture(scope="module")
def public(store: Store) -> Iterator[Server]:
    """A server with anonymous reads, whose namespace ``team`` is gated."""
    with serving(store.home, store.work, "--allow-anonymous", "--gated", "team") as server:
        yield server


def api(server: Server, token: str | bool):
    from huggingface_hub import HfApi

    return HfApi(endpoint=server.url, token=token)


def download(server: Server, repo: str, token: str | bool, cache: Path) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(
        hf_hub_download(
            repo, "adapter_config.json", endpoint=server.url, cache_dir=cache, token=token
        )
    )


def test_a_read_token_reads_and_downloads(store, private, loopback_only, tmp_path):
    info = api(private, store.read).model_info(REPO)
    assert info.id == REPO and len(info.sha) == 40
    assert api(private, store.write).model_info(TEAM).id == TEAM
    assert "peft_type" in download(private, REPO, store.read, tmp_path / "c").read_text()
    assert {m.id for m in api(private, store.read).list_models()} == {REPO, TEAM}


def test_without_a_token_a_private_server_hides_every_repo(store, private, loopback_only, tmp_path):
    from huggingface_hub.errors import RepositoryNotFoundError

    anonymous = api(private, False)
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info(REPO)
    with pytest.raises(RepositoryNotFoundError):
        download(private, REPO, False, tmp_path / "c")
    assert not anonymous.repo_exists(REPO)
    status, headers, _ = private.request("GET", f"/api/models/{REPO}")
    assert status == 401 and headers["x-error-code"] == "RepoNotFound"
    status, _, body = private.request("GET", "/api/models")
    assert status == 200 and json.loads(body) == []  # a listing shows nothing, as on the Hub


def test_a_wrong_token_is_a_401_on_every_route(store, private, loopback_only, tmp_path):
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    wrong = store.read[:-4] + "AAAA"
    with pytest.raises(HfHubHTTPError) as caught:
        api(private, wrong).model_info(REPO)
    assert caught.value.response.status_code == 401
    assert not isinstance(caught.value, RepositoryNotFoundError)
    with pytest.raises(HfHubHTTPError) as caught:
        download(private, REPO, wrong, tmp_path / "c")
    assert caught.value.response.status_code == 401
    for path in ("/api/models", f"/api/models/{REPO}", "/api/whoami-v2", "/nope"):
        for header in (f"Bearer {wrong}", "Bearer ", "Basic dXNlcjpwYXNz", wrong):
            status, headers, _ = private.request("GET", path, headers={"Authorization": header})
            assert status == 401, (path, header)
            assert headers["x-error-message"] == "Invalid credentials in Authorization header"


def test_a_namespace_token_sees_only_its_namespace(store, private, loopback_only, tmp_path):
    from huggingface_hub.errors import RepositoryNotFoundError

    team = api(private, store.team)
    assert team.model_info(TEAM).id == TEAM
    with pytest.raises(RepositoryNotFoundError):
        team.model_info(REPO)
    with pytest.raises(RepositoryNotFoundError):
        download(private, REPO, store.team, tmp_path / "c")
    status, headers, _ = private.request(
        "GET", f"/api/models/{REPO}", headers={"Authorization": f"Bearer {store.team}"}
    )
    assert status == 404 and headers["x-error-code"] == "RepoNotFound"  # 404 to a token
    assert [m.id for m in team.list_models()] == [TEAM]


def test_whoami_names_the_token_and_its_role(store, private, loopback_only):
    from huggingface_hub.errors import HfHubHTTPError

    me = api(private, store.write).whoami()
    assert me["type"] == "user" and me["name"] == "writer"
    assert me["auth"]["accessToken"] == {"displayName": "writer", "role": "write"}
    team = api(private, store.team).whoami()
    assert team["auth"]["accessToken"]["role"] == "read"
    assert [o["name"] for o in team["orgs"]] == ["team"]
    with pytest.raises(HfHubHTTPError, match="Invalid user token"):
        api(private, store.read + "x").whoami()
    assert private.request("GET", "/api/whoami-v2")[0] == 401


def test_a_gated_namespace_needs_a_token_to_download(store, public, loopback_only, tmp_path):
    from huggingface_hub.errors import GatedRepoError

    anonymous = api(public, False)
    assert anonymous.model_info(REPO).id == REPO  # not gated: anonymous reads
    assert "peft_type" in download(public, REPO, False, tmp_path / "a").read_text()
    assert anonymous.model_info(TEAM).id == TEAM  # gated: info stays visible
    assert anonymous.repo_exists(TEAM)
    with pytest.raises(GatedRepoError) as caught:
        download(public, TEAM, False, tmp_path / "b")
    assert caught.value.response.status_code == 401
    with pytest.raises(GatedRepoError) as caught:  # a token, but not for namespace team
        download(public, TEAM, store.local, tmp_path / "c")
    assert caught.value.response.status_code == 403
    assert "peft_type" in download(public, TEAM, store.team, tmp_path / "d").read_text()
    assert "peft_type" in download(public, TEAM, store.read, tmp_path / "e").read_text()
    assert {m.id for m in anonymous.list_models()} == {REPO, TEAM}


def test_token_rm_takes_effect_in_every_worker_without_a_restart(store, loopback_only):
    from huggingface_hub.errors import HfHubHTTPError

    run = cli_runner(store.home)
    secret = run("token", "add", "short-lived", "-q").stdout.strip()
    with serving(store.home, store.work, "--workers", "2") as server:
        client = api(server, secret)
        for _ in range(6):  # requests land on both workers
            assert client.model_info(REPO).id == REPO
        run("token", "rm", "short-lived", "-y")
        deadline = time.monotonic() + 10
        refused = 0
        while refused < 6:  # six refusals in a row: every worker refuses it
            try:
                client.model_info(REPO)
                refused = 0
            except HfHubHTTPError as exc:
                assert exc.response.status_code == 401
                refused += 1
            assert time.monotonic() < deadline, "a removed token was still accepted after 10 s"
        assert api(server, store.read).model_info(REPO).id == REPO  # others unaffected


def test_no_secret_appears_in_logs_answers_or_listings(store, private, loopback_only, tmp_path):
    """The canary: a valid secret and an invalid one, sent on every kind of route, appear
    nowhere in the DEBUG server output, in any answer, or in `token ls`."""
    secrets = (store.read, store.team, CANARY, f"{CANARY}-{store.read}")
    seen: list[bytes] = []
    paths = [
        "/api/models",
        f"/api/models/{REPO}",
        f"/api/models/{REPO}/revision/main",
        f"/api/models/{REPO}/tree/main",
        f"/api/models/{REPO}/refs",
        f"/{REPO}/resolve/main/adapter_config.json",
        f"/{REPO}/resolve/main/missing.bin",
        f"/api/models/{TEAM}",
        "/api/models/local/nothing",
        "/api/whoami-v2",
        "/nope",
    ]
    for secret in secrets:
        for path in paths:
            for method in ("GET", "HEAD"):
                status, headers, body = private.request(
                    method, path, headers={"Authorization": f"Bearer {secret}"}
                )
                assert status < 500, (path, status)
                seen += [json.dumps(headers).encode(), body]
        status, headers, body = private.request(
            "POST", f"/api/models/{REPO}/commit/main", b"{}", {"Authorization": f"Bearer {secret}"}
        )
        seen += [json.dumps(headers).encode(), body]
    run = cli_runner(store.home)
    listings = run("token", "ls").stdout + run("token", "ls", "--json").stdout
    output = private.output()
    assert "debug:" in output  # the server did log at DEBUG
    assert "reader" in output  # ... including the checks of these tokens, by name
    for secret in secrets:
        assert secret not in output
        assert secret.encode() not in b"\n".join(seen)
        assert secret not in listings
    assert CANARY[3:20] not in output  # not even a piece of it


def test_a_store_without_tokens_starts_with_a_hint(tmp_path, loopback_only):
    """Without --allow-anonymous the server starts (tokens exist now) and, when the store has
    none, says how to make one; every read is then refused."""
    with serving(tmp_path / "store", tmp_path) as server:
        status, headers, _ = server.request("GET", f"/api/models/{REPO}")
        assert status == 401 and headers["x-error-code"] == "RepoNotFound"
        assert "lorahub token add NAME" in server.output()
        assert "a token needed" in server.output()
