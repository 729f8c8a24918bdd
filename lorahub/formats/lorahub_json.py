"""``lorahub.json``: the digest and manifest an exported or pushed adapter carries beside its
PEFT files, and the check that those files are exactly that adapter.

Whoever imports such a folder (``add`` of an export, ``pull`` of a pushed repo) keeps the
adapter's identity: the base it was recorded for and its provenance, hence its digest, once
the adapter rebuilt from the files hashes to the digest the file states. No network here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import manifest as mf
from ..digest import hash_bytes
from ..errors import CorruptData, InvalidAdapter
from ..manifest import LORAHUB_JSON_VERSION, BaseRef
from . import peft

if TYPE_CHECKING:
    from ..adapter import LoraAdapter

log = logging.getLogger(__name__)

FILENAME = "lorahub.json"
#: The config values an export wrote instead of the stored ones (``export --base-model-id``):
#: ``{"base_model_name_or_path": <value in adapter_config.json>}``. No part of the digest.
REWRITTEN = "rewritten"
_REWRITABLE = ("base_model_name_or_path",)
#: A manifest is a few hundred bytes per module; anything this large is not one of ours.
MAX_BYTES = 64 << 20


@dataclass(frozen=True)
class Recorded:
    """The identity a ``lorahub.json`` carries, checked against the files beside it."""

    digest: str
    base: BaseRef
    provenance: dict[str, Any]


def read(path: Path, label: str) -> tuple[str, dict[str, Any]]:
    """The digest and manifest of a ``lorahub.json``, checked to agree with each other.

    Raises:
        InvalidAdapter: not JSON, not a lorahub.json, or written by a newer lorahub.
        CorruptData: the manifest does not hash to the digest stated.
    """
    digest, manifest, _ = _read(path, label)
    return digest, manifest


def _read(path: Path, label: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise InvalidAdapter(
                f"{label}: lorahub.json is {size} bytes, more than any manifest ({MAX_BYTES}); "
                "it is not one lorahub wrote"
            )
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidAdapter(f"{label}: lorahub.json is not valid JSON ({exc})") from None
    except OSError as exc:
        raise InvalidAdapter(f"{label}: cannot read lorahub.json ({exc.strerror or exc})") from None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("digest"), str)
        or not isinstance(doc.get("manifest"), dict)
    ):
        raise InvalidAdapter(f"{label}: lorahub.json lacks a digest and a manifest object")
    version = doc.get("lorahub_version", 1)
    schema = doc["manifest"].get("schema", mf.SCHEMA)
    if (
        not isinstance(version, int)
        or version > LORAHUB_JSON_VERSION
        or not isinstance(schema, int)
        or schema > mf.SCHEMA
    ):
        raise InvalidAdapter(
            f"{label}: lorahub.json was written by a newer lorahub (format {version}, manifest "
            f"schema {schema}); upgrade lorahub to import it"
        )
    digest, manifest = doc["digest"], doc["manifest"]
    try:
        actual = str(mf.digest_of(manifest))
    except (UnicodeEncodeError, ValueError, RecursionError):  # lone surrogates, NaN, depth
        raise InvalidAdapter(
            f"{label}: lorahub.json holds text or numbers no manifest lorahub writes can hold; "
            "nothing was stored"
        ) from None
    if actual != digest:
        raise CorruptData(
            f"{label}: lorahub.json states digest {digest} but its manifest hashes to {actual}: "
            "the file was edited or corrupted; nothing was stored",
            expected=digest,
            actual=actual,
            path=path,
        )
    return digest, manifest, doc


def identity(adapter: LoraAdapter, path: Path, label: str, *, cause: str) -> Recorded | None:
    """The identity ``lorahub.json`` at ``path`` records for ``adapter`` (read from the files
    beside it), after checking the adapter has exactly the digest it states.

    Args:
        adapter: the adapter as read from the PEFT files.
        path: the ``lorahub.json``.
        label: how messages name the source (a folder, ``repo@revision``).
        cause: the end of the mismatch message: how the files came to differ, what to do.

    Returns:
        The recorded digest, base and provenance; None for a manifest of another schema (an
        older lorahub's identity rules: it cannot be recomputed, so the adapter comes in as
        plain PEFT, with a warning logged). A config value an export rewrote (see
        :data:`REWRITTEN`) is set back in ``adapter.config`` to the stored one first.

    Raises:
        CorruptData: the files do not make the adapter lorahub.json describes.
        InvalidAdapter: an unreadable lorahub.json, or one without a provenance object.
    """
    digest, manifest, doc = _read(path, label)
    if manifest.get("schema") != mf.SCHEMA:
        log.warning(
            "%s: lorahub.json uses manifest schema %r, this lorahub writes %d; imported as a "
            "plain PEFT adapter, without its identity check",
            label,
            manifest.get("schema"),
            mf.SCHEMA,
        )
        return None
    try:
        base = BaseRef.from_dict(manifest["base"] if isinstance(manifest.get("base"), dict) else {})
    except InvalidAdapter as exc:
        raise InvalidAdapter(f"{label}: lorahub.json: {exc}") from None
    provenance = manifest.get("provenance")
    if not isinstance(provenance, dict):
        raise InvalidAdapter(f"{label}: lorahub.json has no provenance object")
    _restore(adapter, doc.get(REWRITTEN), manifest.get("config"))
    data = peft.canonical_weights(adapter)
    weights = hash_bytes(data)
    ours = mf.build(adapter, weights, len(data), base, provenance)
    found = str(mf.digest_of(ours))
    if found != digest:
        differ = sorted(k for k in set(ours) | set(manifest) if ours.get(k) != manifest.get(k))
        detail = ""
        if "weights" in differ:
            recorded = manifest.get("weights")
            stated = recorded.get("digest") if isinstance(recorded, dict) else None
            detail = f" (the weights hash to {weights}, lorahub.json says {stated})"
        raise CorruptData(
            f"{label}: the adapter files do not match lorahub.json: {', '.join(differ)} "
            f"differ{detail}. Expected digest {digest}, got {found}; nothing was stored. {cause}",
            expected=digest,
            actual=found,
            path=path,
        )
    return Recorded(digest, base, provenance)


def _restore(adapter: LoraAdapter, rewritten: Any, config: Any) -> None:
    """Set back the config values an export rewrote, where the files hold exactly the value
    lorahub.json says was written; anything else is left for the digest check to refuse."""
    if not isinstance(rewritten, dict) or not isinstance(config, dict):
        return
    for key in _REWRITABLE:
        if key in rewritten and adapter.config.get(key) == rewritten[key]:
            if key in config:
                adapter.config[key] = config[key]
            else:
                adapter.config.pop(key, None)
