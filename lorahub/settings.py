"""Settings read from the environment when an entry point runs, never at import time."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .aliases import StrPath

APP_NAME = "lorahub"
DEFAULT_MERGED_MAX_BYTES = 200 * 1024**3
DEFAULT_BLOBS_CACHE_MAX_BYTES = 20 * 1024**3


@dataclass(frozen=True)
class Settings:
    """Where the store lives and its limits; build with :func:`load`."""

    home: Path
    database_url: str | None = None
    merged_max_bytes: int = DEFAULT_MERGED_MAX_BYTES
    allow_symlinks: bool = False  # store folders that are links out of the store
    blobs_url: str | None = None  # s3://bucket/prefix: blobs on object storage
    blobs_cache_max_bytes: int = DEFAULT_BLOBS_CACHE_MAX_BYTES  # its local read-through cache

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'lorahub.db'}"


def default_home() -> Path:
    """``LORAHUB_HOME``, else the platform's user data directory."""
    env = os.environ.get("LORAHUB_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def load(home: StrPath | None = None) -> Settings:
    """Settings from arguments first, then the environment, then defaults."""
    max_bytes = os.environ.get("LORAHUB_MERGED_MAX_BYTES")
    cache_bytes = os.environ.get("LORAHUB_BLOBS_CACHE_MAX_BYTES")
    return Settings(
        home=Path(home).expanduser() if home is not None else default_home(),
        database_url=os.environ.get("LORAHUB_DATABASE_URL") or None,
        merged_max_bytes=_size(max_bytes) if max_bytes else DEFAULT_MERGED_MAX_BYTES,
        blobs_url=os.environ.get("LORAHUB_BLOBS_URL") or None,
        blobs_cache_max_bytes=(
            _size(cache_bytes, "LORAHUB_BLOBS_CACHE_MAX_BYTES")
            if cache_bytes
            else DEFAULT_BLOBS_CACHE_MAX_BYTES
        ),
        allow_symlinks=os.environ.get("LORAHUB_ALLOW_SYMLINKS", "").lower() in ("1", "true", "yes"),
    )


def _size(text: str, name: str = "LORAHUB_MERGED_MAX_BYTES") -> int:
    from .errors import InvalidArgument, LorahubError
    from .units import parse_size

    try:
        return parse_size(text)
    except LorahubError as exc:
        raise InvalidArgument(f"{name}: {exc}") from None
