"""Printing helpers for the CLI: tables, JSON and sizes (progress bars: :mod:`.progress`)."""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import InvalidArgument

if TYPE_CHECKING:
    from ..hub import Hub

# Set by the console entry point, whose process runs one command and exits (never under a
# test runner, whose process lives on): see hub_from.
FREEZE_AFTER_IMPORT = False


def hub_from(ctx: click.Context) -> Hub:
    """The Hub for this invocation, opened on first use (so ``--help`` never touches disk)."""
    root = ctx.find_root()
    obj = root.obj if isinstance(root.obj, dict) else {}
    if "hub" not in obj:
        from ..hub import Hub  # sqlalchemy is heavy: `--help` should not pay for it

        if FREEZE_AFTER_IMPORT:
            # What the imports made lives until exit anyway. Frozen, it is left out of the
            # collections that a listing of 10,000 adapters sets off (0.2 s of its time).
            gc.freeze()
        obj["hub"] = Hub(obj.get("home"))
        root.obj = obj
        ctx.call_on_close(obj["hub"].close)
    return obj["hub"]


def folder_path(path: str | Path) -> str:
    """A folder as ``-q`` prints it: its absolute path (links kept as given, not resolved)."""
    return str(Path(path).absolute())


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


_COMPACT = json.JSONEncoder(sort_keys=True, default=str)


def echo_json_list(items: Sequence[Any]) -> None:
    """A JSON array with one compact item per line, for listings of thousands: ``indent``
    makes ``json`` fall back from its C encoder to a Python one, several times slower."""
    if not items:
        click.echo("[]")
        return
    lines = ",\n  ".join(map(_COMPACT.encode, items))
    click.echo(f"[\n  {lines}\n]")


def table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> None:
    """Left-aligned columns, two spaces apart, like ``docker images``; written at once."""
    widths = [max(map(len, column)) for column in zip(headers, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    click.echo("\n".join(fmt.format(*row).rstrip() for row in (headers, *rows)))


def parse_duration(text: str) -> float:
    """``3600``, ``90s``, ``30m``, ``1h``, ``2d`` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    try:
        scale = units.get(text[-1:], 1)
        value = float(text[:-1] if scale != 1 or text[-1:] == "s" else text) * scale
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a duration like 90s, 30m, 1h") from None
    if value < 0:
        raise click.BadParameter(f"{text!r}: a duration cannot be negative")
    return value


def parse_weights(text: str | None, count: int) -> list[float] | None:
    """``--weights 1.0,0.5`` -> one float per adapter (None: the default of 1 each)."""
    if text is None:
        return None
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise InvalidArgument(f"--weights {text!r} must be numbers separated by commas") from None
    if not all(math.isfinite(v) for v in values):
        raise InvalidArgument(f"--weights {text!r}: each weight must be a finite number")
    if len(values) != count:
        raise InvalidArgument(
            f"--weights has {len(values)} values for {count} adapters; give one each"
        )
    return values
