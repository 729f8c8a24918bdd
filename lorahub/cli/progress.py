"""The one place the CLI draws progress bars: huggingface_hub's ``tqdm`` on stderr.

A bar shows bytes (or modules, adapters), the rate and the time left, like the ``hf`` CLI's
transfer bars. It is drawn only when all of these hold:

* stderr is a terminal (a pipe or a file gets no bar);
* the command was not given ``-q/--quiet`` or ``--json`` (read from the click context, so a
  command gets this by declaring those options);
* ``HF_HUB_DISABLE_PROGRESS_BARS`` is not true, as set now or as huggingface_hub read it, and
  huggingface_hub's ``disable_progress_bars()`` (globally or for the ``lorahub`` group) was not
  called.

The library only calls ``progress(done, total)`` (:data:`lorahub.aliases.Progress`); it never
draws or prints. Example::

    with progress_bar("merging") as cb:
        hub.merge(base, adapters, out=out, progress=cb)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from ..aliases import Progress

if TYPE_CHECKING:
    from huggingface_hub.utils import tqdm as Tqdm

#: The huggingface_hub progress-bar group of lorahub's bars: ``disable_progress_bars("lorahub")``.
GROUP = "lorahub"

_TRUE = frozenset({"1", "ON", "YES", "TRUE"})  # huggingface_hub's "true" values


def _hf_disabled() -> bool:
    """``HF_HUB_DISABLE_PROGRESS_BARS`` as set now, else huggingface_hub's own state (the
    variable as read at its import, and ``disable_progress_bars()``)."""
    env = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    if env is not None and env.strip():
        return env.strip().upper() in _TRUE
    from huggingface_hub.utils import are_progress_bars_disabled

    return are_progress_bars_disabled(GROUP)


def _flag(name: str) -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.params.get(name))


def enabled(quiet: bool = False) -> bool:
    """Whether a bar may be drawn now (see the module docstring); ``quiet`` turns it off too."""
    if quiet or _flag("quiet") or _flag("as_json"):
        return False
    if not sys.stderr.isatty():
        return False
    return not _hf_disabled()


def _screen() -> tuple[int, int]:
    """The terminal's columns and lines; 80 x 24 where it reports none (a new
    pseudo-terminal says 0 x 0, and tqdm then draws nothing)."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):
        return 80, 24
    return size.columns or 80, size.lines or 24


@contextmanager
def progress_bar(desc: str, *, unit: str = "B", quiet: bool = False) -> Iterator[Progress | None]:
    """A ``progress(done, total)`` callback drawing a bar on stderr, or None where no bar
    is drawn (the library then skips the bookkeeping).

    Args:
        desc: the bar's label (``"merging"``).
        unit: ``"B"`` for bytes (scaled: kB, MB, GB, with a bytes rate), else the name of
            what is counted (``"module"``, ``"adapter"``).
        quiet: no bar regardless (besides the command's ``-q``/``--json``).

    The bar is made at the first call, so a command that fails before any work draws
    nothing; it is closed (left on screen) once ``done`` reaches ``total``, so its rate is
    the work's and not the wait after it, or else when the block ends. A later call
    starts a new bar.
    """
    if not enabled(quiet):
        yield None
        return
    from huggingface_hub.utils import tqdm

    bars: list[Tqdm] = []  # the bar being drawn, if any

    def update(done: int, total: int) -> None:
        if not bars:
            scaled = unit == "B"
            columns, lines = _screen()
            bars.append(
                tqdm(
                    total=total,
                    desc=desc,
                    unit=unit,
                    unit_scale=scaled,
                    file=sys.stderr,
                    ncols=columns,
                    nrows=lines,
                    disable=False,
                    name=GROUP,
                )
            )
        bar = bars[0]
        if bar.total != total:
            bar.total = total
        if done >= bar.n:
            bar.update(done - bar.n)
        else:  # a step started over: show where it is, not a negative rate
            bar.n = done
            bar.refresh()
        if total and done >= total:
            bar.close()
            bars.clear()

    try:
        yield update
    finally:
        if bars:
            bars[0].close()


def echo(message: str, *, err: bool = False) -> None:
    """``click.echo`` a line above any bar being drawn, which is redrawn below it."""
    if "tqdm" not in sys.modules:  # no bar was ever drawn
        click.echo(message, err=err)
        return
    from huggingface_hub.utils import tqdm

    with tqdm.external_write_mode(file=sys.stderr if err else sys.stdout):
        click.echo(message, err=err)
