"""Reading adapters from where users keep them: PEFT folders, kohya and diffusers files.

Next to the formats, not in the store: finding the adapters under a folder, telling which
format a path holds, and naming what was found, before anything is written.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .aliases import StrPath
from .errors import InvalidAdapter, InvalidReference
from .formats import peft
from .info import AddResult
from .refs import validate_name

if TYPE_CHECKING:
    from .adapter import LoraAdapter
    from .base import TensorInfo

# A base model's tensor table, asked for only when a single-file LoRA needs it.
BaseTensors = Callable[[StrPath], Mapping[str, "TensorInfo"]]


def read(
    path: Path, base: StrPath | None, base_tensors: BaseTensors
) -> tuple[LoraAdapter, str, list[str]]:
    """The adapter at ``path`` (a PEFT folder, its weights file, or a single-file LoRA),
    its format name, and the keys that could not be mapped (kohya).

    Raises:
        InvalidAdapter: nothing readable there; the message says what was found instead.
    """
    if not path.exists():
        raise InvalidAdapter(f"{path} does not exist")
    if not path.is_file() and not path.is_dir():  # a FIFO would block the read forever
        raise InvalidAdapter(f"{path} is neither a regular file nor a folder")
    if (
        path.is_file()
        and path.name in (peft.SAFETENSORS, peft.BIN)
        and peft.is_adapter_dir(path.parent)
    ):
        path = path.parent
    if path.is_dir():
        if not peft.is_adapter_dir(path):
            if weights_without_config(path, recursive=False):
                raise InvalidAdapter(no_config(path))
            raise InvalidAdapter(
                f"{path} holds no adapter ({peft.CONFIG} not found); "
                "for a folder of adapters use `lorahub add --recursive`"
            )
        fmt = "peft-safetensors" if (path / peft.SAFETENSORS).is_file() else "peft-bin"
        return peft.read_peft_dir(path), fmt, []
    return read_file(path, base, base_tensors)


def read_file(
    path: Path, base: StrPath | None, base_tensors: BaseTensors
) -> tuple[LoraAdapter, str, list[str]]:
    """A single-file LoRA: kohya/sd-scripts or diffusers; kohya names need a base."""
    from .formats import kohya

    if path.suffix != ".safetensors":
        raise InvalidAdapter(
            f"{path} is not an adapter: give a PEFT directory or a .safetensors LoRA file"
        )
    keys, metadata = peft.read_safetensors_header(path)
    tensors = base_tensors(base) if base is not None else None
    if kohya.is_kohya(keys):
        if tensors is None:
            raise InvalidAdapter(
                f"{path} is a kohya LoRA: its module names can only be mapped with the base "
                "model it was trained for; pass --base"
            )
        adapter, unmapped = kohya.read_kohya(path, tensors)
        return adapter, "kohya", unmapped
    if kohya.is_diffusers(keys, metadata):
        return kohya.read_diffusers_lora(path, tensors), "diffusers", []
    raise InvalidAdapter(
        f"{path} is neither a kohya nor a diffusers LoRA file; a PEFT adapter needs its "
        "adapter_config.json next to it"
    )


@dataclass
class Found:
    """What :func:`discover` found: adapter paths with the name each gets when the user
    gave none, and the sources refused before reading (missing, holding no adapter)."""

    adapters: list[tuple[Path, str | None]] = field(default_factory=list)
    refused: list[AddResult] = field(default_factory=list)


def discover(
    sources: Sequence[StrPath],
    *,
    recursive: bool,
    named: bool,
    with_base: bool,
) -> Found:
    """The adapters at or below ``sources``. Unless ``named`` (the user gave a name), each
    is named after its directory relative to the folder given, ``/`` turned into ``-``.
    ``with_base``: a recursive search with no PEFT folder takes ``.safetensors`` files."""
    found = Found()
    for src in sources:
        root = Path(src)
        if not root.exists():
            found.refused.append(AddResult(str(root), "refused", reason=f"{root} does not exist"))
            continue
        if not root.is_file() and not root.is_dir():
            reason = f"{root} is neither a regular file nor a folder"
            found.refused.append(AddResult(str(root), "refused", reason=reason))
            continue
        if root.is_file() or peft.is_adapter_dir(root):
            own = root.resolve()
            if own.is_file() and own.name.startswith("adapter_model"):
                own = own.parent
            # Named after the folder (or file) itself, however the path was spelled.
            label = own.stem if own.is_file() else own.name
            found.adapters.append((root, None if named else default_name(Path(label))))
            continue
        _search(root, recursive=recursive, named=named, with_base=with_base, found=found)
    return found


def _search(root: Path, *, recursive: bool, named: bool, with_base: bool, found: Found) -> None:
    """The adapter folders below ``root`` (one level, or all with ``recursive``)."""
    dirs = peft.find_adapter_dirs(root, recursive=recursive)
    lacking = weights_without_config(root, recursive)
    for folder in lacking:
        found.refused.append(AddResult(str(folder), "refused", reason=no_config(folder)))
    if not dirs and recursive:
        dirs = [p for p in sorted(root.rglob("*.safetensors")) if p.is_file()] if with_base else []
    if not dirs and not lacking:
        hint = "" if recursive else " (use --recursive to search below it)"
        found.refused.append(
            AddResult(str(root), "refused", reason=f"no adapter found in {root}{hint}")
        )
    for d in dirs:
        rel = d.relative_to(root) if d != root else Path(d.name)
        found.adapters.append((d, None if named else default_name(rel, root)))


def weights_without_config(root: Path, recursive: bool) -> list[Path]:
    """Folders (``root``, or any below it with ``recursive``) holding PEFT weights but no
    ``adapter_config.json``: an adapter copied without its config."""
    names = (peft.SAFETENSORS, peft.BIN)
    if recursive:
        found = {p.parent for n in names for p in root.rglob(n) if p.is_file()}
    else:
        found = {root} if any((root / n).is_file() for n in names) else set()
    return sorted(f for f in found if not peft.is_adapter_dir(f))


def no_config(folder: Path) -> str:
    weights = next(n for n in (peft.SAFETENSORS, peft.BIN) if (folder / n).is_file())
    return (
        f"{folder} has {weights} but no {peft.CONFIG}; PEFT saves both: copy the config that "
        "was saved with these weights into the folder"
    )


def source_label(origin_kind: str, origin: Mapping[str, Any]) -> str:
    """Where an adapter came from, for messages: a path, ``repo@revision``, or its kind."""
    if origin.get("repo_id"):
        return f"{origin['repo_id']}@{origin.get('revision') or origin.get('commit')}"
    return str(origin.get("path") or origin_kind)


def default_name(rel: Path, root: Path | None = None) -> str | None:
    """A name from a folder path: accents dropped (``ünïcode`` -> ``unicode``), anything
    else outside the name alphabet turned into ``-``; None when nothing usable is left."""
    import unicodedata

    text = "-".join(p for p in rel.parts if p not in ("", ".")) or (root.name if root else "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:128]
    try:
        return validate_name(text) if text else None
    except InvalidReference:
        return None
