"""Base models: the tensor table from safetensors headers, and the two fingerprints.

The **signature** (digest of the sorted ``[name, dtype, shape]`` list) says "same
architecture" and costs one header read per shard. The **content hash** (each tensor's bytes
hashed with xxh3-128, the names and digests then hashed in name order) says "same weights"
whatever the sharding; it reads every byte once, in disk order, so it is cached by each
shard's path, size and mtime.

A base is a local safetensors checkpoint (a directory, sharded or not, or one file) or a
Hugging Face Hub repository id, read from the local HF cache or, when not cached and the Hub
is reachable, from the remote headers alone (no weights are downloaded).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import mmap
import os
import struct
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeGuard

import xxhash

from . import hfenv
from .aliases import Progress, StrPath
from .digest import Digest, Hasher, canonical_json, hash_bytes
from .dtypes import DTYPE_BITS
from .errors import BaseModelError, BaseNotFound
from .fsutil import write_atomic

log = logging.getLogger(__name__)


INDEX_SUFFIX = ".safetensors.index.json"
MAX_HEADER = 100 << 20  # safetensors itself refuses headers over 100 MB
CACHE_FILE = "base-hashes.json"
CACHE_MAX_ENTRIES = 2048
HASH_CHUNK = 64 << 20
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a base checkpoint, as its safetensors header describes it.

    ``offsets`` are the header's ``data_offsets``: relative to the first byte after the
    header, not to the start of the file.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str | None = None
    offsets: tuple[int, int] | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        if self.offsets is not None:
            return self.offsets[1] - self.offsets[0]
        return self.numel * DTYPE_BITS.get(self.dtype, 8) // 8


@dataclass(frozen=True)
class BaseModel:
    """A base checkpoint: where its shards are and every tensor they hold.

    ``root`` is None for a Hub repo read remotely (headers only): such a base has a
    signature but no content hash until it is downloaded.
    """

    source: str
    root: Path | None
    files: tuple[str, ...]
    tensors: Mapping[str, TensorInfo] = field(hash=False, repr=False)
    repo_id: str | None = None
    revision: str | None = None

    @cached_property
    def signature(self) -> Digest:
        """Digest of canonical JSON of the sorted ``[name, dtype, shape]`` list."""
        rows = sorted([t.name, t.dtype, list(t.shape)] for t in self.tensors.values())
        return hash_bytes(canonical_json(rows))

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data (what a content hash reads)."""
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def is_local(self) -> bool:
        return self.root is not None

    @property
    def display(self) -> str:
        """How to name this base to a person: ``repo@rev12`` or the path."""
        if self.repo_id:
            return f"{self.repo_id}@{self.revision[:12]}" if self.revision else self.repo_id
        return self.source


# --------------------------------------------------------------------------------------
# Headers


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate one safetensors header without reading tensor data.

    Returns the tensors (``file`` set to ``path.name``), the ``__metadata__`` strings, and the
    file offset where tensor data starts.

    Raises:
        BaseModelError: not a safetensors file, truncated, or a header whose dtypes, shapes or
            offsets do not describe the bytes that follow it.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, f"the file is {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n > size - 8:
                raise _bad(
                    path, f"the header claims {n} bytes but the file has {size - 8} after it"
                )
            raw = f.read(n)
    except OSError as e:
        raise BaseModelError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _bad(path, f"the header is not valid JSON ({e})") from e
    except ValueError as e:  # json's refusal of an integer of thousands of digits
        raise _bad(path, "the header holds an integer too long to read") from e
    if not isinstance(header, dict):
        raise _bad(path, "the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise _bad(path, "__metadata__ is not a JSON object")
    # A lone surrogate ("\ud800") parses but can be neither stored nor hashed.
    if not all(_is_text(k) for k in header) or not all(
        _is_text(str(k)) and _is_text(str(v)) for k, v in meta.items()
    ):
        raise _bad(path, "a tensor name or metadata string is not valid Unicode")
    data_len = size - 8 - n
    tensors = {name: _tensor_info(path, name, entry, data_len) for name, entry in header.items()}
    spans = sorted(t.offsets for t in tensors.values() if t.offsets and t.nbytes)
    for (_, end), (begin, _) in itertools.pairwise(spans):
        if begin < end:
            raise _bad(path, "two tensors' data_offsets overlap")
    return tensors, {str(k): str(v) for k, v in meta.items()}, 8 + n


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _tensor_info(path: Path, name: str, entry: Any, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _bad(path, f"entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not _dtype_ok(dtype):
        raise _bad(path, f"tensor {name!r} has unknown dtype {_clip(dtype)}")
    if not _shape_ok(shape):
        raise _bad(path, f"tensor {name!r} has an invalid shape {_clip(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_len
    ):
        raise _bad(
            path,
            f"tensor {name!r} has data_offsets {_clip(offsets)} outside the {data_len} data bytes",
        )
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
        need = f"{bits // 8}" if bits < 10**30 else "more"
        raise _bad(
            path,
            f"tensor {name!r} ({dtype} {_clip(shape)}) needs {need} bytes but its data_offsets "
            f"span {offsets[1] - offsets[0]}",
        )
    return TensorInfo(name, dtype, tuple(shape), path.name, (offsets[0], offsets[1]))


# safetensors stores dimensions as 64-bit unsigned integers; larger ones can only be hostile.
MAX_DIM = 2**64 - 1
MAX_DIMS = 64


def _dtype_ok(dtype: object) -> TypeGuard[str]:
    return isinstance(dtype, str) and dtype in DTYPE_BITS


def _shape_ok(shape: object) -> TypeGuard[list[int]]:
    return (
        isinstance(shape, list)
        and len(shape) <= MAX_DIMS
        and all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)
    )


def _clip(value: Any) -> str:
    """A hostile value as a short quote: a header may hold megabytes in one field."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _bad(path: Path, why: str) -> BaseModelError:
    return BaseModelError(
        f"{path} is not a valid safetensors file: {why}; the file is corrupt or truncated "
        "(download it again)"
    )


# --------------------------------------------------------------------------------------
# Opening a base


def open_base(
    source: StrPath,
    *,
    revision: str | None = None,
    local_only: bool | None = None,
) -> BaseModel:
    """Read a base model's tensor table from safetensors headers (no tensor data).

    Args:
        source: a directory (``model.safetensors``, sharded ``model-0000x-of-0000y.safetensors``
            with its ``*.safetensors.index.json``, or any ``*.safetensors`` such as a diffusers
            ``unet/`` folder), one ``.safetensors`` file, or a Hub repo id.
        revision: branch, tag or commit of a Hub repo (not allowed with a local path).
        local_only: never contact the Hub; default: ``HF_HUB_OFFLINE``.

    Returns:
        A ``BaseModel``; for a Hub repo not in the local cache, one with ``root=None``.

    Raises:
        BaseNotFound: no such path, or a repo or revision that is neither cached nor on the
            Hub (a ``BaseModelError`` too).
        BaseModelError: pickle-only checkpoint, broken index or header, a Hub that cannot be
            reached.

    Example:
        >>> base = open_base("meta-llama/Llama-3.2-1B")  # doctest: +SKIP
        >>> base.signature, len(base.tensors)  # doctest: +SKIP
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        if revision is not None:
            raise BaseModelError(f"--revision applies to Hub repos, but {text!r} is a local path")
        return _open_local(text, path)
    if isinstance(source, Path) or not _looks_like_repo_id(text):
        raise BaseNotFound(
            f"base model {text!r} not found: no such file or directory (and it is not a "
            "Hub repo id like 'org/name')"
        )
    return _open_hub(text, revision, local_only)


def _open_local(source: str, path: Path) -> BaseModel:
    # Absolute but not resolved: in the Hugging Face cache every snapshot file is a symlink
    # to a blob with a hash for a name, and the snapshot folder is what names the files.
    path = path.absolute()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise _unsupported_file(path)
        tensors, _, _ = read_header(path)
        return BaseModel(source, path.parent, (path.name,), MappingProxyType(tensors))
    if not path.is_dir():
        raise BaseModelError(f"base model {source!r} is neither a file nor a directory")
    names = sorted(p.name for p in path.iterdir() if p.is_file())
    if "adapter_config.json" in names:
        raise BaseModelError(
            f"{path} holds a LoRA adapter (adapter_config.json), not a base model; pass the "
            "base model it was trained on"
        )
    index = _pick_index(path, names)
    if index is not None:
        files = _files_from_index(path, index)
    elif "model.safetensors" in names:
        files = ["model.safetensors"]
    else:
        files = [n for n in names if n.endswith(".safetensors")]
    if not files:
        raise _no_safetensors(path, names)
    tensors = {}
    for name in files:
        for tname, info in read_header(path / name)[0].items():
            if tname in tensors:
                raise BaseModelError(
                    f"tensor {tname!r} is in both {tensors[tname].file} and {name} under {path}; "
                    "pass the one .safetensors file (or the index) that is the checkpoint"
                )
            tensors[tname] = TensorInfo(tname, info.dtype, info.shape, name, info.offsets)
    if index is not None:
        _check_index(path, index, tensors)
    return BaseModel(source, path, tuple(sorted(files)), MappingProxyType(tensors))


def _pick_index(root: Path, names: list[str]) -> str | None:
    if "model.safetensors.index.json" in names:
        return "model.safetensors.index.json"
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    if len(indexes) > 1:
        raise BaseModelError(
            f"{root} has several shard indexes ({', '.join(indexes)}); pass the checkpoint file "
            "you mean, or a directory with one index"
        )
    return indexes[0] if indexes else None


def _load_index(root: Path, index: str) -> dict[str, str]:
    try:
        data = json.loads((root / index).read_text())
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise TypeError("weight_map is not a name -> file object")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise BaseModelError(f"cannot read the shard index {root / index}: {e}") from e
    return weight_map


def _files_from_index(root: Path, index: str) -> list[str]:
    files = sorted(set(_load_index(root, index).values()))
    for name in files:
        # Judged as written, not resolved: cache snapshots link their shards to blobs elsewhere.
        if Path(name).is_absolute() or ".." in Path(name).parts or "\\" in name:
            raise BaseModelError(f"{root / index} names a shard outside {root}: {name!r}")
        shard = root / name
        if not shard.is_file():
            raise BaseModelError(
                f"shard {name!r} named in {root / index} is missing; the download is incomplete "
                "(download the model again)"
            )
    return files


def _check_index(root: Path, index: str, tensors: Mapping[str, TensorInfo]) -> None:
    for tname, shard in _load_index(root, index).items():
        info = tensors.get(tname)
        if info is None or info.file != shard:
            where = f"it is in {info.file}" if info else "no shard has it"
            raise BaseModelError(
                f"{root / index} says tensor {tname!r} is in {shard!r}, but {where}; the index "
                "does not belong to these shards (download the model again)"
            )


def _no_safetensors(path: Path, names: list[str]) -> BaseModelError:
    pickles = [n for n in names if n.endswith(_PICKLE_SUFFIXES)]
    if pickles:
        return BaseModelError(
            f"{path} has only pickle weights ({', '.join(pickles[:3])}); .bin bases are not "
            "supported because loading them can run code. Convert once to safetensors, e.g. "
            '`python -c "from transformers import AutoModel; AutoModel.from_pretrained('
            f"'{path}').save_pretrained('{path}-safetensors')\"` and use the new directory"
        )
    subdirs = sorted(p.name for p in path.iterdir() if p.is_dir() and any(p.glob("*.safetensors")))
    hint = (
        f"; it looks like a pipeline: pass a component folder such as {path / subdirs[0]}"
        if subdirs
        else ""
    )
    return BaseModelError(f"no .safetensors files in {path}{hint}")


def _unsupported_file(path: Path) -> BaseModelError:
    if path.suffix in _PICKLE_SUFFIXES:
        return BaseModelError(
            f"{path} is a pickle checkpoint; .bin bases are not supported because loading them "
            "can run code. Convert once with safetensors (`safetensors.torch.save_file("
            "torch.load(p, weights_only=True), 'model.safetensors')`) and pass that file"
        )
    return BaseModelError(f"{path} is not a .safetensors file; lorahub reads safetensors bases")


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return (
        1 <= len(parts) <= 2
        and all(parts)
        and not text.startswith((".", "~"))
        and not text.endswith((".safetensors", ".json", ".bin"))
        and all(c.isalnum() or c in "-_." for p in parts for c in p)
    )


# --------------------------------------------------------------------------------------
# Hub


def _open_hub(repo_id: str, revision: str | None, local_only: bool | None) -> BaseModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError

    offline = hfenv.offline() if local_only is None else local_only or hfenv.offline()
    cached: str | None = None
    why = ""
    try:
        cached = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=hfenv.hub_cache(),
            allow_patterns=["*.safetensors", "*.json"],
            local_files_only=True,
        )
    except HFValidationError as e:
        raise BaseModelError(f"{repo_id!r} is not a local path nor a valid Hub repo id") from e
    except IncompleteSnapshotError as e:
        why = "the cached snapshot is incomplete"
        log.debug("cached snapshot of %s is incomplete: %s", repo_id, e)
    except Exception as e:  # LocalEntryNotFoundError and friends: not cached
        log.debug("%s@%s not in the local HF cache: %s", repo_id, revision, e)
    if cached is not None:
        root = Path(cached)
        try:
            base = _open_local(repo_id, root)
        except BaseModelError as e:
            if offline:
                raise
            why = str(e)
        else:
            return BaseModel(repo_id, base.root, base.files, base.tensors, repo_id, root.name)
    rev = f" at revision {revision!r}" if revision else ""
    if offline:
        raise BaseNotFound(
            f"{repo_id!r} is not a local path, and {repo_id}{rev} is not in the local Hugging "
            "Face cache"
            + (f" ({why})" if why else "")
            + f" and the Hub may not be contacted (offline); run `hf download {repo_id}"
            + (f" --revision {revision}" if revision else "")
            + "` while online, or pass a local path"
        )
    return _open_remote(repo_id, revision)


def _open_remote(repo_id: str, revision: str | None) -> BaseModel:
    """The tensor table from the Hub's safetensors headers: no weights are downloaded."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HTTPError,
        NotASafetensorsRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        SafetensorsParsingError,
    )

    api = HfApi()
    rev = f" at revision {revision!r}" if revision else ""
    try:
        sha = api.model_info(repo_id, revision=revision).sha
        meta = api.get_safetensors_metadata(repo_id, revision=sha or revision)
    except RevisionNotFoundError as e:
        raise BaseNotFound(f"revision {revision!r} of {repo_id} does not exist on the Hub") from e
    except GatedRepoError as e:
        raise BaseModelError(
            f"{repo_id} is gated: accept its terms on the Hub and log in (`hf auth login`)"
        ) from e
    except RepositoryNotFoundError as e:
        raise BaseNotFound(
            f"{repo_id!r} is not a local path, and no such model repo is visible on the Hub "
            "(check the name, or log in for a private repo)"
        ) from e
    except NotASafetensorsRepoError as e:
        raise BaseModelError(
            f"{repo_id}{rev} has no safetensors weights; .bin bases are not supported"
        ) from e
    except SafetensorsParsingError as e:
        raise BaseModelError(
            f"the Hub's safetensors headers of {repo_id}{rev} are invalid: {e}"
        ) from e
    except ValueError as e:  # json's refusal of an integer of thousands of digits, and kin
        raise BaseModelError(
            f"the Hub's safetensors headers of {repo_id}{rev} are invalid: {_clip(str(e))}"
        ) from e
    except (OSError, HTTPError) as e:  # connection refused, timeouts, other HTTP statuses
        raise BaseModelError(
            f"{repo_id}{rev} is not in the local Hugging Face cache and the Hub could not be "
            f"reached ({e}); run `hf download {repo_id}` when online, or pass a local path"
        ) from e
    tensors: dict[str, TensorInfo] = {}
    for _, fmeta in sorted(meta.files_metadata.items()):
        for tname, t in fmeta.tensors.items():
            if tname in tensors:
                raise BaseModelError(f"tensor {tname!r} appears in two files of {repo_id}")
            if not (_is_text(tname) and _dtype_ok(t.dtype) and _shape_ok(t.shape)):
                raise BaseModelError(
                    f"the Hub's safetensors header of {repo_id}{rev} describes tensor "
                    f"{_clip(tname)} as {_clip(t.dtype)} {_clip(t.shape)}: not a valid tensor"
                )
            offsets = tuple(t.data_offsets) if t.data_offsets else None
            tensors[tname] = TensorInfo(tname, t.dtype, tuple(t.shape), None, offsets)  # type: ignore[arg-type]
    files = tuple(sorted(meta.files_metadata))
    return BaseModel(repo_id, None, files, MappingProxyType(tensors), repo_id, sha)


# --------------------------------------------------------------------------------------
# Content hash


def content_hash(
    base: BaseModel,
    *,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> Digest:
    """The content hash: every tensor's bytes hashed (xxh3-128), combined in name order.

    Independent of sharding and of the header layout. With ``cache_dir`` the result is
    remembered under the shards' absolute paths, sizes and mtimes, so asking again is free
    until a shard changes.

    Args:
        base: a local base (``root`` not None).
        cache_dir: where ``base-hashes.json`` lives; None: no caching.
        progress: called with ``(done_bytes, total_bytes)`` while hashing.

    Raises:
        BaseModelError: a remote-only base, or a shard that changed or vanished meanwhile.

    Example:
        >>> content_hash(open_base("./llama"), cache_dir=Path("~/.cache/lorahub"))  # doctest: +SKIP
    """
    if base.root is None:
        raise BaseModelError(
            f"{base.display} was read from the Hub's headers only; its content hash needs the "
            f"weights: run `hf download {base.repo_id}` and try again"
        )
    stats = _stat_files(base)
    key = hash_bytes(canonical_json(stats)).hex
    if cache_dir is not None:
        hit = _cache_get(Path(cache_dir), key)
        if hit is not None:
            if progress:
                progress(base.total_bytes, base.total_bytes)
            return hit
    digest = _hash_tensors(base, progress)
    if _stat_files(base) != stats:
        raise BaseModelError(
            f"a shard of {base.display} changed while it was being hashed; try again"
        )
    if cache_dir is not None:
        _cache_put(Path(cache_dir), key, digest, base, stats)
    return digest


def _stat_files(base: BaseModel) -> list[list[Any]]:
    assert base.root is not None
    out = []
    for name in base.files:
        path = base.root / name
        try:
            st = path.stat()
        except OSError as e:
            raise BaseModelError(f"shard {path} of {base.display} is gone: {e.strerror}") from e
        out.append([str(path.absolute()), st.st_size, st.st_mtime_ns])
    return out


def _hash_tensors(base: BaseModel, progress: Progress | None) -> Digest:
    """Hash each tensor in the order it lies on disk (sequential reads, which the kernel
    reads ahead), then combine the per-tensor digests in name order."""
    assert base.root is not None
    total = base.total_bytes
    done = 0
    digests: dict[str, bytes] = {}
    by_file: dict[str, list[tuple[tuple[int, int], str]]] = {}  # file: [(offsets, name)]
    for name, info in base.tensors.items():
        if info.file is None or info.offsets is None:
            raise BaseModelError(f"tensor {name!r} of {base.display} has no file location")
        by_file.setdefault(info.file, []).append((info.offsets, info.name))
    with _Shards(base.root) as shards:
        for file in sorted(by_file):
            for offsets, tname in sorted(by_file[file], key=lambda e: e[0]):
                h = xxhash.xxh3_128()
                for chunk in shards.ranges(file, offsets):
                    h.update(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
                digests[tname] = h.digest()
    if progress and total == 0:
        progress(0, 0)
    return combine_tensor_digests(digests)


def combine_tensor_digests(digests: Mapping[str, bytes]) -> Digest:
    """The content hash from each tensor's raw xxh3-128 digest: names and digests in name
    order, hashed again. Independent of sharding and of the order tensors lie on disk."""
    h = Hasher()
    for name in sorted(digests):
        h.update(name.encode() + b"\0" + digests[name])
    return h.digest()


class _Shards:
    """Memory-mapped shards, opened on first use, advised for sequential reading."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._maps: dict[str, tuple[mmap.mmap | None, int]] = {}

    def __enter__(self) -> _Shards:
        return self

    def __exit__(self, *exc: object) -> None:
        for m, _ in self._maps.values():
            if m is not None:
                m.close()
        self._maps.clear()

    def _open(self, file: str) -> tuple[mmap.mmap | None, int]:
        if file not in self._maps:
            path = self.root / file
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                (n,) = struct.unpack("<Q", f.read(8))
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
            if m is not None and hasattr(mmap, "MADV_SEQUENTIAL"):
                m.madvise(mmap.MADV_SEQUENTIAL)
            self._maps[file] = (m, 8 + n)
        return self._maps[file]

    def ranges(self, file: str, offsets: tuple[int, int]) -> Iterator[memoryview]:
        m, start = self._open(file)
        begin, end = start + offsets[0], start + offsets[1]
        if begin == end:
            return
        if m is None or end > len(m):
            raise BaseModelError(f"{self.root / file} is shorter than its header says; it changed")
        with memoryview(m) as view:
            for pos in range(begin, end, HASH_CHUNK):
                with view[pos : min(pos + HASH_CHUNK, end)] as chunk:
                    yield chunk


def _cache_path(cache_dir: Path) -> Path:
    return cache_dir / CACHE_FILE


def _cache_read(cache_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads(_cache_path(cache_dir).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable base hash cache %s: %s", _cache_path(cache_dir), e)
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    return entries if isinstance(entries, dict) else {}


def _cache_get(cache_dir: Path, key: str) -> Digest | None:
    entry = _cache_read(cache_dir).get(key)
    if not isinstance(entry, dict):
        return None
    try:
        return Digest.parse(str(entry.get("digest")))
    except ValueError:
        return None


def _cache_put(
    cache_dir: Path, key: str, digest: Digest, base: BaseModel, stats: list[list[Any]]
) -> None:
    from filelock import FileLock

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # The lock only stops two writers from dropping each other's entries; readers never
        # need it because the file is replaced atomically.
        with FileLock(str(_cache_path(cache_dir)) + ".lock", timeout=30):
            entries = _cache_read(cache_dir)
            entries[key] = {
                "digest": str(digest),
                "bytes": base.total_bytes,
                "source": base.source,
                "files": stats,
                "time": time.time(),
            }
            if len(entries) > CACHE_MAX_ENTRIES:
                keep = sorted(entries, key=lambda k: entries[k].get("time", 0))[-CACHE_MAX_ENTRIES:]
                entries = {k: entries[k] for k in keep}
            data = canonical_json({"version": 1, "entries": entries})
            write_atomic(_cache_path(cache_dir), data, mode=0o600)  # lists the user's paths
    except Exception as e:  # a cache that cannot be written only costs a rehash next time
        log.warning("could not update the base hash cache in %s: %s", cache_dir, e)


def state_dict_hash(tensors: Mapping[str, Any]) -> Digest:
    """The content hash of an in-memory state dict (torch tensors), as ``content_hash``
    would compute it for a checkpoint holding exactly these tensors."""
    import torch

    digests = {}
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        digests[name] = xxhash.xxh3_128_digest(memoryview(raw))
    return combine_tensor_digests(digests)
