"""Push and pull adapters through the Hugging Face Hub; ``huggingface_hub`` does every request.

A pushed repo is a plain PEFT adapter folder, so PEFT and the Hub read it as they read any
other: ``adapter_config.json``, ``adapter_model.safetensors``, a ``README.md`` model card, plus
``lorahub.json`` (the manifest and its digest) so another lorahub can check that what it pulled
is exactly what was pushed.

Hub settings stay huggingface_hub's, read through :mod:`lorahub.hfenv` on each call: the
endpoint (``HF_ENDPOINT``), the cache (``HF_HUB_CACHE`` / ``HF_HOME``) and ``HF_HUB_OFFLINE``,
which switches pulls to the cache. The token is resolved by the client (``HF_TOKEN``,
``hf auth login``) and never passes through lorahub's hands.

Modules: :mod:`.repo` (names and paths), :mod:`.errors` (the Hub's errors as lorahub's),
:mod:`.push`, :mod:`.pull`, :mod:`.progress`.
"""

from __future__ import annotations

from ..formats.peft_folder import LORAHUB_JSON, README
from ..hfenv import endpoint
from .progress import progress_bars
from .pull import (
    HEADER_CHECK_MIN_BYTES,
    RemoteAdapter,
    download_adapter,
    identity,
    read_adapter,
)
from .push import PushResult, check_weights, push_adapter, push_files, write_push_files
from .repo import (
    DEFAULT_REVISION,
    check_repo_id,
    clean_subpath,
    default_name,
    is_safe_repo_path,
    split_repo_spec,
)

__all__ = [
    "DEFAULT_REVISION",
    "HEADER_CHECK_MIN_BYTES",
    "LORAHUB_JSON",
    "README",
    "PushResult",
    "RemoteAdapter",
    "check_repo_id",
    "check_weights",
    "clean_subpath",
    "default_name",
    "download_adapter",
    "endpoint",
    "identity",
    "is_safe_repo_path",
    "progress_bars",
    "push_adapter",
    "push_files",
    "read_adapter",
    "split_repo_spec",
    "write_push_files",
]
