"""The PEFT adapter folder lorahub hands out: what ``export`` writes and what ``push`` uploads.

One function writes both, so an exported folder and a pushed repo hold the same files with the
same bytes: ``adapter_config.json``, ``adapter_model.safetensors``, a ``README.md`` model card
and ``lorahub.json`` (the digest and manifest, for a lorahub that imports it later). Every file
is a pure function of the adapter and the title, so writing twice gives identical bytes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ..card import adapter_card
from ..manifest import lorahub_json_text
from ..outputs import EXPORT_FILES
from . import lorahub_json, peft

if TYPE_CHECKING:
    from ..info import AdapterInfo

README = "README.md"
LORAHUB_JSON = lorahub_json.FILENAME
#: Every file of the folder, in the order a push commits them: the list ``export --force``
#: checks an earlier export against (``peft.CONFIG``, ``peft.SAFETENSORS``, README,
#: LORAHUB_JSON), kept in :mod:`lorahub.outputs`, which must not import the formats.
FILES = EXPORT_FILES


def write_peft_folder(
    info: AdapterInfo,
    weights: Path,
    out: Path,
    *,
    copy_weights: bool = True,
    title: str | None = None,
    list_files: bool = True,
    fsync: bool = False,
) -> dict[str, Path]:
    """Write ``info``'s PEFT folder into the existing directory ``out``.

    Args:
        info: the stored adapter (config, manifest, digest, card facts).
        weights: its weights blob, already checked by the caller.
        out: an existing, empty directory (a temporary one: publishing it is the caller's).
        copy_weights: copy the blob to ``out``; False leaves it where it is and returns its
            path (a push uploads it straight from the blob, no copy).
        title: the model card's heading (default: the adapter's first name, else its digest).
        list_files: record the folder's file names in ``lorahub.json``, so a later
            ``export --force`` knows the folder holds nothing else (an export's); a push
            leaves them out.
        fsync: flush every file written to disk before returning (before a rename publishes
            the folder).

    Returns:
        Each file's name in the folder mapped to its local path, in :data:`FILES` order.

    Raises:
        OSError: a write failed.

    Example:
        >>> write_peft_folder(info, blob, tmp)  # doctest: +SKIP
        {'adapter_config.json': ..., 'adapter_model.safetensors': ..., ...}
    """
    written: list[Path] = []
    if copy_weights:
        shutil.copyfile(weights, out / peft.SAFETENSORS)
        written.append(out / peft.SAFETENSORS)
    peft.write_config(info.config, out)
    written.append(out / peft.CONFIG)
    (out / README).write_text(adapter_card(info, title=title), encoding="utf-8")
    written.append(out / README)
    names = FILES if list_files else None
    (out / LORAHUB_JSON).write_text(lorahub_json_text(info.digest, info.manifest, names), "utf-8")
    written.append(out / LORAHUB_JSON)
    if fsync:
        for path in written:
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
    files = {name: out / name for name in FILES}
    if not copy_weights:
        files[peft.SAFETENSORS] = weights
    return files
