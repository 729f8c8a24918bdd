"""Serving engines: a folder of adapters that vLLM's filesystem resolver and LoRAX read, and
the hints an adapter's settings give whoever serves it.

``lorahub export --layout vllm DIR --base B`` (:func:`export_layout`) keeps ``DIR`` in step
with the store: one subfolder per adapter name whose variant fits ``B``::

    DIR/<folder>/adapter_config.json         the stored config, base_model_name_or_path =
                                             the served model id
    DIR/<folder>/adapter_model.safetensors   a hard link to the store's blob (a symbolic link
                                             where a hard link cannot be made); never a copy
    DIR/<folder>/.lorahub-serving.json       what lorahub wrote there (the marker)

``<folder>`` is the LoRA name a client asks for (:func:`folder_name`): ``name`` for the tag
``latest``, ``name@tag`` for any other, a namespace's ``/`` written ``--`` (``org/sql:v1`` ->
``org--sql@v1``). vLLM's resolver (``vllm/plugins/lora_resolvers/filesystem_resolver.py``)
loads ``DIR/<lora name>`` when its ``adapter_config.json`` says ``peft_type`` ``LORA`` and
``base_model_name_or_path`` equals the model vLLM was started with (its ``--model``, the
``MODEL`` of ``vllm serve MODEL``): that is the served model id, by default the base's
recorded Hub repo id.

Running it again changes only what changed: a folder whose adapter, config and link are
current is left as it is (same inode, same times); a changed one is rebuilt beside it and
swapped in whole. Folders whose adapter is gone or no longer fits are removed, but only those
holding lorahub's marker and nothing else: anything else in ``DIR`` is never touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import base_registry
from .aliases import StrPath
from .catalog import reads
from .digest import Digest
from .errors import InvalidArgument, LorahubError, OutputConflict, StoreError
from .formats import peft
from .fsutil import fsync_dir, process_alive, publish_dir
from .info import AdapterInfo
from .outputs import check_outside
from .paths import link_blob, link_kind
from .refs import DEFAULT_TAG, parse

if TYPE_CHECKING:
    from .blobs import BlobStore
    from .resolution import BaseContext, Resolver

log = logging.getLogger(__name__)

LAYOUTS = ("vllm",)
MARKER = ".lorahub-serving.json"
MARKER_VERSION = 1
CONFIG = peft.CONFIG
WEIGHTS = peft.SAFETENSORS
FILES = (CONFIG, WEIGHTS, MARKER)
# The values vLLM accepts for --max-lora-rank (``MaxLoRARanks`` in vllm/config/lora.py).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Names of a causal LM's output head (Llama, Mistral, Qwen: lm_head; GPT-NeoX: embed_out).
_HEADS = ("lm_head", "embed_out")
_TMP = ".lorahub-serving-"  # temp and removed folders: ``.lorahub-serving-<pid>-<hex>``


# ---------------------------------------------------------------------------- hints


@dataclass(frozen=True)
class ServingHints:
    """What serving an adapter asks of an engine.

    ``max_rank`` is the largest rank over its modules (a ``rank_pattern`` can make it larger
    than the config's ``r``); an engine sizes its LoRA slots by it. ``vllm_max_lora_rank`` is
    the smallest value vLLM's ``--max-lora-rank`` accepts that holds it (None above 512).
    ``warnings`` name the features some engines refuse (DoRA, ``modules_to_save``,
    embedding or ``lm_head`` targets, LoRA biases, conv layers).
    """

    max_rank: int
    vllm_max_lora_rank: int | None
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_rank": self.max_rank,
            "vllm_max_lora_rank": self.vllm_max_lora_rank,
            "warnings": list(self.warnings),
        }


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank``; None above 512.

    >>> vllm_max_lora_rank(12)
    16
    """
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)


def hints(info: AdapterInfo) -> ServingHints:
    """The serving hints of a stored adapter, read from its manifest (no file access).

    Example:
        >>> hints(hub.get("sql-expert:v1")).vllm_max_lora_rank  # doctest: +SKIP
        16
    """
    modules: Mapping[str, Mapping[str, Any]] = info.modules
    config = info.config
    max_rank = max((int(m["r"]) for m in modules.values()), default=info.rank)
    engine_rank = vllm_max_lora_rank(max_rank)
    warnings: list[str] = []
    if engine_rank is None:
        warnings.append(
            f"rank {max_rank} is above the largest --max-lora-rank vLLM accepts "
            f"({VLLM_MAX_LORA_RANKS[-1]})"
        )
    if info.use_dora or any("magnitude" in m for m in modules.values()):
        warnings.append(
            "DoRA: vLLM refuses it ('vLLM does not yet support DoRA'); merge it into the base "
            "(`lorahub merge`) to serve it there"
        )
    saved = sorted(set(_strings(config.get("modules_to_save"))))
    full = sorted(info.manifest.get("full", {}))
    if saved:
        warnings.append(
            f"modules_to_save ({_listed(saved)}): whole tensors that replace the base's; vLLM "
            "refuses adapters that have them ('vLLM only supports modules_to_save being None')"
        )
    elif full:
        warnings.append(
            f"whole tensors that replace the base's ({_listed(full)}, saved embedding layers): "
            "engines that load only LoRA factors ignore or refuse them"
        )
    embeddings = sorted(n for n, m in modules.items() if m.get("kind") == "embedding")
    if embeddings:
        warnings.append(
            f"LoRA on embeddings ({_listed(embeddings)}): some engines refuse it, or need extra "
            "settings for it"
        )
    heads = sorted(n for n in modules if n.rsplit(".", 1)[-1] in _HEADS)
    if heads:
        warnings.append(
            f"LoRA on the output head ({_listed(heads)}): some engines refuse lm_head targets"
        )
    biased = sorted(n for n, m in modules.items() if m.get("bias"))
    if biased or config.get("lora_bias") is True:
        warnings.append(
            f"LoRA bias terms ({_listed(biased) or 'lora_bias'}): vLLM refuses them unless "
            "started with --enable-lora-bias, in the versions that have it"
        )
    convs = sorted(n for n, m in modules.items() if m.get("kind") == "conv2d")
    if convs:
        warnings.append(
            f"conv2d modules ({_listed(convs)}): LLM serving engines adapt linear layers only"
        )
    return ServingHints(max_rank, engine_rank, tuple(warnings))


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _listed(names: Sequence[str], most: int = 3) -> str:
    more = len(names) - most
    return ", ".join(names[:most]) + (f" and {more} more" if more > 0 else "")


# --------------------------------------------------------------------------- layout


def folder_name(name: str, tag: str = DEFAULT_TAG) -> str:
    """The folder (and LoRA name) of ``name:tag``: ``name`` for ``latest``, else ``name@tag``;
    a namespace's ``/`` is written ``--``, as the Hugging Face cache writes repo ids.

    >>> folder_name("org/sql", "v1")
    'org--sql@v1'
    """
    folder = name.replace("/", "--")
    return folder if tag == DEFAULT_TAG else f"{folder}@{tag}"


@dataclass(frozen=True)
class ServedAdapter:
    """One folder of the layout: its name (the LoRA name a client asks for), the reference
    and adapter it holds, what this run did (``added``, ``updated``, ``unchanged``), how its
    weights are linked (``hardlink`` or ``symlink``) and the adapter's serving hints."""

    folder: str
    reference: str
    digest: str
    status: str
    link: str
    hints: ServingHints

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "reference": self.reference,
            "digest": self.digest,
            "status": self.status,
            "link": self.link,
            "hints": self.hints.to_dict(),
        }


@dataclass(frozen=True)
class ServingExport:
    """What :func:`export_layout` did in ``out``: every folder of an adapter that fits
    (``adapters``), the folders of lorahub's it removed (``removed``), and the names it left
    alone with why (``skipped``: a folder lorahub did not make is in the way, two names
    write the same folder)."""

    layout: str
    out: Path
    base: str
    served_model_id: str
    adapters: tuple[ServedAdapter, ...]
    removed: tuple[str, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()

    @property
    def max_rank(self) -> int:
        """The largest rank of any module of any adapter served (0 when none)."""
        return max((a.hints.max_rank for a in self.adapters), default=0)

    @property
    def vllm_max_lora_rank(self) -> int | None:
        """The ``--max-lora-rank`` vLLM needs for every adapter here."""
        return vllm_max_lora_rank(self.max_rank) if self.adapters else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout,
            "out": str(self.out),
            "base": self.base,
            "served_model_id": self.served_model_id,
            "max_rank": self.max_rank,
            "vllm_max_lora_rank": self.vllm_max_lora_rank,
            "adapters": [a.to_dict() for a in self.adapters],
            "removed": list(self.removed),
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
        }


def export_layout(
    resolver: Resolver,
    out: StrPath,
    *,
    base: StrPath | None = None,
    served_model_id: str | None = None,
    references: Iterable[str] = (),
    layout: str = "vllm",
) -> ServingExport:
    """Write (or bring up to date) the serving folder ``out`` for ``base``.

    Args:
        resolver: the store's resolver (its store gives the adapters and blobs).
        out: the folder to keep (made if missing); engines point at it
            (``VLLM_LORA_RESOLVER_CACHE_DIR``, LoRAX's local adapter ids under it).
        base: the served base model (path, repo id or recorded name); default the one base
            the store records.
        served_model_id: written as each config's ``base_model_name_or_path``; vLLM compares
            it with the model it serves. Default: the base's recorded Hub repo id.
        references: only these ``name[:tag]`` (each must fit ``base``), and nothing
            removed; default every name whose variant fits ``base``, and folders of
            lorahub's that no longer match one are removed.
        layout: ``"vllm"`` (LoRAX reads the same folders).

    Returns:
        A :class:`ServingExport`.

    Raises:
        InvalidArgument: an unknown layout, no base given and not exactly one recorded, no
            served model id known, a digest among ``references``.
        IncompatibleAdapter: a reference given has no variant that fits ``base``.
        OutputConflict: ``out`` overlaps the store, or is not a folder.
        StoreError: a write failed. IntegrityError: a blob is missing or damaged.

    Example:
        >>> export_layout(resolver, "/srv/loras", base="meta-llama/Llama-3.2-1B")  # doctest: +SKIP
    """
    if layout not in LAYOUTS:
        raise InvalidArgument(f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    store = resolver.store
    base_text = os.fspath(base) if base is not None else _only_base(resolver)
    ctx = resolver.base_context(base_text)
    if served_model_id is not None and not served_model_id.strip():
        raise InvalidArgument("--served-model-id is empty; give the model the engine serves")
    served = served_model_id if served_model_id is not None else _repo_id(resolver, ctx.id)
    if served is None:
        raise InvalidArgument(
            f"no Hub repo id is recorded for the base {base_text!r}; pass --served-model-id with "
            "the model the engine serves (the MODEL of `vllm serve MODEL`)"
        )
    dest = Path(out).expanduser()
    check_outside(dest, store.home)
    if os.path.lexists(dest) and not dest.is_dir():
        raise OutputConflict(f"{dest} exists and is not a folder; pick another path", target=dest)

    names = list(references)
    wanted, skipped = _plan(resolver, base_text, ctx, names)
    done: list[ServedAdapter] = []
    removed: list[str] = []
    try:
        dest.mkdir(parents=True, exist_ok=True)
        _sweep(dest)
        for folder, (ref, info) in sorted(wanted.items()):
            made = _materialize(store.blobs, dest, folder, ref, info, served)
            if isinstance(made, str):
                skipped.append((folder, made))
            else:
                done.append(made)
        if not names:
            removed, kept = _remove_stale(dest, set(wanted))
            skipped += kept
    except LorahubError:
        raise
    except OSError as exc:
        raise StoreError(f"cannot write {dest}: {exc.strerror or exc}") from None
    return ServingExport(
        layout, dest, base_text, served, tuple(done), tuple(removed), tuple(sorted(skipped))
    )


def _only_base(resolver: Resolver) -> str:
    bases = base_registry.list_bases(resolver.store)
    if len(bases) != 1:
        known = ", ".join(b.name for b in bases) or "none recorded"
        raise InvalidArgument(f"name the base model to serve with --base (recorded bases: {known})")
    return bases[0].name


def _repo_id(resolver: Resolver, base_id: int | None) -> str | None:
    for b in base_registry.list_bases(resolver.store):
        if b.id == base_id:
            return b.repo_id
    return None


def _plan(
    resolver: Resolver, base: str, ctx: BaseContext, references: list[str]
) -> tuple[dict[str, tuple[str, AdapterInfo]], list[tuple[str, str]]]:
    """Each folder to write, with the ``name:tag`` it serves and that name's variant for the
    base; and the names left out, with why."""
    if references:
        refs = []
        for text in references:
            ref = parse(text)
            if ref.name is None:
                raise InvalidArgument(
                    f"{text!r} is a digest; the vllm layout names each folder after an adapter "
                    "name: give name[:tag]"
                )
            refs.append(f"{ref.name}:{ref.tag}")
    else:
        with resolver.store.reading() as run:
            infos = reads.list_infos(run)
        refs = sorted({r for i in resolver.fitting(infos, base) for r in i.refs})
    wanted: dict[str, tuple[str, AdapterInfo]] = {}
    skipped: list[tuple[str, str]] = []
    for text in dict.fromkeys(refs):
        ref = parse(text)
        assert ref.name is not None
        folder = folder_name(ref.name, ref.tag)
        info = resolver.resolve(text, base, strict=True, ctx=ctx)[0]
        if folder in wanted and wanted[folder][0] != text:
            skipped.append((text, f"its folder {folder!r} is already {wanted[folder][0]}'s"))
            continue
        wanted[folder] = (text, info)
    return wanted, skipped


def _config(info: AdapterInfo, served: str) -> dict[str, Any]:
    return {"peft_type": "LORA", **info.config, "base_model_name_or_path": served}


def _marker(ref: str, info: AdapterInfo, served: str) -> dict[str, Any]:
    return {
        "lorahub_serving": MARKER_VERSION,
        "layout": "vllm",
        "reference": ref,
        "digest": info.digest,
        "weights": info.weights_digest,
        "served_model_id": served,
        "files": list(FILES),
    }


def _read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a folder lorahub made, or None (no marker, not ours, unreadable)."""
    path = folder / MARKER
    try:
        if path.is_symlink() or path.stat().st_size > 1 << 20:
            return None
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("lorahub_serving") is None:
        return None
    return doc


def _ours(folder: Path) -> dict[str, Any] | None:
    """The marker of ``folder`` when lorahub made it and it holds nothing else (a real
    folder, not a link, with only files serving writes: ``FILES``, never the marker's own
    list, which anyone can edit to name their files); else None."""
    if folder.is_symlink() or not folder.is_dir():
        return None
    doc = _read_marker(folder)
    if doc is None:
        return None
    try:
        names = {e.name for e in os.scandir(folder)}
    except OSError:
        return None
    return doc if names <= set(FILES) else None


def _current(folder: Path, ref: str, info: AdapterInfo, served: str, blob: Path) -> str | None:
    """The link kind of ``folder`` when it already holds exactly what would be written."""
    doc = _ours(folder)
    if doc is None or {k: doc.get(k) for k in _marker(ref, info, served)} != _marker(
        ref, info, served
    ):
        return None
    try:
        if set(os.listdir(folder)) != set(FILES):
            return None
        if json.loads((folder / CONFIG).read_text(encoding="utf-8")) != _config(info, served):
            return None
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return link_kind(folder / WEIGHTS, blob)


def _materialize(
    blobs: BlobStore, dest: Path, folder: str, ref: str, info: AdapterInfo, served: str
) -> ServedAdapter | str:
    """Make ``dest/folder`` hold ``info`` for ``served``; or, when something lorahub may not
    replace is in the way, say why it was left."""
    target = dest / folder
    adapter_hints = hints(info)
    digest = Digest.parse(info.weights_digest)
    exists = os.path.lexists(target)
    if exists:
        kind = _current(target, ref, info, served, blobs.path(digest))
        if kind is not None:
            return ServedAdapter(folder, ref, info.digest, "unchanged", kind, adapter_hints)
        if _ours(target) is None:
            return _in_the_way(target)
    blob = blobs.checked_path(digest)  # hashed once, before anything is linked to it
    tmp = dest / f"{_TMP}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        config = json.dumps(_config(info, served), indent=2, sort_keys=True) + "\n"
        _write(tmp / CONFIG, config)
        kind = link_blob(blob, tmp / WEIGHTS)
        _write(tmp / MARKER, json.dumps(_marker(ref, info, served), indent=2) + "\n")
        fsync_dir(tmp)
        if exists and _ours(target) is None:  # checked again: files may have come
            return _in_the_way(target)
        publish_dir(tmp, target, replace=exists)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    status = "updated" if exists else "added"
    log.info("%s %s (%s) in %s", status, folder, info.short, dest)
    return ServedAdapter(folder, ref, info.digest, status, kind, adapter_hints)


def _in_the_way(target: Path) -> str:
    if not target.is_symlink() and target.is_dir() and _read_marker(target) is not None:
        return "lorahub's folder there holds files lorahub did not write; remove them"
    return "a folder lorahub did not make is in the way"


def _write(path: Path, text: str) -> None:
    with open(path, "x", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _remove_stale(dest: Path, wanted: set[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Remove lorahub's folders in ``dest`` that no wanted name uses; report those that
    carry lorahub's marker but also hold other files (kept)."""
    removed: list[str] = []
    kept: list[tuple[str, str]] = []
    for entry in sorted(os.scandir(dest), key=lambda e: e.name):
        if entry.name in wanted or entry.name.startswith("."):
            continue
        path = Path(entry.path)
        if _ours(path) is None:
            if not path.is_symlink() and path.is_dir() and _read_marker(path) is not None:
                kept.append(
                    (
                        entry.name,
                        "no longer served, but it holds files lorahub did not "
                        "write; remove it yourself",
                    )
                )
            continue
        aside = dest / f"{_TMP}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(path, aside)  # out of the engine's sight in one step, then deleted
        fsync_dir(dest)
        shutil.rmtree(aside, ignore_errors=True)
        removed.append(entry.name)
    return removed, kept


def _sweep(dest: Path) -> None:
    """Delete temp folders a killed export left (their writer's pid is gone)."""
    for entry in os.scandir(dest):
        if not entry.name.startswith(_TMP) or not entry.is_dir(follow_symlinks=False):
            continue
        pid = entry.name[len(_TMP) :].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            with contextlib.suppress(OSError):
                shutil.rmtree(entry.path)
