"""The ``lorahub`` command line: thin click commands over ``lorahub.Hub``.

Every ``LorahubError`` becomes ``Error: ...`` on stderr and an exit status, in one place
(``LorahubGroup.invoke``, by the table in ``cli/errors.py``); ``LORAHUB_DEBUG=1`` (or
``HF_DEBUG=1``) shows the traceback instead. ``-v``/``-vv`` (or ``LORAHUB_LOG_LEVEL``) show
the library's log records (``cli/logs.py``). Shared options: ``cli/options.py``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from .._version import __version__
from ..errors import LorahubError
from .errors import EXIT_CODES_HELP, EXIT_INTERRUPTED, INTERRUPTED, debugging, report
from .options import environment_help, verbose_option

# The modules that register commands, in the order a command is looked for: `ls`, `show`
# and `resolve` load the first two only, never merge or compose code.
COMMAND_MODULES = (
    "store",
    "base",
    "path",
    "health",
    "remote",
    "merge",
    "compose",
    "env",
    "serve",
    "token",
    "migrate_store",
)


class LorahubGroup(click.Group):
    """A group that turns lorahub's errors into one line on stderr, and imports a command's
    module only when that command (or the list of all, for ``--help``) is asked for."""

    _pending: list[str] | None = None

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        while cmd_name not in self.commands and self._load_next():
            pass
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        while self._load_next():
            pass
        return super().list_commands(ctx)

    def _load_next(self) -> bool:
        """Register the next module's commands; False when every module is loaded."""
        if self._pending is None:
            self._pending = list(COMMAND_MODULES)
        if not self._pending:
            return False
        name = f"{__name__}.{self._pending.pop(0)}"
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            return True
        module.register(self)
        return True

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LorahubError as exc:
            if debugging():
                raise
            code, text = report(exc)
            click.echo(text, err=True)
            sys.exit(code)
        except KeyboardInterrupt:
            click.echo(INTERRUPTED, err=True)
            sys.exit(EXIT_INTERRUPTED)
        except Exception as exc:
            # A Ctrl-C that lands inside a library's cleanup (SQLAlchemy's commit) can come
            # out as that library's own error; it is still the user's interrupt.
            if not _interrupted(exc) or debugging():
                raise
            click.echo(INTERRUPTED, err=True)
            sys.exit(EXIT_INTERRUPTED)


def _interrupted(exc: BaseException) -> bool:
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__context__
    return False


EPILOG = "\n\n".join(
    (
        environment_help(
            (
                "LORAHUB_HOME",
                "LORAHUB_DATABASE_URL",
                "LORAHUB_LOG_LEVEL",
                "LORAHUB_DEBUG",
                "HF_DEBUG",
                "HF_HUB_DISABLE_PROGRESS_BARS",
            )
        )
        + "\n  (each command's --help lists the ones it reads)",
        EXIT_CODES_HELP,
        "\b\nShell completion (bash; zsh_source, fish_source likewise):\n"
        '  eval "$(_LORAHUB_COMPLETE=bash_source lorahub)"',
    )
)


@click.group(
    cls=LorahubGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=EPILOG,
)
@click.option(
    "--home",
    type=click.Path(file_okay=False),
    envvar="LORAHUB_HOME",
    help="Store directory (default: $LORAHUB_HOME, else the user data directory).",
)
@verbose_option
@click.version_option(__version__, prog_name="lorahub")
@click.pass_context
def cli(ctx: click.Context, home: str | None, verbose: int) -> None:
    """Store, check, merge, compose and share LoRA adapters.

    \b
    Example:
      lorahub add ./my-peft-adapter --name sql-expert:v1
      lorahub ls
    """
    import logging

    from . import logs

    ctx.call_on_close(logs.configure(verbose))
    ctx.obj = {"home": home}
    logging.getLogger(__name__).debug(
        "lorahub %s, store %s, %s", __version__, home or "(default)", ctx.invoked_subcommand
    )


def main() -> None:
    """Console-script entry point."""
    import gc
    import logging

    from . import output

    # The library logs; the group's callback shows lorahub's records on stderr (cli/logs.py).
    if not debugging():
        # SQLAlchemy's pool logs a Ctrl-C that lands while it closes a connection as an
        # error with a traceback; the CLI already says "Interrupted.".
        logging.getLogger("sqlalchemy.pool").addHandler(logging.NullHandler())
    output.FREEZE_AFTER_IMPORT = True
    try:
        cli(prog_name="lorahub")
    finally:
        # Everything alive now lives until exit. Frozen, the interpreter's last collection
        # skips torch's object graph: 0.4 s off every command that imported it.
        gc.freeze()
