"""The PEFT adapter folder lorahub hands out: what ``export`` writes and what ``push`` uploads.

One function writes both, so an exported folder and a pushed repo hold the same files with the
same bytes: ``adapter_config.json``, ``adapter_model.safetensors``, a ``README.md`` model card
and ``lorahub.json`` (the digest and manifest, for a lorahub that imports it later). Every file
is a pure function of the adapter and the arguments, so writing twice gives identical bytes.

An export or a push may write another ``base_model_name_or_path`` than the stored config's (a
Hub repo id rather than the training machine's path: :func:`published_base`, ``--base-model-id``);
``lorahub.json`` then records the value written (``"rewritten"``), so an import or a pull
restores the stored one and keeps the adapter's digest.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..card import README, adapter_card, hub_base_id
from ..manifest import lorahub_json_text
from ..outputs import EXPORT_FILES
from . import lorahub_json, peft

if TYPE_CHECKING:
    from ..info import AdapterInfo

LORAHUB_JSON = lorahub_json.FILENAME
#: Every file of the folder, in the order a push commits them: the list ``export --force``
#: checks an earlier export against (``peft.CONFIG``, ``peft.SAFETENSORS``, README,
#: LORAHUB_JSON), kept in :mod:`lorahub.outputs`, which must not import the formats.
FILES = EXPORT_FILES
BASE_KEY = "base_model_name_or_path"


def published_base(
    info: AdapterInfo, *, base_model_id: str | None = None, recorded_base: str | None = None
) -> tuple[str | None, str | None]:
    """The base a folder handed out names, as ``(config_base, card_base)``: the config's
    ``base_model_name_or_path`` and the card's ``base_model``. The rule of ``export`` and
    ``push`` alike: ``base_model_id`` when given, else ``recorded_base`` (the recorded base's
    Hub repo id), else the config's own value when the Hub would take it as a repo id (the
    card only an ``org/name`` one), else None: a local path is never written.

    Raises:
        InvalidReference: ``base_model_id`` is not a Hub repo id.

    Example:
        >>> published_base(info)  # stored config: /home/me/llama  # doctest: +SKIP
        (None, None)
    """
    if base_model_id is not None:
        from ..remote.repo import check_repo_id

        check_repo_id(base_model_id)
    config_base = base_model_id or recorded_base or _config_repo_id(info)
    return config_base, base_model_id or hub_base_id(info, recorded_base)


def _config_repo_id(info: AdapterInfo) -> str | None:
    """The config's ``base_model_name_or_path`` when the Hub would take it as a repo id
    (``org/name``, or a bare legacy name); None for a path (absolute, ``~``, ``./``...)."""
    value = info.config.get(BASE_KEY)
    if not isinstance(value, str) or not value or value.startswith(("~", ".")):
        return None
    # Longer than any repo id (two parts of at most 96 characters): not one, and never a
    # key of the cache below, which a config's megabytes would otherwise fill.
    return value if len(value) <= _REPO_ID_MAX and _valid_repo_id(value) else None


_REPO_ID_MAX = 96 + 1 + 96  # namespace/name, as the Hub client's check allows


@functools.lru_cache(maxsize=1024)
def _valid_repo_id(value: str) -> bool:
    """Whether the Hub client's repo-id check takes ``value``. Imported on first use (the
    Hub client is slow to import) and remembered per value: a store's adapters name a few
    bases, and ``lorahub serve`` asks for each adapter it describes."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def small_files(
    info: AdapterInfo,
    *,
    title: str | None = None,
    list_files: bool = True,
    repo_id: str | None = None,
    subfolder: str | None = None,
    base_model_id: str | None = None,
    rewrite_base: bool = False,
    config_base: str | None = None,
) -> dict[str, bytes]:
    """The folder's files but the weights, by name: their bytes, made in memory (what
    :func:`write_peft_folder` writes, with the same arguments; ``lorahub serve`` answers
    with them)."""
    config = info.config
    rewritten: dict[str, Any] = {}
    if rewrite_base and config.get(BASE_KEY) != config_base:
        config[BASE_KEY] = rewritten[BASE_KEY] = config_base
    card = adapter_card(
        info, title=title, repo_id=repo_id, subfolder=subfolder, base_model_id=base_model_id
    )
    names = FILES if list_files else None
    text = lorahub_json_text(info.digest, info.manifest, names)
    if rewritten:
        doc = json.loads(text)
        doc[lorahub_json.REWRITTEN] = rewritten
        text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    return {
        peft.CONFIG: peft.config_bytes(config),
        README: card.encode(),
        LORAHUB_JSON: text.encode(),
    }


def write_peft_folder(
    info: AdapterInfo,
    weights: Path,
    out: Path,
    *,
    copy_weights: bool = True,
    title: str | None = None,
    list_files: bool = True,
    fsync: bool = False,
    repo_id: str | None = None,
    subfolder: str | None = None,
    base_model_id: str | None = None,
    rewrite_base: bool = False,
    config_base: str | None = None,
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
        repo_id, subfolder: where the folder is published (a push's repo), for the card's
            usage snippet.
        base_model_id: the base's Hub repo id for the card's ``base_model`` (default: the
            config's ``base_model_name_or_path`` when it is a repo id).
        rewrite_base: write ``config_base`` as the config's ``base_model_name_or_path``
            (None writes null), recorded in ``lorahub.json``; an export's and a push's
            (both from :func:`published_base`).

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
    small = small_files(
        info,
        title=title,
        list_files=list_files,
        repo_id=repo_id,
        subfolder=subfolder,
        base_model_id=base_model_id,
        rewrite_base=rewrite_base,
        config_base=config_base,
    )
    for name, data in small.items():
        (out / name).write_bytes(data)
        written.append(out / name)
    if fsync:
        for path in written:
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
    files = {name: out / name for name in FILES}
    if not copy_weights:
        files[peft.SAFETENSORS] = weights
    return files
