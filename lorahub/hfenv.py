"""The Hugging Face settings lorahub needs, read on each call, in one place.

The settings stay huggingface_hub's (``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``, ``HF_HOME``,
``HF_ENDPOINT``, ``HF_HUB_DISABLE_IMPLICIT_TOKEN``); lorahub never invents its own. But
huggingface_hub reads the environment once, when it is imported, into
``huggingface_hub.constants``, so a program (or a test) that sets a variable afterwards would
see it ignored. Here the offline flag and the cache directory follow the environment as it is
now, falling back to what huggingface_hub read; callers pass the cache directory on to every
cache call so both libraries agree on it. The endpoint and the implicit-token flag are taken
from ``constants`` on each call: huggingface_hub uses them internally where lorahub cannot pass
them, so a second source would only let the two disagree.

Primitive: imports nothing of lorahub.
"""

from __future__ import annotations

import os

#: The values huggingface_hub reads as "true" in its ``HF_*`` flags.
_TRUE = frozenset({"1", "ON", "YES", "TRUE"})


def _expand(path: str) -> str:
    """A path as huggingface_hub expands it (``~`` and ``$VARS``)."""
    return os.path.expandvars(os.path.expanduser(path))


def offline() -> bool:
    """Whether the Hub may not be contacted: ``HF_HUB_OFFLINE`` as set now, else as read at
    import (or as patched on ``huggingface_hub.constants``)."""
    env = os.environ.get("HF_HUB_OFFLINE")
    if env is not None:
        return env.strip().upper() in _TRUE
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache() -> str:
    """The Hugging Face cache directory (``.../hub``), by huggingface_hub's precedence:
    ``HF_HUB_CACHE`` before ``HF_HOME``, each as set now, else as read at import.

    A ``constants.HF_HUB_CACHE`` that is not ``constants.HF_HOME/hub`` was set on its own (an
    ``HF_HUB_CACHE`` at import, or a patch) and so still beats a later ``HF_HOME``.
    """
    from huggingface_hub import constants

    env_cache = os.environ.get("HF_HUB_CACHE")
    if env_cache:
        return _expand(env_cache)
    read = str(constants.HF_HUB_CACHE)
    if read != os.path.join(str(constants.HF_HOME), "hub"):
        return read
    env_home = os.environ.get("HF_HOME")
    if env_home:
        return os.path.join(_expand(env_home), "hub")
    return read


def endpoint() -> str:
    """The Hub endpoint (``HF_ENDPOINT``, read by huggingface_hub at import), no trailing
    slash."""
    from huggingface_hub import constants

    return str(constants.ENDPOINT).rstrip("/")


def implicit_token_disabled() -> bool:
    """Whether read requests go without the user's token (``HF_HUB_DISABLE_IMPLICIT_TOKEN``)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_DISABLE_IMPLICIT_TOKEN)
