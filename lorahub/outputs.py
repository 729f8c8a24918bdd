"""What an output folder may replace: the guard behind ``merge -o`` and ``export`` (``--force``).

lorahub deletes only what it made. A destination that exists is replaced only when it is an
empty folder or an earlier lorahub output (a merge or an export, recognised by the
``lorahub.json`` it carries) holding nothing but the files that output wrote. Whatever the
flags, it never replaces a symbolic link (nor what it points at), the current directory or a
folder holding it, the store, or an input of the command (the base model, an adapter).

Each output's ``lorahub.json`` lists the files it wrote (``"files"``); readers that predate the
list ignore it. Outputs written before the list existed are recognised by their fixed file
sets (:func:`legacy_files`). What a merge copies from its base is decided here too
(:func:`merge_aux_files`), so that list and the guard agree.

Example::

    replace = check_output(Path("./merged"), force=True, inputs=[("the base model", base)],
                           kind="merge")
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from .aliases import StrPath
from .errors import (
    Conflict,
    LorahubError,
    MergeIOError,
    MergeOutputConflict,
    OutputConflict,
    StoreError,
)

log = logging.getLogger(__name__)

Kind = Literal["merge", "export"]
Input = tuple[str, StrPath]

MARKER = "lorahub.json"
FILES_KEY = "files"
# What an export (and a push: formats.peft_folder.FILES is this list) writes, in push order.
EXPORT_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md", MARKER)
# A merge writes its shards (named as the base's), their index when there are several, a model
# card, and every other file of the base folder but weights (merge_aux_files). Before "files"
# was recorded a merge wrote "model" shards, that index and these files of the base.
MERGE_INDEX = "model.safetensors.index.json"
MERGE_CARD = "README.md"
MERGE_AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)
# Weights in any format (never copied: the merge writes its own), and their shard indexes.
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".keras",
    ".msgpack",
    ".onnx",
    ".onnx_data",
    ".gguf",
    ".ggml",
    ".tflite",
    ".ot",
    ".pb",
    ".npz",
    ".npy",
    ".pkl",
    ".pickle",
    ".joblib",
    ".mlmodel",
)
MAX_MARKER_BYTES = 64 << 20  # as lorahub.formats.lorahub_json: larger is none of ours
_SHARD_RE = re.compile(r"^model(?:-\d{5}-of-\d{5})?\.safetensors$")
# The folder names of a Hugging Face cache repo (models--org--name...), whose snapshot files
# link to ../../blobs/<sha>.
_HF_REPO_PREFIXES = ("models--", "datasets--", "spaces--")
# What a refused destination raises (a Conflict, and the older name each command raised), and
# what a destination that cannot be read raises (a disk error, under the same older name).
_ERRORS: dict[str, type[Conflict]] = {"merge": MergeOutputConflict, "export": OutputConflict}
_IO_ERRORS: dict[str, type[LorahubError]] = {"merge": MergeIOError, "export": StoreError}
_EXAMPLE = {"merge": "merged", "export": "exported"}


def check_output(
    dest: StrPath,
    *,
    force: bool,
    inputs: Iterable[Input] = (),
    store_home: StrPath | None = None,
    kind: Kind,
) -> bool:
    """Check that writing ``kind``'s output at ``dest`` destroys nothing lorahub did not make.

    Args:
        dest: the output folder.
        force: the user asked to replace an existing output (``--force``).
        inputs: ``(what, path)`` of each input of the command (``("the base model", path)``);
            ``dest`` may be neither one of them nor a folder holding one.
        store_home: the store, which ``dest`` may not be, lie in or hold.
        kind: ``"merge"`` (a refusal is ``MergeOutputConflict``, a ``MergeError``) or
            ``"export"`` (``OutputConflict``, a ``StoreError``).

    Returns:
        True when ``dest`` exists (an empty folder or an earlier output) and is to be replaced.

    Raises:
        MergeOutputConflict, OutputConflict: ``.target`` is ``dest``; the message says what
            is there and what to do instead.
        MergeIOError, StoreError: ``dest`` exists but cannot be read.
    """
    error = _ERRORS[kind]
    dest = Path(dest).expanduser().absolute()
    if os.path.islink(dest):
        target = os.readlink(dest)
        raise error(
            f"{dest} is a symbolic link to {target}; lorahub does not write through links: "
            f"give the target path ({(dest.parent / target).resolve()}) or remove the link",
            target=dest,
        )
    real = dest.resolve()
    if store_home is not None:
        check_outside(dest, store_home)
    if not os.path.lexists(dest):
        return False
    if not dest.is_dir():
        raise error(
            f"{dest} exists and is not a folder; remove it yourself or pick another path",
            target=dest,
        )
    cwd = _cwd()
    if real == cwd:
        raise error(
            f"{dest} is the current directory; lorahub will not replace it. "
            f"Write the output to a new folder (e.g. {dest / _EXAMPLE[kind]})",
            target=dest,
        )
    if cwd is not None and cwd.is_relative_to(real):
        raise error(
            f"{dest} holds the current directory ({cwd}); lorahub will not replace it. "
            "Write the output to a new folder",
            target=dest,
        )
    for what, path in inputs:
        p = Path(path).expanduser().resolve()
        if p == real:
            raise error(
                f"{dest} is {what} of this {kind}; write the output somewhere else", target=dest
            )
        if p.is_relative_to(real):
            raise error(
                f"{dest} holds {what} of this {kind} ({p}); write the output somewhere else",
                target=dest,
            )
    entries = _entries(dest, _IO_ERRORS[kind])
    if not entries:
        return True
    problem = foreign_files(dest, entries)
    if problem is None:
        if not force:
            raise error(
                f"{dest} already exists (an earlier lorahub output); pass --force to replace it",
                target=dest,
            )
        return True
    advice = "" if force else " (--force does not change that)"
    raise error(
        f"{dest} already exists and {problem}; lorahub replaces only its own earlier output "
        f"or an empty folder{advice}. Remove it yourself or pick another path",
        target=dest,
    )


def check_outside(dest: StrPath, store_home: StrPath) -> None:
    """Raise ``OutputConflict`` (a ``StoreError``) when ``dest`` is the store, lies in it or
    holds it: an output written there would replace what the store keeps."""
    real, home = Path(dest).expanduser().resolve(), Path(store_home).expanduser().resolve()
    if real == home or real.is_relative_to(home) or home.is_relative_to(real):
        raise OutputConflict(
            f"{dest} overlaps the lorahub store at {home}; write the output somewhere else",
            target=dest,
        )


def foreign_files(dest: Path, entries: list[os.DirEntry[str]] | None = None) -> str | None:
    """None when the folder ``dest`` is an earlier lorahub output holding only what that
    output wrote; else why not, as a phrase ("holds files lorahub did not write: a.txt")."""
    entries = _entries(dest, StoreError) if entries is None else entries
    names = {e.name for e in entries}
    if MARKER not in names:
        return "has no lorahub.json (it is not a lorahub output)"
    doc = _read_marker(dest / MARKER)
    if doc is None:
        return "its lorahub.json is not one lorahub wrote"
    listed = doc.get(FILES_KEY)
    if listed is None:
        allowed = legacy_files(doc, names)
        if allowed is None:
            return "its lorahub.json is not one lorahub wrote"
    elif isinstance(listed, list) and all(isinstance(n, str) for n in listed):
        allowed = set(listed) | {MARKER}
    else:
        return f"its lorahub.json has a malformed {FILES_KEY!r} list"
    other = sorted(
        e.name for e in entries if e.name not in allowed or not e.is_file(follow_symlinks=False)
    )
    if other:
        shown = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
        return f"holds files lorahub did not write: {shown}"
    return None


def legacy_files(doc: dict[str, Any], names: set[str]) -> set[str] | None:
    """The names an output written before lorahub recorded its files may hold: the fixed
    export set, or what a merge writes (shards, their index, the base's config and tokenizer
    files); None when ``doc`` is neither an export's nor a merge's ``lorahub.json``."""
    if isinstance(doc.get("digest"), str) and isinstance(doc.get("manifest"), dict):
        return set(EXPORT_FILES)
    if isinstance(doc.get("base"), dict) and isinstance(doc.get("tensors"), int):
        fixed = {MARKER, MERGE_INDEX, *MERGE_AUX_FILES}
        return fixed | {n for n in names if _SHARD_RE.match(n)}
    return None


def merge_aux_files(root: Path, *, whole_folder: bool = True) -> tuple[str, ...]:
    """The files of the base folder ``root`` a merge copies beside its weights: every plain
    file (configs, tokenizer assets of any name, ``*.py`` for ``trust_remote_code``...) but
    weights of any format and their indexes, hidden files, a model card (the merge writes its
    own) and ``lorahub.json``; in name order. Subfolders are not copied: a transformers or
    diffusers component folder is flat, and a repo's subfolders hold other formats
    (``original/``, ``onnx/``) or other components.

    ``whole_folder`` False (a base given as one ``.safetensors`` file, whose folder may hold
    anything): only the config and tokenizer files of :data:`MERGE_AUX_FILES`.

    A symbolic link is followed only to a file inside the base folder or inside the Hugging Face
    cache repo folder holding it (``snapshots/<rev>/x -> ../../blobs/<sha>``); any other link
    (``notes.txt -> ~/secret``) is left out, with a warning, so that it does not leak into the
    output.
    """
    try:
        if not whole_folder:
            names = [n for n in MERGE_AUX_FILES if (root / n).is_file()]
        else:
            with os.scandir(root) as it:
                names = sorted(e.name for e in it if e.is_file() and _is_aux(e.name))
        inside = _link_roots(root)
    except OSError as exc:
        raise MergeIOError(f"cannot read the base folder {root}: {exc.strerror or exc}") from None
    return tuple(n for n in names if _link_ok(root / n, inside))


def _link_roots(root: Path) -> tuple[Path, ...]:
    """The folders a link of the base folder ``root`` may point into: the folder itself and,
    when it is (in) a snapshot of a Hugging Face cache repo, that repo's folder."""
    real = root.resolve(strict=True)
    for parent in real.parents:
        if parent.name == "snapshots":
            if parent.parent.name.startswith(_HF_REPO_PREFIXES):
                return (real, parent.parent)
            break
    return (real,)


def _link_ok(path: Path, inside: tuple[Path, ...]) -> bool:
    """Whether ``path`` is a plain file, or a link to a file within one of ``inside``."""
    if not path.is_symlink():
        return True
    target = path.resolve()
    if any(target.is_relative_to(folder) for folder in inside):
        return True
    log.warning("not copying %s: a link to %s, outside the base folder", path, target)
    return False


def _is_aux(name: str) -> bool:
    lower = name.lower()
    if name.startswith(".") or name == MARKER or lower == MERGE_CARD.lower():
        return False
    if lower.endswith(".index.json"):
        lower = lower.removesuffix(".index.json")
    return not lower.endswith(WEIGHT_SUFFIXES)


def _cwd() -> Path | None:
    try:
        return Path.cwd().resolve()
    except FileNotFoundError:  # the current directory was deleted: nothing there to protect
        return None


def _entries(dest: Path, error: type[LorahubError]) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(dest) as it:
            return list(it)
    except OSError as exc:
        raise error(f"cannot read {dest}: {exc.strerror or exc}") from None


def _read_marker(path: Path) -> dict[str, Any] | None:
    """The ``lorahub.json`` at ``path`` as a dict, or None (unreadable, a link, too large)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_MARKER_BYTES + 1)
    except OSError:
        return None
    if len(data) > MAX_MARKER_BYTES:
        return None
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None
