"""The manifest: the canonical JSON record whose digest *is* an adapter's identity.

It holds what makes two adapters the same or different (weights blob, LoRA config, module
shapes, the base made for, provenance) and nothing incidental (the file name or format it
was imported from, its header metadata, the time, the path, the PEFT version that saved it),
so the same adapter always gets the same digest.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .adapter import LoraAdapter
from .digest import Digest, canonical_json, hash_bytes
from .errors import InvalidAdapter

SCHEMA = 2  # 2: incidental config keys out, patterns per module, header metadata out


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
        values = [d.get(k) for k in ("name", "revision", "signature", "content_hash")]
        if any(v is not None and not isinstance(v, str) for v in values):
            raise InvalidAdapter("the recorded base model's fields must be strings")
        return cls(*values)


def claimed_base(adapter: LoraAdapter) -> BaseRef:
    """The base an adapter's own config names (``base_model_name_or_path``, ``revision``):
    unverified, for adapters stored or pulled without a base to check them against."""
    return BaseRef(adapter.base_model_name, adapter.config.get("revision") or None)


def module_table(adapter: LoraAdapter) -> dict[str, dict[str, Any]]:
    """Per module: kind, features, rank, alpha, the base shape it needs, DoRA and bias."""
    table: dict[str, dict[str, Any]] = {}
    for name, m in adapter.modules.items():
        row: dict[str, Any] = {
            "kind": m.kind,
            "in": m.in_features,
            "out": m.out_features,
            "r": m.rank,
            "alpha": m.alpha,
            "shape": list(adapter.base_shape(name)),
        }
        if m.magnitude is not None:
            row["magnitude"] = int(m.magnitude.shape[0])
        if m.bias is not None:
            row["bias"] = True
        table[name] = row
    return table


@dataclass(frozen=True)
class ShapeOnly:
    """Stands in for a tensor where only its shape is read: a skeleton needs no torch."""

    shape: tuple[int, ...]

    def numel(self) -> int:
        return math.prod(self.shape)


def skeleton(manifest: Mapping[str, Any]) -> LoraAdapter:
    """An adapter with the manifest's shapes and no weights (``ShapeOnly`` where tensors
    would be): enough for :func:`lorahub.compat.check` on thousands of adapters without
    reading one weight or importing torch, and for nothing that computes."""
    from .adapter import CONV2D, LoraModule

    def shape(*dims: int) -> Any:  # typed as the tensor it stands in for
        return ShapeOnly(tuple(int(d) for d in dims))

    modules = {}
    for name, row in manifest["modules"].items():
        r, fin, fout, kind = row["r"], row["in"], row["out"], row["kind"]
        extra = tuple(row["shape"][2:]) if kind == CONV2D else ()
        a = shape(r, fin, *extra)
        b = shape(fout, r, 1, 1) if kind == CONV2D else shape(fout, r)
        magnitude = shape(row["magnitude"]) if "magnitude" in row else None
        bias = shape(fout) if row.get("bias") else None
        modules[name] = LoraModule(name, kind, a, b, float(row["alpha"]), bias, magnitude)
    full = {k: shape(*dims) for k, dims in manifest.get("full", {}).items()}
    return LoraAdapter(dict(manifest["config"]), modules, full)


# Written by PEFT on every save (its version, its mode, a hint for AutoModel), so two saves of
# one adapter differ in them; they say nothing about what the adapter is.
INCIDENTAL_CONFIG = frozenset({"peft_version", "inference_mode", "runtime_config"})
# Lists PEFT writes from Python sets: their order changes from one save to the next.
UNORDERED_CONFIG = frozenset(
    {"target_modules", "modules_to_save", "exclude_modules", "layers_to_transform"}
)


def identity_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as identity sees it: incidental keys dropped, set-like lists sorted,
    whole floats written as integers (``lora_alpha`` 16 and 16.0 are one adapter)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key in INCIDENTAL_CONFIG:
            continue
        if key in UNORDERED_CONFIG and isinstance(value, list) and _one_plain_type(value):
            value = sorted(set(value))
        out[key] = _plain_numbers(value)
    return out


def _one_plain_type(values: list[Any]) -> bool:
    return all(type(v) is str for v in values) or all(type(v) is int for v in values)


def _plain_numbers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _plain_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_numbers(v) for v in value]
    return value


def explicit_patterns(adapter: LoraAdapter) -> dict[str, Any]:
    """The config with ``rank_pattern`` / ``alpha_pattern`` spelled out per module.

    PEFT applies the first pattern that matches, in dict order; canonical JSON sorts keys,
    so stored as written they could give another module another alpha after a round trip.
    Each module's own escaped name, for the modules that differ from ``r`` / ``lora_alpha``,
    means the same whatever the order.
    """
    config = dict(adapter.config)
    mods = sorted(adapter.modules.items())
    ranks = {re.escape(n): m.rank for n, m in mods if m.rank != adapter.rank}
    alphas = {re.escape(n): m.alpha for n, m in mods if m.alpha != adapter.alpha}
    for key, value in (("rank_pattern", ranks), ("alpha_pattern", alphas)):
        if value or key in config:
            config[key] = value
    return config


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
        "config": identity_config(explicit_patterns(adapter)),
        "modules": module_table(adapter),
        "full": {k: list(t.shape) for k, t in sorted(adapter.full.items())},
        "base": base.to_dict(),
        "provenance": dict(provenance or {"kind": "import"}),
    }


def encode(manifest: Mapping[str, Any]) -> bytes:
    return canonical_json(manifest)


def digest_of(manifest: Mapping[str, Any]) -> Digest:
    return hash_bytes(encode(manifest))


LORAHUB_JSON_VERSION = 1


def lorahub_json_text(
    digest: str, manifest: Mapping[str, Any], files: list[str] | tuple[str, ...] | None = None
) -> str:
    """The ``lorahub.json`` an exported or pushed adapter carries: its digest and manifest,
    so whoever imports it can check they got exactly this adapter. ``files`` (an export's)
    lists every file written beside it, so a later ``export --force`` knows the folder holds
    nothing else; readers ignore it and it is no part of the digest."""
    import json

    doc: dict[str, Any] = {
        "lorahub_version": LORAHUB_JSON_VERSION,
        "digest": digest,
        "manifest": manifest,
    }
    if files is not None:
        doc["files"] = sorted(files)
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"
