"""The ``lorahub`` command line: thin click commands over ``lorahub.Hub``.

Every ``LorahubError`` becomes ``Error: ...`` on stderr and exit status 1, in one place
(``LorahubGroup.invoke``); ``LORAHUB_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from ..errors import LorahubError


class LorahubGroup(click.Group):
    """A group that turns lorahub's errors into one line on stderr."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LorahubError as exc:
            if os.environ.get("LORAHUB_DEBUG"):
                raise
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)


@click.group(cls=LorahubGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    type=click.Path(file_okay=False),
    envvar="LORAHUB_HOME",
    help="Store directory (default: $LORAHUB_HOME, else the user data directory).",
)
@click.version_option(package_name="lorahub", prog_name="lorahub")
@click.pass_context
def cli(ctx: click.Context, home: str | None) -> None:
    """Store, check, merge, compose and share LoRA adapters.

    \b
    Example:
      lorahub add ./my-peft-adapter --name sql-expert:v1
      lorahub ls
    """
    ctx.obj = {"home": home}


def _register() -> None:
    from . import store

    store.register(cli)
    for name in ("base", "merge", "compose", "remote"):
        try:
            module = __import__(f"{__name__}.{name}", fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            continue
        module.register(cli)


_register()


def main() -> None:
    """Console-script entry point."""
    import gc
    import logging

    # The library logs; the CLI shows lorahub's warnings as one plain line each on stderr.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    library = logging.getLogger("lorahub")
    library.addHandler(handler)
    library.setLevel(logging.WARNING)
    library.propagate = False
    try:
        cli(prog_name="lorahub")
    finally:
        # Everything alive now lives until exit. Frozen, the interpreter's last collection
        # skips torch's object graph: 0.4 s off every command that imported it.
        gc.freeze()
