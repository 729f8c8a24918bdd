"""Blobs on S3-compatible object storage (``LORAHUB_BLOBS_URL=s3://bucket/prefix``), with the
guarantees of the local blob directory (:mod:`lorahub.blobs`) and a local read-through cache.

Keys: ``<prefix>blobs/xxh128/<2 hex>/<30 hex>`` hold blobs, ``<prefix>tmp/<uuid>`` uploads in
flight, ``<prefix>quarantine/<hex>`` blobs ``fsck`` found damaged. A digest key only ever holds
full, verified bytes: the bytes are written to a local temp file and hashed there first, then
uploaded to a temp key (boto3's managed transfer: multipart past the part size, each part
checksummed by the client and the server), then copied server-side to the digest key. An S3
object, single or multipart, appears only when complete, so a killed upload leaves at most a
temp key or an incomplete multipart upload, which ``gc`` removes once older than its grace.

As in the local store, a name is an xxh3 digest, which is not cryptographic: when an object of
that name exists, new bytes are compared with it byte for byte (streamed) before they are dropped
as duplicates; a damaged object is replaced, a colliding one refused. Dropping a duplicate copies
the object onto itself, which refreshes its ``LastModified``, so a concurrent ``gc`` (which holds
the catalog's write lock while it deletes and checks that time again) sees it as young. Stores on
several hosts may share one bucket only with one shared catalog (``LORAHUB_DATABASE_URL``): gc
deletes what its catalog does not use.

Reads go through ``<home>/blobcache/`` (the local layout): an object is streamed into a temp file,
hashed while it arrives, and published in the cache only when it hashes to its name, so merge,
export, ``path`` and ``serve`` get a local file and a damaged object is an error, never data.
Readers of one uncached blob fetch it once: the others (threads, or processes sharing the
cache) wait on its fetch lock, then read the cache file. The cache keeps at most
``cache_max_bytes``: the files used least recently (by mtime, refreshed on each use) go first; a
file used in the last minute is kept, since a reader may be about to open it. Cache files are
only ever copies: evicting one loses nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qsl, urlsplit

from .blobs import BlobInfo, BlobStore, _read_only, _same_bytes, check_expected
from .digest import ALGO, CHUNK, Digest, Hasher, hash_file
from .errors import BlobCollision, CorruptData, IntegrityError, InvalidArgument, StoreError

log = logging.getLogger(__name__)

DEFAULT_PART_SIZE = 64 << 20
MIN_PART_SIZE = 5 << 20  # S3's smallest part but the last
RECENT_USE_S = 60.0  # a cache file used this recently is not evicted
UPLOAD_ATTEMPTS = 3
_QUERY = ("endpoint", "region", "part_size")


@dataclass(frozen=True)
class S3Location:
    """Where blobs live: a bucket, a key prefix ("" or ending in "/"), and how to reach it."""

    bucket: str
    prefix: str
    endpoint: str | None = None
    region: str | None = None
    part_size: int = DEFAULT_PART_SIZE

    @property
    def url(self) -> str:
        """The location without its query, safe to print (it never holds a secret)."""
        return f"s3://{self.bucket}/{self.prefix}"


def parse_blobs_url(url: str, what: str = "LORAHUB_BLOBS_URL") -> S3Location:
    """``s3://bucket[/prefix][?endpoint=URL&region=NAME&part_size=SIZE]``. The endpoint and
    region default to boto3's own settings (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``,
    ``AWS_REGION``...); credentials come only from boto3's chain, never from the URL.
    ``what`` names the setting in messages.

    Raises:
        InvalidArgument: not an ``s3://`` URL, a bad bucket, credentials or an unknown
            parameter in it (named, its value never repeated).

    Example:
        >>> parse_blobs_url("s3://team-lora/hub?region=eu-west-1").prefix
        'hub/'
    """
    from .units import parse_size

    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise InvalidArgument(
            f"{what} must be an s3:// URL (s3://bucket/prefix), not {parts.scheme!r}"
        )
    if "@" in parts.netloc:
        raise InvalidArgument(
            f"{what} must not hold credentials; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) instead"
        )
    bucket = parts.netloc
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise InvalidArgument(f"{what}: {bucket!r} is not an S3 bucket name")
    prefix = parts.path.strip("/")
    if any(p in ("", ".", "..") for p in prefix.split("/")) and prefix:
        raise InvalidArgument(f"{what}: bad key prefix {prefix!r}")
    query: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in _QUERY:
            raise InvalidArgument(
                f"{what}: unknown parameter {key!r} (known: {', '.join(_QUERY)}); "
                "credentials come from the AWS variables, never the URL"
            )
        query[key] = value
    part_size = parse_size(query["part_size"]) if "part_size" in query else DEFAULT_PART_SIZE
    if part_size < MIN_PART_SIZE:
        raise InvalidArgument(f"{what}: part_size must be at least {MIN_PART_SIZE}")
    return S3Location(
        bucket,
        f"{prefix}/" if prefix else "",
        endpoint=query.get("endpoint") or None,
        region=query.get("region") or None,
        part_size=part_size,
    )


def _not_found(exc: Exception) -> bool:
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound", "NoSuchUpload")


@dataclass
class _FetchLock:
    """The lock of one digest's fetch, and how many threads hold or wait for it."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0


class S3BlobStore(BlobStore):
    """Blobs in an S3 bucket; ``path`` names the local cache file, which may be absent."""

    recent_use_s = RECENT_USE_S

    def __init__(
        self,
        location: S3Location,
        cache: Path,
        tmp: Path,
        *,
        cache_max_bytes: int,
        client: Any = None,
    ) -> None:
        super().__init__(cache, tmp)
        self.location = location
        self._fetch_locks: dict[str, _FetchLock] = {}  # by hex digest, while in use
        self._fetch_locks_guard = threading.Lock()
        self.cache_max_bytes = cache_max_bytes
        self._client = client

    def __repr__(self) -> str:
        return f"S3BlobStore({self.location.url!r})"

    # ----------------------------------------------------------------- the client

    @property
    def client(self) -> Any:
        """The boto3 S3 client, made on first use (boto3 is the ``s3`` extra)."""
        if self._client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise StoreError(
                    "LORAHUB_BLOBS_URL is an s3:// URL, but boto3 is not installed; "
                    "pip install 'lorahub-store[s3]'"
                ) from None
            loc = self.location
            config = Config(
                retries={"mode": "standard"},  # AWS_MAX_ATTEMPTS still applies
                s3={"addressing_style": "path"} if loc.endpoint else {},
            )
            with self._errors("connecting to"):
                self._client = boto3.session.Session().client(
                    "s3", endpoint_url=loc.endpoint, region_name=loc.region, config=config
                )
        return self._client

    def _transfer(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        size = self.location.part_size
        return TransferConfig(multipart_threshold=size, multipart_chunksize=size)

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """botocore's errors as a StoreError naming the bucket; never a credential (botocore
        does not put them in its messages, and the URL holds none)."""
        try:
            yield
        except IntegrityError:
            raise
        except Exception as exc:
            mod = type(exc).__module__
            if not (
                mod.startswith("botocore")
                or mod.startswith("boto3")
                or mod.startswith("s3transfer")
            ):
                raise
            name = type(exc).__name__
            if name in ("NoCredentialsError", "PartialCredentialsError"):
                hint = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            elif name == "EndpointConnectionError":
                hint = "check AWS_ENDPOINT_URL (or ?endpoint= in LORAHUB_BLOBS_URL)"
            else:
                hint = "check the bucket, its permissions and the AWS settings"
            raise StoreError(
                f"{what} {self.location.url} failed: {_redact(str(exc))}; {hint}"
            ) from None

    def key(self, digest: Digest) -> str:
        return f"{self.location.prefix}blobs/{ALGO}/{digest.hex[:2]}/{digest.hex[2:]}"

    def _head(self, key: str) -> dict[str, Any] | None:
        with self._errors(f"reading {key} in"):
            try:
                head: dict[str, Any] = self.client.head_object(Bucket=self.location.bucket, Key=key)
                return head
            except Exception as exc:
                if _not_found(exc):
                    return None
                raise

    def _missing(self, digest: Digest) -> CorruptData:
        return CorruptData(
            f"blob {digest} is missing from {self.location.url}; run `lorahub verify`, then "
            "`lorahub fsck` to fetch it again from its source",
            expected=str(digest),
        )

    # ----------------------------------------------------------------- queries

    def exists(self, digest: Digest) -> bool:
        return self._head(self.key(digest)) is not None

    def size(self, digest: Digest) -> int | None:
        head = self._head(self.key(digest))
        return None if head is None else int(head["ContentLength"])

    def __iter__(self) -> Iterator[BlobInfo]:
        base = f"{self.location.prefix}blobs/{ALGO}/"
        with self._errors("listing"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.location.bucket, Prefix=base
            )
            for page in pages:
                for obj in page.get("Contents", ()):
                    sub, _, rest = obj["Key"][len(base) :].partition("/")
                    try:
                        digest = Digest(sub + rest) if len(sub) == 2 else None
                    except ValueError:
                        continue
                    if digest is not None:
                        yield BlobInfo(digest, int(obj["Size"]), obj["LastModified"].timestamp())

    def any(self) -> bool:
        with self._errors("listing"):
            got = self.client.list_objects_v2(
                Bucket=self.location.bucket,
                Prefix=f"{self.location.prefix}blobs/{ALGO}/",
                MaxKeys=1,
            )
        return bool(got.get("KeyCount") or got.get("Contents"))

    # ----------------------------------------------------------------- writing

    def put_bytes(
        self,
        data: bytes | memoryview,
        digest: Digest | None = None,
        *,
        source: str = "",
        sync: bool = True,
    ) -> Digest:
        """As :meth:`BlobStore.put_bytes`; the bytes go through a local temp file."""

        def write(path: Path) -> None:
            with open(path, "xb") as f:
                f.write(data)

        return self.put_file(write, source=source, expect=digest)[0]

    def put_file(
        self,
        write: Callable[[Path], None],
        *,
        source: str = "",
        expect: Digest | None = None,
    ) -> tuple[Digest, int]:
        """As :meth:`BlobStore.put_file`: the file is hashed locally, then uploaded to a
        temp key and copied to its digest key; the local copy stays in the cache."""
        tmp = self.tmp / f"blob-{uuid.uuid4().hex}"
        try:
            with self.writing():
                write(tmp)
                digest, size = hash_file(tmp)
                check_expected(digest, expect)
                self._store(tmp, digest, size, source)
                _read_only(tmp)
                self._cache(tmp, digest)
                return digest, size
        except OSError as exc:
            if isinstance(exc, IntegrityError):
                raise
            raise StoreError(f"writing a blob failed: {exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _store(self, local: Path, digest: Digest, size: int, source: str) -> None:
        key = self.key(digest)
        head = self._head(key)
        if head is not None:
            if (
                int(head["ContentLength"]) == size
                and self._object_equals(key, local)
                and self._touch(key)
            ):
                return
            actual = self._hash_object(key)
            if actual == digest:
                raise BlobCollision(
                    f"the bytes of {source or 'the new adapter'} hash to {digest}, like the "
                    f"blob already stored under that name in {self.location.url}, but differ "
                    "from it: an xxh3 collision, crafted or accidental. Nothing was stored and "
                    "the stored blob is unchanged",
                    str(digest),
                )
            log.warning(
                "blob %s was damaged in %s; replaced by a good copy", digest, self.location.url
            )
        self._upload(local, key)

    def _upload(self, local: Path, key: str) -> None:
        """Upload to a temp key, then copy server-side to ``key``: the digest key appears
        complete or not at all, whatever kills the upload."""
        bucket = self.location.bucket
        for attempt in range(UPLOAD_ATTEMPTS):
            # The start time in the name: gc judges an upload's age by it too.
            tmp_key = f"{self.location.prefix}tmp/{int(time.time())}-{uuid.uuid4().hex}"
            with self._errors(f"uploading {key} to"):
                try:
                    self.client.upload_file(str(local), bucket, tmp_key, Config=self._transfer())
                    self.client.copy(
                        {"Bucket": bucket, "Key": tmp_key}, bucket, key, Config=self._transfer()
                    )
                    break
                except Exception as exc:
                    # Another host's gc, with a grace shorter than this upload, took the temp
                    # key or aborted the upload: the local file is still here, send it again.
                    if attempt + 1 < UPLOAD_ATTEMPTS and _not_found(exc):
                        log.warning("upload of %s was cleaned away mid-way; retrying", key)
                        continue
                    raise
                finally:
                    with contextlib.suppress(Exception):
                        self.client.delete_object(Bucket=bucket, Key=tmp_key)
        # Gone already: a gc with no grace took it, and the add re-checks under the
        # catalog's write lock (storing.py). Another size: the server lost our bytes.
        head = self._head(key)
        if head is not None and int(head["ContentLength"]) != local.stat().st_size:
            raise StoreError(
                f"uploading {key} to {self.location.url} failed: the object holds "
                f"{head['ContentLength']} bytes, not {local.stat().st_size}"
            )

    def _touch(self, key: str) -> bool:
        """Copy the object onto itself: its LastModified becomes now (gc's grace counts
        from it), its bytes stay. False when a gc deleted it meanwhile."""
        bucket = self.location.bucket
        with self._errors(f"refreshing {key} in"):
            try:
                self.client.copy(
                    {"Bucket": bucket, "Key": key},
                    bucket,
                    key,
                    ExtraArgs={
                        "MetadataDirective": "REPLACE",
                        "Metadata": {"lorahub-used": str(int(time.time()))},
                    },
                    Config=self._transfer(),
                )
            except Exception as exc:
                if _not_found(exc):
                    return False
                raise
        return True

    # ----------------------------------------------------------------- reading

    def _chunks(self, key: str) -> Iterator[bytes]:
        """The object's bytes in chunks of at most ``CHUNK``: memory stays bounded."""
        with self._errors(f"reading {key} in"):
            try:
                body = self.client.get_object(Bucket=self.location.bucket, Key=key)["Body"]
            except Exception as exc:
                if _not_found(exc):
                    raise FileNotFoundError(key) from None
                raise
            try:
                yield from body.iter_chunks(CHUNK)
            finally:
                body.close()

    def _hash_object(self, key: str) -> Digest | None:
        h = Hasher()
        try:
            for chunk in self._chunks(key):
                h.update(chunk)
        except FileNotFoundError:
            return None
        return h.digest()

    def _object_equals(self, key: str, local: Path) -> bool:
        with open(local, "rb") as f:
            try:
                for chunk in self._chunks(key):
                    if f.read(len(chunk)) != chunk:
                        return False
            except FileNotFoundError:
                return False
            return f.read(1) == b""

    def local_path(self, digest: Digest) -> Path:
        """The cache file, fetched (and verified while it arrives) when not there."""
        path = self.path(digest)
        if path.is_file():
            _used(path)
            return path
        return self._fetch(digest)

    def checked_path(self, digest: Digest) -> Path:
        """The cache file once its bytes hash to its name: a cache file damaged on disk is
        fetched again; a damaged or missing object is an error, never data."""
        path = self.path(digest)
        with contextlib.suppress(FileNotFoundError):
            if hash_file(path)[0] == digest:
                _used(path)
                return path
            log.warning("cached blob %s was damaged on disk; fetching it again", digest)
            path.unlink()
        return self._fetch(digest)

    def _fetch(self, digest: Digest) -> Path:
        """Fetch one object into the cache, once: concurrent readers of the same uncached
        blob (threads, and processes sharing the cache) wait for the one fetching it, then
        find it cached, instead of each downloading it to a temp copy of its own."""
        with self._fetching(digest):
            path = self.path(digest)
            if path.is_file():  # another reader fetched it while we waited
                _used(path)
                return path
            return self._download(digest)

    @contextlib.contextmanager
    def _fetching(self, digest: Digest) -> Iterator[None]:
        """Hold the fetch lock of ``digest``: a lock per digest among this process's
        threads, then a file lock shared with other processes, one per 65536th of the key
        space (never deleted: deleting a lock file another process has open breaks it)."""
        from filelock import FileLock

        with self._fetch_locks_guard:
            entry = self._fetch_locks.setdefault(digest.hex, _FetchLock())
            entry.users += 1
        try:
            with entry.lock:
                try:
                    locks = self.root / ".locks"
                    locks.mkdir(parents=True, exist_ok=True)
                    lock = FileLock(str(locks / f"fetch-{digest.hex[:4]}.lock"))
                    lock.acquire()
                except OSError as exc:  # a cache folder we cannot lock in: fetch unlocked
                    log.debug("no fetch lock under %s: %s", self.root, exc)
                    yield
                    return
                try:
                    yield
                finally:
                    lock.release()
        finally:
            with self._fetch_locks_guard:
                entry.users -= 1
                if entry.users == 0:
                    self._fetch_locks.pop(digest.hex, None)

    def _download(self, digest: Digest) -> Path:
        key = self.key(digest)
        log.info("fetching blob %s from %s", digest, self.location.url)
        tmp = self.tmp / f"fetch-{uuid.uuid4().hex}"
        h = Hasher()
        try:
            with self.writing():
                try:
                    with open(tmp, "xb") as f:
                        for chunk in self._chunks(key):
                            h.update(chunk)
                            f.write(chunk)
                except FileNotFoundError:
                    raise self._missing(digest) from None
                if h.digest() != digest:
                    raise CorruptData(
                        f"blob {digest} in {self.location.url} is corrupt (its content hashes "
                        f"to {h.digest()}); run `lorahub fsck` to fetch it again from its "
                        "source, or add the adapter again from its files",
                        expected=str(digest),
                        actual=str(h.digest()),
                    )
                _read_only(tmp)
                return self._cache(tmp, digest)
        except OSError as exc:
            if isinstance(exc, IntegrityError):
                raise
            raise StoreError(f"fetching blob {digest} into {self.root} failed: {exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _cache(self, tmp: Path, digest: Digest) -> Path:
        """Link a verified temp file into the cache, then evict down to the cap."""
        path = self.path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(tmp, path)
        except FileExistsError:
            if not _same_bytes(tmp, path):
                os.replace(tmp, path)  # a damaged cache file: ours is verified
        _used(path)
        self.evict(keep=path)
        return path

    def evict(self, keep: Path | None = None) -> int:
        """Delete cache files, least recently used first, until the cache holds at most
        ``cache_max_bytes``; returns the bytes freed."""
        files: list[tuple[float, int, str]] = []
        base = self.root / ALGO
        if not base.is_dir():
            return 0
        for sub in os.scandir(base):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(sub.path):
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat(follow_symlinks=False)
                    files.append((st.st_mtime, st.st_size, entry.path))
        total = sum(size for _, size, _ in files)
        freed = 0
        recent = time.time() - self.recent_use_s
        for mtime, size, path in sorted(files):
            if total - freed <= self.cache_max_bytes:
                break
            if mtime >= recent or (keep is not None and path == str(keep)):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                freed += size
        return freed

    def open(self, digest: Digest) -> BinaryIO:
        return open(self.checked_path(digest), "rb")

    def verify(self, digest: Digest, size: int | None = None, quick: bool = False) -> str | None:
        """Checks the object itself (its size; unless ``quick``, its bytes, streamed)."""
        head = self._head(self.key(digest))
        if head is None:
            return "missing"
        actual_size = int(head["ContentLength"])
        if size is not None and actual_size != size:
            return f"size is {actual_size}, expected {size}"
        if quick:
            return None
        actual = self._hash_object(self.key(digest))
        if actual is None:
            return "missing"
        if actual != digest:
            return f"content hashes to {actual}"
        return None

    # ----------------------------------------------------------------- deleting

    def delete(self, digest: Digest) -> None:
        with self._errors(f"deleting {self.key(digest)} in"):
            self.client.delete_object(Bucket=self.location.bucket, Key=self.key(digest))
        with contextlib.suppress(FileNotFoundError):
            self.path(digest).unlink()

    def delete_unless_young(self, digest: Digest, cutoff: float) -> bool | None:
        """As :meth:`BlobStore.delete_unless_young`, by the object's LastModified."""
        head = self._head(self.key(digest))
        if head is None:
            return None
        if head["LastModified"].timestamp() >= cutoff:
            return False
        self.delete(digest)
        return True

    def quarantine(self, digest: Digest, folder: Path) -> bool:
        """Move a damaged object to ``<prefix>quarantine/<hex>`` (``folder`` is for the
        local store); the cache file goes too."""
        bucket, key = self.location.bucket, self.key(digest)
        if self._head(key) is None:
            return False
        with self._errors(f"quarantining {key} in"):
            self.client.copy(
                {"Bucket": bucket, "Key": key},
                bucket,
                f"{self.location.prefix}quarantine/{digest.hex}",
                Config=self._transfer(),
            )
            self.client.delete_object(Bucket=bucket, Key=key)
        with contextlib.suppress(FileNotFoundError):
            self.path(digest).unlink()
        return True

    def sweep_temp(
        self, older_than: float, *, dry_run: bool = False
    ) -> list[tuple[Path | str, int]]:
        """The local temp files (see :meth:`BlobStore.sweep_temp`), then the temp keys and
        incomplete multipart uploads under the prefix older than ``older_than`` seconds.
        Another host's upload in flight holds no lock here: the grace alone protects it,
        so it must exceed the longest upload."""
        out = super().sweep_temp(older_than, dry_run=dry_run)
        cutoff = time.time() - older_than
        bucket, prefix = self.location.bucket, self.location.prefix
        with self._errors("cleaning temp keys in"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=f"{prefix}tmp/"
            )
            for page in pages:
                for obj in page.get("Contents", ()):
                    if obj["LastModified"].timestamp() >= cutoff:
                        continue
                    if not dry_run:
                        self.client.delete_object(Bucket=bucket, Key=obj["Key"])
                    out.append((f"s3://{bucket}/{obj['Key']}", int(obj["Size"])))
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=bucket, Prefix=prefix
            )
            for page in pages:
                for up in page.get("Uploads", ()):
                    latest, size = self._upload_state(up)
                    if latest >= cutoff:
                        continue
                    if not dry_run:
                        with contextlib.suppress(Exception):
                            self.client.abort_multipart_upload(
                                Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"]
                            )
                    out.append((f"s3://{bucket}/{up['Key']}?uploadId={up['UploadId']}", size))
        return out

    def _upload_state(self, upload: dict[str, Any]) -> tuple[float, int]:
        """An incomplete multipart upload's last sign of life (its start, the time in its
        temp key's name, its newest part) and the bytes its parts hold."""
        latest = upload["Initiated"].timestamp()
        stamp = upload["Key"].rpartition("/")[2].partition("-")[0]
        if stamp.isdigit():
            latest = max(latest, float(stamp))
        size = 0
        try:
            pages = self.client.get_paginator("list_parts").paginate(
                Bucket=self.location.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            )
            for page in pages:
                for part in page.get("Parts", ()):
                    size += int(part["Size"])
                    latest = max(latest, part["LastModified"].timestamp())
        except Exception as exc:
            if not _not_found(exc):  # completed or aborted meanwhile
                raise
        return latest, size


def _used(path: Path) -> None:
    """Mark a cache file as just used (its mtime is the LRU clock)."""
    with contextlib.suppress(OSError):
        os.utime(path)


def _redact(text: str) -> str:
    """An error text with anything that looks like a secret or a signed URL's query cut."""
    text = re.sub(
        r"(?i)(secret|signature|credential|token|password)[=:]\s*[^\s&,'\"]+", r"\1=***", text
    )
    return re.sub(r"(https?://)[^/@\s]+@", r"\1***@", text)
