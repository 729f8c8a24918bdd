"""Writing a stored adapter out as a folder ``PeftModel.from_pretrained`` loads.

The folder is written whole in a temp folder beside the destination, fsynced, then renamed
into place: it appears complete or not at all, and what was at the destination is replaced
only when :func:`lorahub.outputs.check_output` allows it, checked again just before.

Its ``adapter_config.json`` names the base by its Hub repo id (``--base-model-id``, else the
recorded base's, else the config's own value when it is one), never by the training machine's
local path; ``lorahub.json`` records the rewrite, so importing the folder keeps the digest.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .aliases import Progress, StrPath
from .blobs import BlobStore
from .digest import Digest
from .errors import LorahubError, StoreError
from .formats.peft import SAFETENSORS
from .formats.peft_folder import published_base, write_peft_folder
from .fsutil import current_umask, publish_dir
from .info import AdapterInfo, ExportResult

if TYPE_CHECKING:
    from .store import Store


def export_folder(
    blobs: BlobStore,
    info: AdapterInfo,
    out: StrPath,
    *,
    store_home: Path,
    force: bool = False,
    base: StrPath | None = None,
    progress: Progress | None = None,
    base_model_id: str | None = None,
    recorded_base: str | None = None,
) -> ExportResult:
    """Write ``info``'s PEFT folder at ``out``; returns the adapter, the folder's absolute
    path and the ``base_model_name_or_path`` written.

    ``base_model_id`` (a Hub repo id) is written as the config's ``base_model_name_or_path``
    and the card's ``base_model``; by default ``recorded_base`` (the recorded base's repo id,
    :func:`recorded_base_repo`), else the config's value when it is a repo id, else none
    (null: a local path is never written); the rule of
    :func:`lorahub.formats.peft_folder.published_base`, which ``push`` shares.

    ``base`` (the base the variant was picked for) is refused as a destination, like the
    store at ``store_home``. ``progress(bytes_copied, bytes_in_all)`` follows the copy of
    the weights. See ``Hub.export``.

    Raises:
        OutputConflict: ``out`` may not be replaced (a link, the current directory, files
            lorahub did not write, an earlier output without ``force``); ``.target`` is
            ``out``. A ``StoreError``, as it always was.
        StoreError: a write failed.
        IntegrityError: the adapter's blob is missing or damaged; nothing was written.
        InvalidReference: ``base_model_id`` is not a Hub repo id; nothing was written.
    """
    from .outputs import check_output

    config_base, card_base = published_base(
        info, base_model_id=base_model_id, recorded_base=recorded_base
    )

    dest = Path(out).expanduser()
    given = Path(base).expanduser() if base is not None else None
    inputs = [("the base model", given)] if given is not None and given.exists() else []
    check = functools.partial(
        check_output, dest, force=force, inputs=inputs, store_home=store_home, kind="export"
    )
    check()

    blob = blobs.checked_path(Digest.parse(info.weights_digest))  # before any write
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        os.chmod(tmp, 0o777 & ~current_umask())  # as mkdir would make it, not 0700
    except OSError as exc:
        raise StoreError(f"cannot write {dest}: {exc.strerror or exc}") from None
    try:
        _copy_weights(blob, tmp / SAFETENSORS, progress)
        write_peft_folder(
            info,
            blob,
            tmp,
            copy_weights=False,
            fsync=True,
            base_model_id=card_base,
            rewrite_base=True,
            config_base=config_base,
        )
        publish_dir(tmp, dest, replace=check())  # checked again: files may have come
    except LorahubError:  # OutputConflict and CorruptData are OSErrors too: keep their kind
        raise
    except OSError as exc:
        raise StoreError(f"cannot write {dest}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(adapter=info, path=dest.absolute(), base_model_name_or_path=config_base)


_CHUNK = 8 << 20


def _copy_weights(blob: Path, dest: Path, progress: Progress | None) -> None:
    """Copy the weights blob to ``dest`` and flush it to disk, reporting the bytes copied."""
    total = blob.stat().st_size
    done = 0
    with blob.open("rb") as src, dest.open("wb") as dst:
        while chunk := src.read(_CHUNK):
            dst.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        dst.flush()
        os.fsync(dst.fileno())
    if progress is not None and total == 0:
        progress(0, 0)


def recorded_base_repo(store: Store, info: AdapterInfo) -> str | None:
    """The Hub repo id of the base ``info`` was recorded against, when that base is recorded
    here with one (``lorahub base add org/name``); None for a local or unverified base."""
    from .catalog import reads

    ref = info.base
    if not ref.name or ref.signature is None:
        return None
    with store.reading() as run:
        rows = reads.find_bases(run, ref.name)
    for row in rows:
        same = (
            row.content_hash == ref.content_hash
            if ref.content_hash
            else row.signature == ref.signature
        )
        if same and row.repo_id and row.repo_id == ref.name:
            return row.repo_id
    return None
