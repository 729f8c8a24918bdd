"""Frozen value objects the public API returns."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .manifest import BaseRef

if TYPE_CHECKING:
    from .compose import ComposeReport


@dataclass(frozen=True)
class AdapterInfo:
    """One stored adapter as users see it: identity, LoRA settings, base, origin and names."""

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
    origin: dict[str, Any]
    created_at: datetime
    manifest: dict[str, Any] = field(repr=False, compare=False)
    match: str | None = field(default=None, compare=False)  # set by resolve: exact|compatible

    @property
    def short(self) -> str:
        return self.digest.split(":", 1)[-1][:12]

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.manifest.get("provenance", {}))

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.manifest.get("config", {}))

    @property
    def modules(self) -> dict[str, dict[str, Any]]:
        return dict(self.manifest.get("modules", {}))

    def to_dict(self, manifest: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["base"] = self.base.to_dict()
        d["created_at"] = self.created_at.isoformat() + "Z"
        d["targets"] = list(self.targets)
        d["refs"] = list(self.refs)
        d["provenance"] = self.provenance
        if not manifest:
            d.pop("manifest")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


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


@dataclass(frozen=True)
class VerifyReport:
    checked_blobs: int
    checked_adapters: int
    problems: tuple[VerifyProblem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class GcReport:
    """What ``gc`` freed (or, with ``dry_run``, would free)."""

    blobs: tuple[str, ...]
    temp_files: tuple[str, ...]
    bytes_freed: int
    dry_run: bool


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
        d["created_at"] = self.created_at.isoformat() + "Z"
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
        d["created_at"] = self.created_at.isoformat() + "Z"
        d["last_used_at"] = self.last_used_at.isoformat() + "Z"
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
