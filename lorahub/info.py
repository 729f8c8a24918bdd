"""Frozen value objects the public API returns."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .digest import PREFIX
from .digest import short as short_form
from .manifest import BaseRef

if TYPE_CHECKING:
    from .compose import ComposeReport


def iso_utc(moment: datetime) -> str:
    """ISO 8601 with its UTC offset (``2026-01-02T03:04:05.123456+00:00``); a naive value
    is taken as UTC, as the catalog always stored them."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat()


@dataclass(frozen=True)
class AdapterInfo:
    """One stored adapter as users see it: identity, LoRA settings, base, origin and names.

    ``manifest_text`` and ``origin_text`` are the JSON as stored; ``manifest`` and ``origin``
    parse it on first use only, so listing thousands of adapters (some with huge configs)
    parses none of it.
    """

    digest: str
    refs: tuple[str, ...]
    rank: int
    alpha: float
    use_rslora: bool
    use_dora: bool
    targets: tuple[str, ...]
    module_count: int
    size: int
    weights_digest: str
    base: BaseRef
    origin_kind: str
    origin_text: str = field(repr=False)
    created_at: datetime
    manifest_text: str = field(repr=False, compare=False)
    match: str | None = field(default=None, compare=False)  # set by resolve: exact|compatible
    # ``(rank, modules)`` pairs, by rank, when the modules' ranks differ (a rank_pattern);
    # empty when every module has ``rank``.
    rank_counts: tuple[tuple[int, int], ...] = ()

    @cached_property
    def manifest(self) -> dict[str, Any]:
        """The parsed manifest (parsed once per info; treat it as read-only)."""
        return json.loads(self.manifest_text)

    @cached_property
    def origin(self) -> dict[str, Any]:
        """Where it came from: path and format, repo and revision, or composed parents."""
        return json.loads(self.origin_text)

    @property
    def short(self) -> str:
        return short_form(self.digest)

    @property
    def ranks(self) -> dict[int, int]:
        """How many modules have each rank, by rank: ``{16: 4, 8: 20}`` for an adapter
        whose ``rank_pattern`` gives 4 modules rank 16; ``{rank: module_count}`` when all
        share the config's ``r``. Engines size LoRA slots by the largest."""
        return dict(self.rank_counts) if self.rank_counts else {self.rank: self.module_count}

    @property
    def max_rank(self) -> int:
        return max(self.ranks)

    @property
    def provenance(self) -> dict[str, Any]:
        if "manifest" in self.__dict__:  # already parsed
            return dict(self.manifest.get("provenance", {}))
        return dict(provenance_of(self.manifest_text))

    @property
    def config(self) -> dict[str, Any]:
        if "manifest" in self.__dict__:  # already parsed
            return dict(self.manifest.get("config", {}))
        return dict(self._config)

    @cached_property
    def _config(self) -> dict[str, Any]:
        """The config alone (:func:`config_of`): a model info of ``lorahub serve`` needs it,
        never the modules, tens of KB of JSON on a large model."""
        return config_of(self.manifest_text)

    @property
    def modules(self) -> dict[str, dict[str, Any]]:
        return dict(self.manifest.get("modules", {}))

    def to_dict(self, manifest: bool = False, card: bool = False) -> dict[str, Any]:
        """Plain data for JSON: every field but the manifest (unless ``manifest``), with the
        provenance. Built field by field: ``asdict`` would deep-copy the manifest. The model
        card kept from the source (``origin["card"]``, kilobytes of text) is given only with
        ``card``; otherwise its size, so a listing of thousands stays small."""
        origin = json.loads(self.origin_text)  # a copy, without caching it here
        card_text = origin.pop("card", None)
        d: dict[str, Any] = {
            "digest": self.digest,
            "refs": list(self.refs),
            "rank": self.rank,
            "ranks": {str(r): n for r, n in self.ranks.items()},  # JSON keys are strings
            "alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "targets": list(self.targets),
            "module_count": self.module_count,
            "size": self.size,
            "weights_digest": self.weights_digest,
            "base": self.base.to_dict(),
            "origin_kind": self.origin_kind,
            "origin": origin,
            "card_bytes": len(card_text.encode()) if isinstance(card_text, str) else None,
            "created_at": iso_utc(self.created_at),
            "match": self.match,
            "provenance": self.provenance,
        }
        if manifest:
            d["manifest"] = self.manifest
        if card:
            d["card"] = card_text
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# The end of every manifest ``manifest.build`` writes, in canonical JSON (sorted keys, no
# whitespace): nothing after ``provenance`` but these two top-level keys.
_MANIFEST_TAIL = re.compile(
    r',"schema":\d+,"weights":\{"digest":"' + PREFIX + r'[0-9a-f]{32}","size":\d+\}\}'
)
_PROVENANCE_KEY = ',"provenance":'
_DECODER = json.JSONDecoder()


def provenance_of(manifest_text: str) -> dict[str, Any]:
    """A stored manifest's ``provenance``, parsing only that part of it.

    In canonical JSON the top-level provenance is the value that ends right where the tail
    ``,"schema":N,"weights":{...}}`` starts; the last ``,"provenance":`` key whose value ends
    there is it (a quote inside a string is always escaped, so the key cannot hide in one;
    a nested key's value ends before its container does). Anything else is parsed whole.
    """
    end = manifest_text.rfind(',"schema":')
    if end > 0 and _MANIFEST_TAIL.fullmatch(manifest_text, end):
        pos = end
        while (pos := manifest_text.rfind(_PROVENANCE_KEY, 0, pos)) >= 0:
            try:
                value, stop = _DECODER.raw_decode(manifest_text, pos + len(_PROVENANCE_KEY))
            except ValueError:
                break
            if stop == end:
                return value if isinstance(value, dict) else {}
    value = json.loads(manifest_text).get("provenance", {})
    return value if isinstance(value, dict) else {}


def config_of(manifest_text: str) -> dict[str, Any]:
    """A stored manifest's ``config``, parsing only the top-level values before it.

    Canonical JSON sorts the top-level keys, and ``config`` comes second (after ``base``):
    each key and value up to it is decoded in turn, the modules after it never are.
    Anything unexpected is parsed whole.
    """
    pos = 1 if manifest_text.startswith("{") else -1
    try:
        while 0 < pos < len(manifest_text):
            key, pos = _DECODER.raw_decode(manifest_text, pos)
            if not isinstance(key, str) or manifest_text[pos] != ":" or key > "config":
                break
            value, pos = _DECODER.raw_decode(manifest_text, pos + 1)
            if key == "config":
                return value if isinstance(value, dict) else {}
            if manifest_text[pos] != ",":
                break
            pos += 1
    except (ValueError, IndexError):
        pass
    value = json.loads(manifest_text).get("config", {})
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class AddResult:
    """The outcome of importing one source: ``added``, ``present`` or ``refused``."""

    source: str
    status: str
    adapter: AdapterInfo | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "status": self.status,
            "digest": self.adapter.digest if self.adapter else None,
            "refs": list(self.adapter.refs) if self.adapter else [],
            "reason": self.reason,
        }


@dataclass(frozen=True)
class VerifyProblem:
    what: str  # "blob" | "adapter"
    digest: str
    problem: str

    def to_dict(self) -> dict[str, Any]:
        return {"what": self.what, "digest": self.digest, "problem": self.problem}


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` checked and every problem it found."""

    checked_blobs: int
    checked_adapters: int
    problems: tuple[VerifyProblem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: ``ok``, the counts (``blobs``, ``adapters``) and problems."""
        return {
            "ok": self.ok,
            "blobs": self.checked_blobs,
            "adapters": self.checked_adapters,
            "problems": [p.to_dict() for p in self.problems],
        }


@dataclass(frozen=True)
class GcReport:
    """What ``gc`` freed (or, with ``dry_run``, would free)."""

    blobs: tuple[str, ...]
    temp_files: tuple[str, ...]
    bytes_freed: int
    dry_run: bool
    # Adapters the store's files hold that the catalog does not: `lorahub fsck` restores them.
    unrecorded: tuple[str, ...] = ()
    # Unused blobs kept because they are younger than ``grace`` seconds (an add may be
    # about to use one), and their bytes: `lorahub gc --grace 0` frees them.
    kept_blobs: tuple[str, ...] = ()
    kept_bytes: int = 0
    grace: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: every field, tuples as lists."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class BaseInfo:
    """A base model recorded in the catalog: where it was and its two fingerprints."""

    id: int
    name: str
    path: str | None
    repo_id: str | None
    revision: str | None
    signature: str
    content_hash: str | None
    tensor_count: int
    total_bytes: int
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["created_at"] = iso_utc(self.created_at)
        return d


@dataclass(frozen=True)
class MergedInfo:
    """A merged checkpoint kept under ``<home>/merged/``, keyed by what went into it."""

    key: str
    path: str
    size: int
    base_name: str
    base_content_hash: str
    adapters: tuple[tuple[str, float], ...]
    dtype: str
    created_at: datetime
    last_used_at: datetime

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["adapters"] = [{"digest": a, "weight": w} for a, w in self.adapters]
        d["created_at"] = iso_utc(self.created_at)
        d["last_used_at"] = iso_utc(self.last_used_at)
        return d


@dataclass(frozen=True)
class ComposeResult:
    """A composed adapter, now in the store, and how far it is from the exact blend."""

    adapter: AdapterInfo
    report: ComposeReport
    added: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter.to_dict(),
            "report": self.report.to_dict(),
            "added": self.added,
        }


@dataclass(frozen=True)
class ExportResult:
    """An adapter written out as a PEFT folder (``lorahub export``): the adapter, the
    folder, and the ``base_model_name_or_path`` its ``adapter_config.json`` now holds (a Hub
    repo id, or None when none is known: a local path is never written)."""

    adapter: AdapterInfo
    path: Path
    base_model_name_or_path: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter.to_dict(),
            "path": str(self.path),
            "base_model_name_or_path": self.base_model_name_or_path,
        }
