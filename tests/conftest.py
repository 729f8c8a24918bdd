"""Shared fixtures. The Hugging Face variables are set here, before anything imports
huggingface_hub (it reads them at import), so no test can ever reach huggingface.co."""

from __future__ import annotations

import os
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="lorahub-test-hf-")
os.environ.update(
    {
        "HF_ENDPOINT": "http://127.0.0.1:9",  # a closed port until a test server replaces it
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_VERBOSITY": "error",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
        "HF_HOME": _HF_HOME,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
    }
)
for _var in (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_OIDC_RESOURCE",
    "LORAHUB_DATABASE_URL",
    "LORAHUB_BLOBS_URL",
    "LORAHUB_BLOBS_CACHE_MAX_BYTES",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
):
    os.environ.pop(_var, None)

import socket  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import pytest  # noqa: E402
from factories import CliRun, cli_runner, peft_adapter, tiny_llama  # noqa: E402

if TYPE_CHECKING:
    import pgkit
    import s3kit
    from hubserver import HubServer

    import lorahub

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Each test gets its own store and Hugging Face cache, and no token."""
    monkeypatch.setenv("LORAHUB_HOME", str(tmp_path / "lorahub-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("LORAHUB_DEBUG", raising=False)
    yield


# ------------------------------------------------------------------ a store


@pytest.fixture
def store_home(tmp_path: Path) -> Path:
    """Where this test's store lives (created when first opened): ``hub`` and ``run`` use it."""
    return tmp_path / "store"


@pytest.fixture
def hub(store_home: Path) -> Iterator[lorahub.Hub]:
    """An empty store at ``store_home``, closed after the test."""
    import lorahub

    with lorahub.open(store_home) as h:
        yield h


@pytest.fixture
def run(store_home: Path) -> CliRun:
    """The CLI on the store at ``store_home``: ``run(*args, code=0, input=None)``
    (see :func:`factories.cli_runner`)."""
    return cli_runner(store_home)


# ------------------------------------------------------------------ the catalog's database


@pytest.fixture(scope="module")
def s3() -> Iterator[s3kit.S3Server]:
    """moto's S3 server on 127.0.0.1 (``tests/s3kit.py``), one per test module using it."""
    import s3kit

    with s3kit.s3_server() as server:
        yield server


@pytest.fixture(scope="session")
def postgres() -> Iterator[pgkit.Cluster]:
    """A throwaway PostgreSQL cluster for the session (``tests/pgkit.py``), started when a
    test first needs it. Without the server programs the tests that need it FAIL, saying
    how to install them: never skipped."""
    import pgkit

    try:
        cluster = pgkit.start()
    except pgkit.PostgresMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    yield cluster
    cluster.stop()


@pytest.fixture
def catalog(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[str]:
    """Which database holds this test's catalogs: ``"sqlite"`` (the store's own file) or
    ``"postgresql"`` (a fresh, migrated database of the session's cluster, named by
    ``LORAHUB_DATABASE_URL`` for this process and the ones it starts). A module opts in with
    ``pytestmark = pytest.mark.usefixtures("catalog")``; a test marked ``sqlite_only`` (it
    works on the SQLite file itself) runs on SQLite alone."""
    if request.param == "sqlite":
        yield "sqlite"
        return
    cluster = request.getfixturevalue("postgres")
    fresh = request.node.get_closest_marker("fresh_catalog") is not None
    url = cluster.create_database(migrated=False) if fresh else cluster.checkout()
    monkeypatch.setenv("LORAHUB_DATABASE_URL", url)
    yield "postgresql"
    if fresh:
        cluster.drop_database(url)
    else:
        cluster.checkin(url)
    # Nothing fell back to a SQLite file: the test really ran on PostgreSQL.
    assert not list(tmp_path.rglob("lorahub.db")), "a store opened a SQLite catalog"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "catalog" in metafunc.fixturenames:
        only = metafunc.definition.get_closest_marker("sqlite_only")
        kinds = ["sqlite"] if only else ["sqlite", "postgresql"]
        metafunc.parametrize("catalog", kinds, indirect=True)


# ------------------------------------------------------------------ models and adapters


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny seeded Llamas and PEFT adapters of them, made once and never written to again:

    - ``llama``: the base (seed 0); ``llama-instruct``: same shapes, other weights (seed 7);
      ``wide``: hidden size 48 instead of 32;
    - ``a``: q_proj, rank 4, alpha 8 (seed 1); ``ad2``: q_proj, rank 2, alpha 2 (seed 2);
      ``b``: o_proj, rank 2, alpha 2 (seed 2); ``wide-ad``: q_proj of ``wide``, rank 4, alpha 8;
      ``dora-ad``: DoRA on q_proj, v_proj and embed_tokens, rank 4, alpha 8.
    """
    d = tmp_path_factory.mktemp("world")
    tiny_llama(seed=0).save_pretrained(d / "llama")
    tiny_llama(seed=7).save_pretrained(d / "llama-instruct")
    tiny_llama(hidden_size=48).save_pretrained(d / "wide")
    peft_adapter(tiny_llama(), d / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"])
    peft_adapter(tiny_llama(), d / "ad2", seed=2, r=2, lora_alpha=2, target_modules=["q_proj"])
    peft_adapter(tiny_llama(), d / "b", seed=2, r=2, lora_alpha=2, target_modules=["o_proj"])
    peft_adapter(
        tiny_llama(hidden_size=48), d / "wide-ad", r=4, lora_alpha=8, target_modules=["q_proj"]
    )
    peft_adapter(
        tiny_llama(),
        d / "dora-ad",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "embed_tokens"],
        use_dora=True,
    )
    return d


@pytest.fixture(scope="session")
def peft_save(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real PEFT save of a tiny Llama adapter (q_proj, v_proj of both layers, rank 4, alpha
    8), the seed that the hostile-input tests vary; copy it before changing it."""
    out = tmp_path_factory.mktemp("peft-save") / "adapter"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_adapter(tiny_llama(), out, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return out


# ------------------------------------------------------------------ the network


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Refuse to resolve any name but loopback, and fail the test if it tried: name
    resolution is the choke point of every outgoing connection."""
    escapes: list[object] = []
    real = socket.getaddrinfo

    def guarded(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in LOOPBACK:
            escapes.append(host)
            raise OSError(f"tests may only reach loopback, not {host!r}")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)
    yield
    assert escapes == [], f"a test tried to leave 127.0.0.1: {escapes}"


@pytest.fixture
def hub_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """The in-process Hub look-alike (``tests/hubserver.py``), as the endpoint
    huggingface_hub talks to; a bug it hit fails the test."""
    from hubserver import HubServer
    from huggingface_hub import constants

    with HubServer() as s:
        # Both are fixed at import from HF_ENDPOINT; a user's HF_ENDPOINT sets both alike.
        monkeypatch.setattr(constants, "ENDPOINT", s.url)
        monkeypatch.setattr(
            constants,
            "HUGGINGFACE_CO_URL_TEMPLATE",
            s.url + "/{repo_id}/resolve/{revision}/{filename}",
        )
        yield s
        assert s.errors == [], "the test server hit a bug:\n" + "\n".join(s.errors)


ALICE_TOKEN = "hf_alice_t0ken_0123456789abcdef"  # may write to myorg on ``alice_hub``


@pytest.fixture
def alice_hub(
    hub_server: HubServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    loopback_only: None,
) -> HubServer:
    """The test Hub as a client logged in as alice (org myorg, write access) sees it: her
    token in HF_TOKEN, no stored token of the machine's, no Xet, online."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-stored-tokens"))
    monkeypatch.setenv("HF_TOKEN", ALICE_TOKEN)
    hub_server.add_token(ALICE_TOKEN, "alice", orgs=["myorg"])
    return hub_server


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
