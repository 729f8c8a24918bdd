"""The web pages of ``lorahub serve``, in a real browser: the system Chromium driven by
Playwright, against a real server process over a store with fixture adapters (two bases,
three imports, a DoRA adapter, a composition). Each test saves screenshots under its tmp
dir (kept by pytest after a failure); ``LORAHUB_DOCS_SCREENSHOT=1`` also writes the README's
``docs/adapter-page.png``."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from factories import cli_runner
from playwright import sync_api
from servekit import Server, serving

import lorahub

CHROMIUM = Path(os.environ.get("LORAHUB_CHROMIUM", "/usr/bin/chromium"))
DOCS = Path(__file__).resolve().parent.parent / "docs"
PWNED = "window.__pwned"
CARD = """---
license: apache-2.0
tags: [sql]
---
# SQL expert

Writes **SQL** from questions.

| split | accuracy |
|-------|----------|
| dev   | 0.71     |

<script>window.__pwned = 1</script>
<img src="x" onerror="window.__pwned = 2">
[click](javascript:window.__pwned=3)
"""

# Never skipped: a suite that passes without a browser would not have tested the pages.
if not CHROMIUM.exists():
    raise RuntimeError(
        f"the web page tests need Chromium at {CHROMIUM}: apt-get install -y chromium"
    )


@dataclass
class Store:
    home: Path
    work: Path
    reader: str  # every namespace
    team: str  # namespace "team" only
    digests: dict[str, str]
    bases: dict[str, int]


@pytest.fixture(scope="module")
def store(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Store:
    """Bases ``tiny-llama`` and ``wide-llama``; ``sql-expert:v1`` (with a card that tries
    to inject a script), ``team/other:v1``, ``dora-thing:v1``, ``ui/adapters:latest`` (a
    repo whose resolve path lies under the pages' prefix) and ``blend:v1`` composed of the
    first two with weights 0.7 and 0.3."""
    work = tmp_path_factory.mktemp("web")
    home = work / "store"
    run = cli_runner(home)
    run("base", "add", world / "llama", "--name", "tiny-llama")
    run("base", "add", world / "wide", "--name", "wide-llama")
    carded = work / "sql-expert"
    shutil.copytree(world / "a", carded)
    (carded / "README.md").write_text(CARD)
    base = world / "llama"
    run("add", carded, "--name", "sql-expert:v1", "--base", base)
    run("add", world / "b", "--name", "team/other:v1", "--base", base)
    run("add", world / "dora-ad", "--name", "dora-thing:v1", "--base", base)
    run("add", world / "ad2", "--name", "ui/adapters:latest", "--base", base)
    parents = ("sql-expert:v1", "team/other:v1")
    run("compose", *parents, "-w", "0.7,0.3", "--method", "cat", "-n", "blend:v1")
    reader = run("token", "add", "reader", "-q").stdout.strip()
    team = run("token", "add", "teamer", "--namespace", "team", "-q").stdout.strip()
    with lorahub.open(home) as hub:
        digests = {n: hub.get(f"{n}:v1").digest for n in ("sql-expert", "team/other", "blend")}
        bases = {b.name: b.id for b in hub.bases()}
    return Store(home, work, reader, team, digests, bases)


@pytest.fixture(scope="module")
def public(store: Store) -> Iterator[Server]:
    with serving(store.home, store.work, "--allow-anonymous") as server:
        yield server


@pytest.fixture(scope="module")
def private(store: Store) -> Iterator[Server]:
    with serving(store.home, store.work) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any, tmp_path: Path) -> Iterator[Any]:
    """A fresh browser context (no cookie) at desktop width; its console errors fail the
    test (a page that breaks is a bug, and a CSP refusal shows there)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield tab
    finally:
        tab.screenshot(path=str(tmp_path / "last.png"), full_page=True)
        context.close()
    assert not errors, errors


def shot(page: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def texts(page: Any, selector: str) -> list[str]:
    loc = page.locator(selector)
    found = loc.all_text_contents() if "svg" in selector else loc.all_inner_texts()
    return [t.strip() for t in found]


# ---------------------------------------------------------------------- pages


def test_home_shows_search_bases_recent_and_totals(public, page, tmp_path):
    page.goto(public.url + "/")
    assert page.url == public.url + "/ui/"
    totals = page.locator("section.totals").inner_text()
    assert "5\nadapters" in totals and "blobs" in totals and "saved by dedup" in totals
    assert "merged cache (0)" in totals
    assert texts(page, "ul.bases li > a:first-child") == ["wide-llama", "tiny-llama"]
    recent = texts(page, "table.adapters tbody td:first-child a")
    assert recent[0] == "blend:v1" and "sql-expert:v1" in recent
    page.fill("form.search input[name=q]", "expert")
    page.click("form.search button")
    assert texts(page, "table.adapters tbody td:first-child a") == ["sql-expert:v1"]
    shot(page, tmp_path, "home")


def test_filters_narrow_the_list_and_sort(public, page, tmp_path):
    page.goto(public.url + "/ui/adapters")
    assert page.locator("p.count").inner_text() == "5 adapters"
    page.fill("input[name=target]", "o_proj")
    page.click("form.filters button")
    assert sorted(texts(page, "table.adapters tbody td:first-child a")) == [
        "blend:v1",
        "team/other:v1",
    ]
    assert page.locator("p.count").inner_text() == "2 adapters"
    page.fill("input[name=target]", "")
    page.select_option("select[name=dora]", "true")
    page.click("form.filters button")
    assert texts(page, "table.adapters tbody td:first-child a") == ["dora-thing:v1"]
    assert page.locator("table.adapters tbody .badge").inner_text() == "DoRA"
    page.select_option("select[name=dora]", "")
    page.fill("input[name=rank]", "4")
    page.select_option("select[name=sort]", "old")
    page.click("form.filters button")
    found = texts(page, "table.adapters tbody td:first-child a")
    assert found == ["sql-expert:v1", "dora-thing:v1", "blend:v1"]
    page.select_option("select[name=base]", label="wide-llama")
    page.click("form.filters button")
    assert page.locator("td.empty").inner_text() == "No adapters."
    shot(page, tmp_path, "list")


def test_a_bad_filter_is_a_clear_400(public):
    status, _, body = public.request("GET", "/ui/adapters?rank=abc")
    assert status == 400 and b"filter rank needs a whole number" in body
    assert public.request("GET", "/ui/bases/999")[0] == 404
    assert public.request("GET", "/ui/adapters/nope:v9")[0] == 404
    assert public.request("GET", "/ui/static/../../etc/passwd")[0] == 400
    assert public.request("GET", "/ui/static/other.js")[0] == 404


def test_adapter_page(public, store, page, tmp_path):
    page.goto(public.url + "/ui/adapters")
    page.click("text=sql-expert:v1")
    assert page.locator("main > h1").inner_text() == "sql-expert:v1"
    assert store.digests["sql-expert"] in page.locator("code.digest").inner_text()
    facts = page.locator("dl.facts").inner_text()
    assert "Rank\n4" in facts and "Alpha\n8" in facts and "q_proj" in facts
    # compatibility with each registered base, with the reasons
    rows = {r.split("\t")[0]: r for r in texts(page, "table.compat tbody tr")}
    assert "exact" in rows["tiny-llama"]
    assert "incompatible" in rows["wide-llama"] and "base has [48, 48]" in rows["wide-llama"]
    # per-module table: both layers' q_proj, shapes, rank, scale alpha/r = 2
    modules = texts(page, "table.modules tbody tr")
    assert len(modules) == 2
    assert modules[0].split("\t")[:7] == [
        "model.layers.0.self_attn.q_proj",
        "linear",
        "32×32",
        "4×32",
        "32×4",
        "4",
        "2",
    ]
    # the per-module chart: one bar per module, each named in its tooltip
    chart = page.locator("#norms svg.norms")
    assert chart.is_visible()
    titles = texts(page, "#norms svg.norms g.bar title")
    assert len(titles) == len(modules) == 2
    assert titles[0].startswith("model.layers.0.self_attn.q_proj: ")
    assert titles[1].startswith("model.layers.1.self_attn.q_proj: ")
    # the card: rendered, its script and handlers gone
    card = page.locator("article.card")
    assert card.locator("h1").inner_text() == "SQL expert"
    assert card.locator("table td").first.inner_text() == "dev"
    assert card.locator("script").count() == 0
    assert card.locator("[onerror]").count() == 0
    assert card.locator("[href^='javascript']").count() == 0
    assert page.evaluate(PWNED) is None
    # how to use it, with the real ids; the download links answer
    usage = page.locator("#usage").inner_text()
    assert f"HF_ENDPOINT={public.url}" in usage
    assert 'PeftModel.from_pretrained(base, "local/sql-expert", revision="v1")' in usage
    assert "hf download local/sql-expert --revision v1" in usage
    assert "--max-lora-rank 4" in usage and "lorahub pull local/sql-expert@v1" in usage
    href = page.locator("ul.downloads a", has_text="adapter_config.json").get_attribute("href")
    answer = page.request.get(public.url + href)
    assert answer.status == 200 and answer.json()["r"] == 4
    path = shot(page, tmp_path, "adapter")
    if os.environ.get("LORAHUB_DOCS_SCREENSHOT") == "1":
        DOCS.mkdir(exist_ok=True)
        page.set_viewport_size({"width": 1100, "height": 900})
        page.screenshot(path=str(DOCS / "adapter-page.png"), full_page=True)
    assert path.stat().st_size > 10_000


def test_lineage_graph_and_what_was_made_from_it(public, store, page, tmp_path):
    page.goto(f"{public.url}/ui/adapters/{store.digests['blend']}")
    graph = page.locator("#lineage svg.lineage")
    assert texts(page, "#lineage svg g.parent text") == ["sql-expert:v1", "team/other:v1"]
    assert texts(page, "#lineage svg g.child text") == ["blend:v1"]
    assert texts(page, "#lineage svg text.edge") == ["w=0.7", "w=0.3"]
    assert "cat" in page.locator("#lineage").inner_text()
    assert page.locator("#lineage .error-figure").inner_text() == "exact"  # cat: no error
    shot(page, tmp_path, "lineage")
    graph.locator("a").first.click()  # a parent node links to its page
    assert page.locator("main > h1").inner_text() == "sql-expert:v1"
    assert texts(page, "#derived table.adapters tbody td:first-child a") == ["blend:v1"]


def test_base_page_lists_fingerprints_and_what_fits(public, store, page, tmp_path):
    page.goto(f"{public.url}/ui/bases/{store.bases['tiny-llama']}")
    facts = page.locator("dl.facts").inner_text()
    assert "Signature\nxxh128:" in facts and "Tensors\n21" in facts
    fits = {r.split("\t")[0]: r.split("\t")[1] for r in texts(page, "table.fits tbody tr")}
    assert fits["sql-expert:v1"] == "exact" and len(fits) == 5
    page.goto(f"{public.url}/ui/bases/{store.bases['wide-llama']}")
    assert page.locator("td.empty").inner_text() == "No adapter recorded for it yet."
    shot(page, tmp_path, "base")


def test_phone_width_needs_no_sideways_scroll(browser, public, store, tmp_path):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    tab = context.new_page()
    try:
        for path in ("/ui/", "/ui/adapters", f"/ui/adapters/{store.digests['blend']}"):
            tab.goto(public.url + path)
            width = tab.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, (path, width)
            name = path.strip("/").replace("/", "_").replace(":", "_") or "home"
            tab.screenshot(path=str(tmp_path / f"phone-{name}.png"), full_page=True)
    finally:
        context.close()


# ---------------------------------------------------------------------- access


def test_pages_need_a_token_kept_in_a_strict_httponly_cookie(private, store, page, tmp_path):
    page.goto(private.url + "/ui/adapters?rank=4")
    assert "/ui/login" in page.url
    page.fill("input[name=token]", "lh_not_a_token")
    page.click("form.login button")
    assert "not valid" in page.locator("p.error").inner_text()
    page.fill("input[name=token]", store.reader)
    page.click("form.login button")
    assert page.url.endswith("/ui/adapters?rank=4")  # back where it was going
    assert page.locator("p.count").inner_text() == "3 adapters"
    (cookie,) = page.context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""
    page.click("text=Log out")
    page.goto(private.url + "/ui/")
    assert "/ui/login" in page.url
    shot(page, tmp_path, "login")


def test_a_namespace_token_sees_only_its_namespace(private, store, page):
    page.goto(private.url + "/ui/login")
    page.fill("input[name=token]", store.team)
    page.click("form.login button")
    page.goto(private.url + "/ui/adapters")
    assert texts(page, "table.adapters tbody td:first-child a") == ["team/other:v1"]
    page.goto(f"{private.url}/ui/adapters/{store.digests['sql-expert']}")
    assert page.locator("main > h1").inner_text() == "Sorry"
    # a composition of a hidden parent: the graph names it by digest only, no link
    page.goto(f"{private.url}/ui/adapters/{store.digests['team/other']}")
    assert page.locator("main > h1").inner_text() == "team/other:v1"


def test_a_bad_header_token_is_refused_and_no_open_redirect(private, store):
    status, _, _ = private.request("GET", "/ui/", headers={"Authorization": "Bearer nope"})
    assert status == 401
    auth = {"Authorization": f"Bearer {store.reader}"}
    assert private.request("GET", "/ui/", headers=auth)[0] == 200
    body = f"token={store.reader}&next=//evil.example/".encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    status, got, _ = private.request("POST", "/ui/login", body, headers)
    assert status == 303 and got["location"] == "/ui/"
    cookie = got["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie


def _raw_answer(port: int, data: bytes) -> bytes:
    """What the server answers ``data`` sent whole on a connection of its own, to its close."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:  # closed with bytes of ours unread: after its answer
            if not answer:
                raise
    return answer


def test_a_login_body_over_its_cap_is_refused_before_it_is_read_whole(private, store):
    form = f"token={store.reader}&next=/ui/&pad=".encode()
    # Announced over the cap: refused before any of it is read (none is sent).
    head = (
        b"POST /ui/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    )
    answer = _raw_answer(private.port, head + b"Content-Length: 1048576\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413") and b"over the limit" in answer
    # Streamed without a length: refused once past the cap (20 KB sent, 16 KB allowed).
    body = form + b"x" * (20 << 10)
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    answer = _raw_answer(private.port, head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked)
    assert answer.startswith(b"HTTP/1.1 413") and b"over the limit" in answer
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    body = f"token={store.reader}&next=/ui/".encode()
    assert private.request("POST", "/ui/login", body, headers)[0] == 303


def test_user_text_is_escaped(public, store, page, world):
    page.goto(public.url + "/ui/adapters?q=" + "%3Cscript%3Ewindow.__pwned%3D1%3C/script%3E")
    assert page.input_value("input[name=q]") == "<script>window.__pwned=1</script>"
    assert page.evaluate(PWNED) is None
    _, _, body = public.request("GET", f"/ui/adapters/{store.digests['sql-expert']}")
    assert b"<script>window.__pwned" not in body and b"onerror" not in body
    # names that could carry markup are refused at the door
    res = cli_runner(store.home)("add", world / "b", "--name", "<script>x", code=None)
    assert res.exit_code != 0 and "invalid name" in res.stderr


def test_pages_do_not_shadow_the_hub_api(public, store, tmp_path):
    """``ui/adapters`` is a repo too: its files resolve under /ui/adapters/resolve/."""
    from huggingface_hub import hf_hub_download

    got = hf_hub_download(
        "ui/adapters",
        "adapter_config.json",
        endpoint=public.url,
        cache_dir=tmp_path / "hf",
        token=False,
    )
    assert '"r": 2' in Path(got).read_text()
    status, headers, _ = public.request("GET", "/api/models")
    assert status == 200 and headers["content-type"].startswith("application/json")
