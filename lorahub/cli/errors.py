"""How the CLI reports an error: one table from error family to exit status and message.

Every ``LorahubError`` becomes ``Error: <message>`` on stderr. The message already says what
went wrong and what to do; where it summarises a lower-level failure (a database or disk
error, a Hub request) that the traceback shows in full, one more line says how to see it.
Errors that are not ``LorahubError`` are bugs: the CLI lets them show, traceback and all.

Exit statuses (``lorahub --help`` lists them too)::

    0  success
    1  error: the operation failed (not found, conflict, corrupt data, the Hub, the store...)
    2  usage: a bad option, argument or --filter (click's own status for these), or a bad
       value of one (``InvalidArgument``: --weights, --dtype, an unknown --device, a size;
       a device this machine lacks, ``DeviceUnavailable``, is an error: 1)
    3  `lorahub check`: checked, and the adapter does not fit the base
    130  interrupted (Ctrl-C)

The table is the one place to give a family its own status.

Example::

    code, text = report(AdapterNotFound("sql:v9"))
    # 1, "Error: no adapter matches 'sql:v9'; see `lorahub ls` for what is stored"
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import (
    Conflict,
    CorruptData,
    Incompatible,
    InvalidArgument,
    InvalidInput,
    LorahubError,
    NotFound,
    RemoteError,
    StoreError,
)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2  # click's own status for a bad option or argument
EXIT_INCOMPATIBLE = 3  # `check`: the adapter was read and does not fit the base
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C

DEBUG_ENV = "LORAHUB_DEBUG"
HF_DEBUG_ENV = "HF_DEBUG"  # huggingface_hub's own debug switch shows tracebacks too
DEBUG_HINT = f"(set {DEBUG_ENV}=1 for the traceback)"
INTERRUPTED = "Interrupted."


@dataclass(frozen=True)
class Outcome:
    """What the CLI does with one family: its exit status, and whether a message that was
    raised from a lower-level error is followed by the debug hint."""

    family: type[LorahubError]
    code: int
    hint: bool


# First match wins: a leaf in two families (``RemoteConflict``) takes the earlier row, so
# the rows run from the most specific kind of failure to the most general.
TABLE: tuple[Outcome, ...] = (
    Outcome(Conflict, EXIT_ERROR, hint=False),
    Outcome(NotFound, EXIT_ERROR, hint=False),
    Outcome(Incompatible, EXIT_ERROR, hint=False),
    Outcome(InvalidArgument, EXIT_USAGE, hint=False),
    Outcome(InvalidInput, EXIT_ERROR, hint=False),
    Outcome(CorruptData, EXIT_ERROR, hint=False),
    Outcome(RemoteError, EXIT_ERROR, hint=True),
    Outcome(StoreError, EXIT_ERROR, hint=True),
    Outcome(LorahubError, EXIT_ERROR, hint=True),
)


def outcome(exc: LorahubError) -> Outcome:
    """The table's row for ``exc``: the first family it belongs to."""
    return next(row for row in TABLE if isinstance(exc, row.family))


def report(exc: LorahubError) -> tuple[int, str]:
    """The exit status and the stderr text (no trailing newline) for ``exc``."""
    row = outcome(exc)
    text = f"Error: {exc}"
    if row.hint and exc.__cause__ is not None:
        text += f"\n{DEBUG_HINT}"
    return row.code, text


#: The exit statuses as ``lorahub --help`` shows them (its epilog).
EXIT_CODES_HELP = (
    "\b\nExit status:\n"
    f"  {EXIT_OK:>3}  success\n"
    f"  {EXIT_ERROR:>3}  error (not found, conflict, corrupt data, Hub or store failure)\n"
    f"  {EXIT_USAGE:>3}  usage: a bad option, argument, --filter or option value\n"
    f"  {EXIT_INCOMPATIBLE:>3}  `lorahub check`: the adapter does not fit the base\n"
    f"  {EXIT_INTERRUPTED:>3}  interrupted (Ctrl-C)"
)


def debugging() -> bool:
    """True when the user asked for tracebacks: ``LORAHUB_DEBUG`` set (to anything but
    empty or 0), or huggingface_hub's ``HF_DEBUG``."""
    return any(
        os.environ.get(name, "").strip() not in ("", "0") for name in (DEBUG_ENV, HF_DEBUG_ENV)
    )
