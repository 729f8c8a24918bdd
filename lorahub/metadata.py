"""A stored adapter's safetensors header metadata, and where it disagrees with the config.

Trainers write the network's rank and alpha into the file's header too (kohya's
``ss_network_dim`` and ``ss_network_alpha``, diffusers' ``lora_adapter_metadata``). lorahub
scales by what the weights and config say (kohya's per-module ``.alpha`` tensors, PEFT's
``r`` and ``lora_alpha``); an engine that reads the header instead, and ignores the other,
runs the adapter at another scale. :func:`disagreements` names each such key; the metadata
itself is kept at import outside the adapter's identity (``origin["metadata"]``).

>>> [d.key for d in disagreements({"ss_network_alpha": "16"}, {"r": 4, "lora_alpha": 8})]
['ss_network_alpha']
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .base import read_header
from .errors import BaseModelError, CorruptData
from .info import AdapterInfo

# Header keys that state the whole network's rank or alpha, by the trainers that write them.
RANK_KEYS = ("ss_network_dim", "network_dim")  # kohya sd-scripts; LyCORIS-style tools
ALPHA_KEYS = ("ss_network_alpha", "network_alpha")
DIFFUSERS_KEY = "lora_adapter_metadata"  # diffusers >= 0.34: the LoraConfig as JSON


@dataclass(frozen=True)
class Disagreement:
    """A header value that is not what the config (the weights' own scale) says.

    ``key`` is the header key (``ss_network_alpha``, or ``lora_adapter_metadata:r``),
    ``field`` the config field it stands for (``r`` or ``lora_alpha``); ``header_scale`` is
    the scale (alpha / r, or alpha / sqrt(r) with rsLoRA) an engine that takes the header's
    value gets, ``scale`` the one the config gives.
    """

    key: str
    field: Literal["r", "lora_alpha"]
    header: float
    config: float
    header_scale: float
    scale: float

    @property
    def message(self) -> str:
        return (
            f"header {self.key}={_num(self.header)} but the config's {self.field} is "
            f"{_num(self.config)}: an engine that reads the header scales this adapter by "
            f"{self.header_scale:.4g} instead of {self.scale:.4g}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "field": self.field,
            "header": self.header,
            "config": self.config,
            "header_scale": self.header_scale,
            "scale": self.scale,
            "message": self.message,
        }


@dataclass(frozen=True)
class AdapterMetadata:
    """An adapter's header metadata: ``imported`` from the file it was added from (kept in
    its origin), ``stored`` in its blob's own header; and where either disagrees with the
    config's rank or alpha."""

    digest: str
    imported: dict[str, str]
    stored: dict[str, str]
    disagreements: tuple[Disagreement, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "imported": dict(self.imported),
            "stored": dict(self.stored),
            "disagreements": [d.to_dict() for d in self.disagreements],
        }


def disagreements(metadata: Mapping[str, str], config: Mapping[str, Any]) -> list[Disagreement]:
    """The header keys in ``metadata`` whose rank or alpha differs from ``config``'s ``r``
    and ``lora_alpha`` (alpha defaults to r, as in PEFT). Values that are not numbers
    (kohya writes ``"None"`` and ``"Dynamic"``) say nothing and are skipped.

    Args:
        metadata: safetensors ``__metadata__`` strings.
        config: the adapter's LoRA config (``AdapterInfo.config``).

    Returns:
        One :class:`Disagreement` per key that differs, in the order checked.
    """
    r = _number(config.get("r"))
    if r is None or r <= 0:
        return []
    alpha = _number(config.get("lora_alpha"))
    alpha = r if alpha is None else alpha
    rslora = bool(config.get("use_rslora"))

    def scale(a: float, rank: float) -> float:
        return a / (math.sqrt(rank) if rslora else rank)

    out = []
    for key, field, value in _stated(metadata):
        if field == "r" and value > 0 and value != r:
            out.append(Disagreement(key, "r", value, r, scale(alpha, value), scale(alpha, r)))
        elif field == "lora_alpha" and value != alpha:
            out.append(
                Disagreement(key, "lora_alpha", value, alpha, scale(value, r), scale(alpha, r))
            )
    return out


def of_adapter(info: AdapterInfo, blob: Path) -> AdapterMetadata:
    """``info``'s metadata: what its import kept and its blob's (at ``blob``) header.

    Raises:
        CorruptData: the blob's header cannot be read.
    """
    imported = {str(k): str(v) for k, v in (info.origin.get("metadata") or {}).items()}
    try:
        _, stored, _ = read_header(blob)
    except BaseModelError as e:
        raise CorruptData(
            f"adapter {info.short}'s weights blob has a bad header ({e}); run `lorahub verify`",
            path=blob,
        ) from e
    config = info.config
    found = disagreements(imported, config)
    seen = {d.key for d in found}
    found += [d for d in disagreements(stored, config) if d.key not in seen]
    return AdapterMetadata(info.digest, imported, stored, tuple(found))


def _stated(metadata: Mapping[str, str]) -> list[tuple[str, str, float]]:
    """``(key, "r" | "lora_alpha", value)`` for each numeric rank or alpha the header states."""
    out: list[tuple[str, str, float]] = []
    for keys, field in ((RANK_KEYS, "r"), (ALPHA_KEYS, "lora_alpha")):
        for key in keys:
            value = _number(metadata.get(key))
            if value is not None:
                out.append((key, field, value))
    out += _diffusers(metadata.get(DIFFUSERS_KEY))
    return out


def _diffusers(raw: str | None) -> list[tuple[str, str, float]]:
    """``r`` and ``lora_alpha`` of diffusers' header config: bare (a model's save) or under
    one component prefix (``unet.r``); a pipeline's several components are not compared,
    since the adapter holds one of them."""
    try:
        doc = json.loads(raw) if raw else None
    except (ValueError, RecursionError):
        return []
    if not isinstance(doc, dict):
        return []
    prefixes = {k.rsplit(".", 1)[0] for k in doc if isinstance(k, str) and "." in k}
    if len(prefixes) > 1:
        return []
    out = []
    for key, value in doc.items():
        leaf = key.rsplit(".", 1)[-1] if isinstance(key, str) else ""
        number = _number(value)
        if leaf in ("r", "lora_alpha") and number is not None:
            out.append((f"{DIFFUSERS_KEY}:{key}", leaf, number))
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _num(value: float) -> str:
    return f"{value:g}"
