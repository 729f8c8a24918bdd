"""Writing a stored adapter out as a folder ``PeftModel.from_pretrained`` loads.

The folder is written whole in a temp folder beside the destination, fsynced, then renamed
into place: it appears complete or not at all, and what was at the destination is replaced
only when :func:`lorahub.outputs.check_output` allows it, checked again just before.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

from .aliases import StrPath
from .blobs import BlobStore
from .digest import Digest
from .errors import LorahubError, StoreError
from .formats.peft_folder import write_peft_folder
from .fsutil import current_umask, publish_dir
from .info import AdapterInfo


def export_adapter(
    blobs: BlobStore,
    info: AdapterInfo,
    out: StrPath,
    *,
    store_home: Path,
    force: bool = False,
    base: StrPath | None = None,
) -> Path:
    """Write ``info``'s PEFT folder at ``out``; returns its path.

    ``base`` (the base the variant was picked for) is refused as a destination, like the
    store at ``store_home``. See ``Hub.export``.

    Raises:
        OutputConflict: ``out`` may not be replaced (a link, the current directory, files
            lorahub did not write, an earlier output without ``force``); ``.target`` is
            ``out``. A ``StoreError``, as it always was.
        StoreError: a write failed.
        IntegrityError: the adapter's blob is missing or damaged; nothing was written.
    """
    from .outputs import check_output

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
        write_peft_folder(info, blob, tmp, fsync=True)
        publish_dir(tmp, dest, replace=check())  # checked again: files may have come
    except LorahubError:  # OutputConflict and CorruptData are OSErrors too: keep their kind
        raise
    except OSError as exc:
        raise StoreError(f"cannot write {dest}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
