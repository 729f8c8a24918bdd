"""The CLI's logging: lorahub's log records as plain lines on stderr, at the level asked for.

The library logs through the ``lorahub`` loggers and never prints. The CLI shows them as one
line each on stderr (``warning: ...``, ``info: ...``, ``debug: lorahub.merge.writer: ...``):

* warnings and errors always;
* ``LORAHUB_LOG_LEVEL`` (``DEBUG``, ``INFO``, ``WARNING``, ``ERROR`` or a number) sets the
  level; ``-v`` (INFO) and ``-vv`` (DEBUG) on the ``lorahub`` group override it.

huggingface_hub logs through its own loggers and handler. Its warnings that only repeat
what lorahub reports itself (a repeated push's "No files have been modified since last
commit", which lorahub says as "unchanged ... nothing uploaded") are dropped, so lorahub's
output carries each fact once; :func:`hf_duplicates_dropped` does it around a call.

Example::

    ctx.call_on_close(configure(verbose=2))  # lorahub's DEBUG records on stderr
    with hf_duplicates_dropped():
        hub.push(...)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click

LOG_LEVEL_ENV = "LORAHUB_LOG_LEVEL"
#: huggingface_hub's warnings that repeat what lorahub reports itself, by their start.
HF_DUPLICATES = ("No files have been modified since last commit",)
#: The huggingface_hub loggers that emit them.
HF_LOGGERS = ("huggingface_hub.hf_api", "huggingface_hub._upload_pipeline")


class _StderrHandler(logging.Handler):
    """Writes through ``click.echo(err=True)``: to the stderr of the moment (a test runner
    swaps it), never to the one there was when the handler was made."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record), err=True)
        except Exception:  # a closed stderr must not turn a log line into a failure
            self.handleError(record)


class _Formatter(logging.Formatter):
    """``warning: message``; below INFO (``-vv``) the logger's name as well."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno < logging.INFO:
            text = f"{record.name}: {text}"
        text = f"{record.levelname.lower()}: {text}"
        if record.exc_info and record.levelno < logging.INFO:
            text += "\n" + self.formatException(record.exc_info)
        return text


def level_for(verbose: int) -> int:
    """The ``lorahub`` loggers' level: ``-vv`` DEBUG, ``-v`` INFO, else ``LORAHUB_LOG_LEVEL``,
    else WARNING. An unknown ``LORAHUB_LOG_LEVEL`` is a usage error."""
    if verbose >= 2:
        return logging.DEBUG
    if verbose == 1:
        return logging.INFO
    text = os.environ.get(LOG_LEVEL_ENV, "").strip()
    if not text:
        return logging.WARNING
    if text.isdigit():
        return int(text)
    level = logging.getLevelName(text.upper())
    if not isinstance(level, int):
        raise click.UsageError(
            f"{LOG_LEVEL_ENV}={text!r} is not a log level; use DEBUG, INFO, WARNING or ERROR"
        )
    return level


def configure(verbose: int = 0) -> Callable[[], None]:
    """Send the ``lorahub`` loggers' records at ``level_for(verbose)`` and above to stderr,
    for one command; returns what puts the logger back as it was (a process that runs
    several commands, a test runner's, gets each its own level and no stacked handlers)."""
    library = logging.getLogger("lorahub")
    level = level_for(verbose)
    saved = (library.level, library.propagate)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    library.addHandler(handler)
    library.setLevel(level)
    library.propagate = False

    def restore() -> None:
        library.removeHandler(handler)
        library.setLevel(saved[0])
        library.propagate = saved[1]

    return restore


class _DropDuplicates(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(HF_DUPLICATES)


@contextmanager
def hf_duplicates_dropped() -> Iterator[None]:
    """Within the block, huggingface_hub's warnings listed in :data:`HF_DUPLICATES` are
    dropped (the rest of its logging is untouched)."""
    drop = _DropDuplicates()
    loggers = [logging.getLogger(name) for name in HF_LOGGERS]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)
