"""The manifest: the canonical JSON record whose digest *is* an adapter's identity.

It holds what makes two adapters the same or different (weights blob, LoRA config, module
shapes, the base made for, provenance) and nothing incidental (the file name or format it
was imported from, the time, the path), so the same adapter always gets the same digest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .adapter import LoraAdapter
from .digest import Digest, canonical_json, hash_bytes

SCHEMA = 1


@dataclass(frozen=True)
class BaseRef:
    """The base model an adapter was made for, as far as it is known."""

    name: str | None = None
    revision: str | None = None
    signature: str | None = None
    content_hash: str | None = None

    @property
    def verified(self) -> bool:
        return self.signature is not None

    @property
    def variant(self) -> str:
        """The key that tells variants of one ``name:tag`` apart (one per base)."""
        return self.content_hash or self.signature or (self.name or "")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> BaseRef:
        d = d or {}
        return cls(d.get("name"), d.get("revision"), d.get("signature"), d.get("content_hash"))


def module_table(adapter: LoraAdapter) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "kind": m.kind,
            "in": m.in_features,
            "out": m.out_features,
            "r": m.rank,
            "alpha": m.alpha,
            "shape": list(adapter.base_shape(name)),
        }
        for name, m in adapter.modules.items()
    }


def build(
    adapter: LoraAdapter,
    weights: Digest,
    weights_size: int,
    base: BaseRef,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of ``adapter`` stored as blob ``weights``."""
    return {
        "schema": SCHEMA,
        "weights": {"digest": str(weights), "size": weights_size},
        "config": dict(adapter.config),
        "modules": module_table(adapter),
        "full": sorted(adapter.full),
        "metadata": dict(adapter.metadata),
        "base": base.to_dict(),
        "provenance": dict(provenance or {"kind": "import"}),
    }


def encode(manifest: Mapping[str, Any]) -> bytes:
    return canonical_json(manifest)


def digest_of(manifest: Mapping[str, Any]) -> Digest:
    return hash_bytes(encode(manifest))
