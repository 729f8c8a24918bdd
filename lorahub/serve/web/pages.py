"""The web pages of ``lorahub serve``: home, adapter list, adapter, base, login.

Every page lives under ``/ui/`` (``/`` redirects there). ``ui`` is a valid namespace, so the
one shape of path the Hub API owns there, ``/ui/{name}/resolve/...``, is left to it: no page
is ever at such a path (:func:`is_page`).

Access is the API's (``auth.py``): a page needs the read right, from an ``Authorization``
header or from the token the login form keeps in an ``HttpOnly``, ``SameSite=Strict``
cookie; without one only ``--allow-anonymous`` shows anything. A token limited to some
namespaces sees only their adapters. Every user-controlled text is escaped by Jinja's
autoescape; the model card is rendered from Markdown and sanitized (``render.py``).
"""

from __future__ import annotations

import logging
import math
import re
import time
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from ...card import original_card
from ...catalog import reads
from ...catalog.plain import plain_reads
from ...digest import Digest
from ...errors import AdapterNotFound, AmbiguousReference, LorahubError
from ..auth import ANONYMOUS, Auth, Caller
from ..bodies import read_body
from ..errors import HubError
from ..mapping import Mapping, commit_id
from . import chart, queries, render
from .norms import NORMS_FOLDER, ModuleNorm, NormCache

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from ...hub import Hub
    from ...info import AdapterInfo, BaseInfo

log = logging.getLogger(__name__)

PREFIX = "/ui"
COOKIE = "lorahub_token"
PAGE_SIZE = 50
TOTALS_TTL_S = 30.0
LOGIN_CAP = 16 << 10  # a login form: a token and where to go next
#: Weights up to this size have their chart computed while the page waits (tens of ms);
#: larger ones in the background.
INLINE_NORMS_BYTES = 32 << 20
_STATIC = {"style.css": "text/css; charset=utf-8"}
_HEX = re.compile(r"^(?:xxh128:)?([0-9a-f]{32})$")
_LIST_FILTERS = ("base", "rank", "target", "dora", "name")


def is_page(segments: list[str], method: str) -> bool:
    """Whether a request path (split on ``/``) is a page rather than a Hub API route."""
    if segments == [""] or segments == ["ui"]:
        return method in ("GET", "HEAD")
    if not segments or segments[0] != "ui":
        return False
    if len(segments) >= 5 and segments[2] == "resolve":
        return False  # the repo ui/<name>'s files
    if segments[1:] in (["login"], ["logout"]):
        return method in ("GET", "HEAD", "POST")
    return method in ("GET", "HEAD")


class WebPages:
    """The pages over one open :class:`~lorahub.hub.Hub`, with the API's access rule."""

    def __init__(self, hub: Hub, mapping: Mapping, auth: Auth) -> None:
        self.hub = hub
        self.mapping = mapping
        self.auth = auth
        self.env = Environment(
            loader=PackageLoader("lorahub.serve.web", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["size"] = render.size
        self.env.globals["prefix"] = PREFIX
        self.env.globals["quote"] = quote
        self._totals: tuple[float, queries.Totals] | None = None
        self.norms = NormCache(hub.home.joinpath(*NORMS_FOLDER))

    def totals(self) -> queries.Totals:
        """The store's totals, recounted every :data:`TOTALS_TTL_S` at most: summing every
        adapter's size reads the whole table (a third of a second at 100,000 adapters)."""
        now = time.monotonic()
        if self._totals is None or self._totals[0] < now:
            self._totals = (now + TOTALS_TTL_S, self.read(queries.totals))
        return self._totals[1]

    # ------------------------------------------------------------------ dispatch

    async def handle(self, request: Request, s: list[str]) -> Response:
        """The page at ``s`` (:func:`is_page` said it is one)."""
        if s == [""]:
            return RedirectResponse(f"{PREFIX}/", status_code=307)
        if s[1:] == ["login"] and request.method == "POST":
            form = parse_qs((await read_body(request, LOGIN_CAP)).decode("utf-8", "replace"))
            return await run_in_threadpool(self.login, request, form)
        if s[1:] == ["logout"] and request.method == "POST":
            response = RedirectResponse(f"{PREFIX}/login", status_code=303)
            response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
            return response
        return await run_in_threadpool(self.get, request, s[1:])

    def get(self, request: Request, s: list[str]) -> Response:
        if s[:1] == ["static"] and len(s) == 2:
            return self.static(s[1])
        if s == ["login"]:
            return self.page("login.html", caller=ANONYMOUS, next=_next(request), error=None)
        caller = self.caller(request)
        if caller is None:
            target = f"{PREFIX}/login?" + urlencode({"next": _path(request)})
            return RedirectResponse(target, status_code=303)
        try:
            if s in ([], [""]):
                return self.home(caller)
            if s == ["adapters"]:
                return self.adapters(request, caller)
            if s[0] == "adapters" and len(s) >= 2:
                return self.adapter(request, caller, "/".join(s[1:]))
            if s[0] == "bases" and len(s) == 2:
                return self.base(caller, s[1])
        except LorahubError as exc:  # a bad filter or reference: the person sees why
            return self.error(caller, 400, str(exc))
        return self.error(caller, 404, "No such page.")

    def caller(self, request: Request) -> Caller | None:
        """The caller, or None when it must log in first. A header token is checked as the
        API checks it (a bad one is a 401); a stale cookie just asks for a login."""
        if request.headers.get("authorization") is not None:
            return self.auth.caller(request)
        secret = request.cookies.get(COOKIE)
        if secret:
            info = self.hub.check_token(secret)
            if info is not None:
                return Caller.of(info)
        return ANONYMOUS if self.auth.allow_anonymous else None

    def login(self, request: Request, form: dict[str, list[str]]) -> Response:
        """Check the token typed in; keep it in a cookie scripts cannot read and other sites
        cannot send."""
        secret = (form.get("token") or [""])[0].strip()
        target = _safe_next((form.get("next") or [""])[0])
        if not secret or self.hub.check_token(secret) is None:
            return self.page(
                "login.html",
                status=401,
                caller=ANONYMOUS,
                next=target,
                error="That token is not valid here (see `lorahub token ls`).",
            )
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE,
            secret,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    # ------------------------------------------------------------------ helpers

    def page(self, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = self.env.get_template(template).render(**context)
        response = HTMLResponse(html, status_code=status)
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; style-src 'self'; img-src 'self' data: https:; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["Cache-Control"] = "no-store"
        return response

    def error(self, caller: Caller, status: int, message: str) -> HTMLResponse:
        return self.page("error.html", status=status, caller=caller, message=message)

    def static(self, name: str) -> Response:
        kind = _STATIC.get(name)
        if kind is None:
            raise HubError(404, "not found")
        body = resources.files("lorahub.serve.web").joinpath("static").joinpath(name).read_bytes()
        return Response(body, media_type=kind, headers={"Cache-Control": "max-age=300"})

    def access(self, caller: Caller) -> tuple[str, list[Any]]:
        """The SQL condition that keeps what ``caller`` may read."""
        if self.auth.allow_anonymous or not caller.authenticated:
            return "", []
        return queries.readable(caller.namespaces, self.mapping.namespace)

    def may_see(self, caller: Caller, info: AdapterInfo) -> bool:
        names = [r.rpartition(":")[0] for r in info.refs]
        spaces = {self.mapping.repo_id(n).split("/")[0] for n in names} or {self.mapping.namespace}
        return any(self.auth.can_read(caller, ns) for ns in spaces)

    def read(self, fn: Any, *args: Any) -> Any:
        """``fn(run, *args)`` in one read snapshot of the catalog (the server's pooled
        engine)."""
        with plain_reads(self.hub.engine) as run:
            return fn(run, *args)

    # ------------------------------------------------------------------ pages

    def home(self, caller: Caller) -> Response:
        access = self.access(caller)
        recent, _ = self.read(queries.page, [], access, "new", 10, 0)
        return self.page(
            "home.html",
            caller=caller,
            totals=self.totals(),
            bases=self.hub.bases(),
            recent=[self.row(i) for i in recent],
        )

    def adapters(self, request: Request, caller: Caller) -> Response:
        params = request.query_params
        chosen = {k: params.get(k, "").strip() for k in _LIST_FILTERS}
        filters = reads.parse_filters({k: v for k, v in chosen.items() if v})
        access = self.access(caller)
        q = params.get("q", "").strip()
        if q:
            access = _and(access, _search(q))
        sort = params.get("sort", "new")
        sort = sort if sort in queries.SORTS else "new"
        try:
            number = max(1, int(params.get("page", "1")))
        except ValueError:
            number = 1
        infos, total = self.read(
            queries.page, filters, access, sort, PAGE_SIZE, (number - 1) * PAGE_SIZE
        )
        many = total > queries.COUNT_CAP  # not counted further: page on while pages are full
        pages = max(1, math.ceil(total / PAGE_SIZE))
        more = len(infos) == PAGE_SIZE if many else number < pages
        kept = {k: v for k, v in {**chosen, "q": q, "sort": sort}.items() if v}

        def link(n: int) -> str:
            return f"{PREFIX}/adapters?" + urlencode({**kept, "page": n})

        return self.page(
            "adapters.html",
            caller=caller,
            rows=[self.row(i) for i in infos],
            total=min(total, queries.COUNT_CAP),
            many=many,
            chosen=chosen,
            q=q,
            sort=sort,
            sorts=list(queries.SORTS),
            bases=self.hub.bases(),
            number=number,
            pages=pages,
            prev_link=link(number - 1) if number > 1 else None,
            next_link=link(number + 1) if more else None,
        )

    def row(self, info: AdapterInfo) -> dict[str, Any]:
        return {
            "info": info,
            "title": info.refs[0] if info.refs else info.short,
            "href": self.href(info),
            "ranks": ",".join(str(r) for r in sorted(info.ranks)),
        }

    @staticmethod
    def href(info: AdapterInfo) -> str:
        return f"{PREFIX}/adapters/{info.digest}"

    def find(self, caller: Caller, ref: str) -> AdapterInfo | Response:
        hexed = _HEX.match(ref)
        info: AdapterInfo | None
        if hexed:
            info = self.read(queries.by_digest, "xxh128:" + hexed.group(1))
        else:
            name, _, tag = ref.partition(":")
            names = self.mapping.names(name) if name.count("/") == 1 else [name]
            info = None
            for candidate in names:
                try:
                    info = self.hub.get(f"{candidate}:{tag or 'latest'}")
                    break
                except AmbiguousReference:  # one variant per base: let the list show them
                    target = f"{PREFIX}/adapters?" + urlencode({"name": candidate})
                    return RedirectResponse(target, status_code=303)
                except AdapterNotFound:
                    named = self.read(queries.page, [("name", candidate)], ("", []), "new", 1, 0)
                    if not tag and named[1]:  # a name without :latest: its tags are listed
                        target = f"{PREFIX}/adapters?" + urlencode({"name": candidate})
                        return RedirectResponse(target, status_code=303)
        if info is None or not self.may_see(caller, info):
            return self.error(caller, 404, f"No adapter {ref!r} here.")
        return info

    def adapter(self, request: Request, caller: Caller, ref: str) -> Response:
        found = self.find(caller, ref)
        if isinstance(found, Response):
            return found
        info = found
        bases = self.hub.bases()
        modules = _modules(info)
        return self.page(
            "adapter.html",
            caller=caller,
            info=info,
            title=info.refs[0] if info.refs else info.short,
            modules=modules,
            chart=self.norm_chart(info, {m["name"]: m["scale"] for m in modules}),
            variants=self.variants(caller, info),
            compat=[self.compat(info, b) for b in bases],
            card=render.card_html(original_card(info)),
            usage=self.usage(request, info, bases),
            lineage=self.lineage(caller, info),
            children=[self.row(c) for c in self.read(queries.children, info.digest)],
            merged=self.read(queries.merged_of, info.digest),
        )

    def module_norms(self, info: AdapterInfo) -> tuple[ModuleNorm, ...] | None:
        """Each module's ``‖scale · B · A‖`` (``norms.py``), with the module table's own
        scales so the two agree; None when the weights blob is missing or damaged."""
        return self.norms.get(info.weights_digest, _scales(info), self._blob(info))

    def _blob(self, info: AdapterInfo) -> Callable[[], Path]:
        """What gives the adapter's checked weights file (asked only to compute norms)."""
        return lambda: self.hub.blobs.checked_path(Digest.parse(info.weights_digest))

    def norm_chart(
        self, info: AdapterInfo, scales: dict[str, float] | None = None
    ) -> dict[str, Any]:
        """The per-module chart (``scales``: the module table's, when the caller has them
        already); ``unreadable`` when the weights cannot be read, which the page says
        instead of failing. Weights over :data:`INLINE_NORMS_BYTES` are read in the
        background (``pending``: the page says to reload), so no page waits on them."""
        fetch = self.norms.get if info.size <= INLINE_NORMS_BYTES else self.norms.ready
        norms: tuple[ModuleNorm, ...] | bool | None = fetch(
            info.weights_digest, _scales(info) if scales is None else scales, self._blob(info)
        )
        return {
            "svg": chart.norms_svg(norms) if isinstance(norms, tuple) and norms else None,
            "unreadable": norms is None,
            "pending": norms is False,
        }

    def variants(self, caller: Caller, info: AdapterInfo) -> list[dict[str, Any]]:
        """Each name the adapter has, with every adapter under that name (its tags, one
        variant per base)."""
        out = []
        access = self.access(caller)
        for name in dict.fromkeys(r.rpartition(":")[0] for r in info.refs):
            infos, _ = self.read(queries.page, [("name", name)], access, "new", 50, 0)
            rows = []
            for other in infos:
                tags = [r.rpartition(":")[2] for r in other.refs if r.rpartition(":")[0] == name]
                rows.append({**self.row(other), "tags": tags, "this": other.digest == info.digest})
            out.append({"name": name, "repo": self.mapping.repo_id(name), "rows": rows})
        return out

    def compat(self, info: AdapterInfo, base: BaseInfo) -> dict[str, Any]:
        """How the adapter fits one registered base, with the reasons (``lorahub check``)."""
        try:
            report = self.hub.check(f"@{info.digest}", base=base.content_hash or base.signature)
        except LorahubError as exc:
            return {"base": base, "status": "unknown", "summary": str(exc), "problems": []}
        return {
            "base": base,
            "status": report.status,
            "summary": report.summary.splitlines()[0],
            "note": report.prefix_note,
            "problems": [p.text for p in report.problems[:20]],
            "more": max(0, len(report.problems) - 20),
        }

    def usage(self, request: Request, info: AdapterInfo, bases: list[BaseInfo]) -> dict[str, Any]:
        """The ids a person copies: repo id, revision, the server URL, the base's repo."""
        url = str(request.base_url).rstrip("/")
        if info.refs:
            name, _, tag = info.refs[0].rpartition(":")
            repo = self.mapping.repo_id(name)
            revision = "main" if tag == "latest" else tag
        else:
            repo, revision = None, None
        base_repo = self.hub.base_repo_id(info)
        files = ["adapter_model.safetensors", "adapter_config.json", "README.md"]
        links = (
            [(f, f"/{repo}/resolve/{quote(commit_id(info.digest))}/{f}") for f in files]
            if repo
            else []
        )
        return {
            "url": url,
            "repo": repo,
            "revision": revision,
            "commit": commit_id(info.digest),
            "base_repo": base_repo or info.base.name or "BASE_MODEL",
            "max_rank": info.max_rank,
            "links": links,
        }

    def lineage(self, caller: Caller, info: AdapterInfo) -> dict[str, Any] | None:
        """The parents of a composed adapter (method, weights) and their graph."""
        prov = info.provenance
        if prov.get("kind") != "compose":
            return None
        parents = []
        weights = prov.get("weights") or []
        for k, digest in enumerate(prov.get("parents") or []):
            parent = self.read(queries.by_digest, digest)
            visible = parent is not None and self.may_see(caller, parent)
            weight = weights[k] if k < len(weights) else None
            parents.append(
                {
                    "digest": digest,
                    "label": (parent.refs[0] if parent.refs else parent.short)
                    if parent is not None and visible
                    else digest[:19],
                    "href": self.href(parent) if parent is not None and visible else None,
                    "weight": weight,
                    "present": parent is not None,
                }
            )
        nodes = [
            render.Node(p["label"], p["href"], "" if p["weight"] is None else f"w={p['weight']:g}")
            for p in parents
        ]
        title = info.refs[0] if info.refs else info.short
        method = str(prov.get("method") or "?")
        params = [f"{k}={prov[k]}" for k in ("rank", "density", "seed") if prov.get(k) is not None]
        error = _error_text(info.origin.get("error"))
        caption = " ".join([method, *params]) + (f" · {error}" if error else "")
        return {
            "method": method,
            "params": params,
            "error": error,
            "parents": parents,
            "svg": render.lineage_svg(render.Node(title, None), nodes, caption),
        }

    def base(self, caller: Caller, ident: str) -> Response:
        base = next((b for b in self.hub.bases() if str(b.id) == ident), None)
        if base is None:
            return self.error(caller, 404, f"No base model {ident!r} here.")
        fitting = self.read(queries.fitting, base.signature, self.access(caller), 100)
        rows = []
        for info in fitting:
            exact = base.content_hash is not None and info.base.content_hash == base.content_hash
            rows.append({**self.row(info), "fit": "exact" if exact else "same shapes"})
        return self.page("base.html", caller=caller, base=base, rows=rows)


def _scales(info: AdapterInfo) -> dict[str, float]:
    """Each module's scale, as the module table gives it."""
    return {m["name"]: m["scale"] for m in _modules(info)}


def _modules(info: AdapterInfo) -> list[dict[str, Any]]:
    """The per-module table: shapes, rank, scale, parameters and (approximate) bytes, the
    stored weights' size shared by parameter count."""
    out = []
    for name, m in sorted(info.modules.items()):
        r, alpha = int(m.get("r", info.rank)), float(m.get("alpha", info.alpha))
        fan_in, fan_out = int(m.get("in", 0)), int(m.get("out", 0))
        scale = alpha / math.sqrt(r) if info.use_rslora else alpha / r if r else 0.0
        out.append(
            {
                "name": name,
                "kind": m.get("kind", ""),
                "shape": "×".join(str(d) for d in m.get("shape", [fan_out, fan_in])),
                "a": f"{r}×{fan_in}",
                "b": f"{fan_out}×{r}",
                "rank": r,
                "alpha": alpha,
                "scale": scale,
                "params": r * (fan_in + fan_out),
            }
        )
    total = sum(row["params"] for row in out) or 1
    for row in out:
        row["bytes"] = round(info.size * row["params"] / total)
    return out


def _error_text(error: Any) -> str | None:
    """How far a composition's stored deltas are from their target, as recorded when it was
    made (None for one made before lorahub recorded it, or a malformed record)."""
    if not isinstance(error, dict):
        return None
    if error.get("exact") is True:
        return "exact"
    worst, mean = error.get("max"), error.get("mean")
    if not isinstance(worst, (int, float)) or not isinstance(mean, (int, float)):
        return None
    return f"relative error max {worst:.3g}, mean {mean:.3g}"


def _search(q: str) -> tuple[str, list[Any]]:
    """Free text: a part of a name, or the start of a digest."""
    hexed = q.lower().removeprefix("xxh128:")
    like = "%" + queries._like_escape(q) + "%"
    sql = "a.id IN (SELECT r.adapter_id FROM refs r WHERE r.name LIKE ? ESCAPE '\\')"
    if re.fullmatch(r"[0-9a-f]{4,32}", hexed):
        return f"({sql} OR a.digest LIKE ?)", [like, f"xxh128:{hexed}%"]
    return sql, [like]


def _and(a: tuple[str, list[Any]], b: tuple[str, list[Any]]) -> tuple[str, list[Any]]:
    if not a[0]:
        return b
    return f"{a[0]} AND {b[0]}", [*a[1], *b[1]]


def _path(request: Request) -> str:
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


def _next(request: Request) -> str:
    return _safe_next(request.query_params.get("next", ""))


def _safe_next(target: str) -> str:
    """Only a page of this server: never another site (an open redirect)."""
    if target.startswith(f"{PREFIX}/") and not target.startswith("//") and "\\" not in target:
        return target
    return f"{PREFIX}/"
