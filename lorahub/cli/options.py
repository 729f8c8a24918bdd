"""The CLI's shared options, one definition each, with one meaning on every command.

* ``--json``: print the result as JSON, built from the result object's ``to_dict()``.
* ``-q/--quiet``: print identifiers only, one per line, and show no progress. The identifier
  is what a script passes on, one kind per object type:

  - an adapter: its digest reference ``@xxh128:...`` (``add``, ``ls``, ``show``, ``tag``,
    ``resolve``, ``pull``, ``compose``; ``rm``: each adapter that lost a name, once);
  - a folder a command makes or finds: its absolute path (``export``, each LoRA folder of
    ``export --layout vllm``, ``merge``, ``merged get``, ``path``);
  - a base model: its content hash, else its signature (``base add``, ``base ls``,
    ``base rm``); a merged checkpoint: its key (``merged ls``, ``merged rm``);
  - a blob: its digest ``xxh128:...`` (``verify``: each bad one; ``gc``: each deleted,
    then each leftover path); a pushed state: the commit URL (``push``);
  - a token: its name (``token ls``, ``token rm``); ``token add -q`` prints the secret,
    shown that once.

  Where the answer is not an object, ``-q`` prints no identifier: ``check -q`` prints
  nothing and its exit status is the answer (0 fits, 3 does not, 1 error), as ``grep -q``;
  ``fsck -q`` prints nothing unless something could not be recovered, then one line each.
  ``env`` has no ``-q`` (settings, not objects). Each command's help names its identifier.
* ``--base``: a base model, as a folder, a ``.safetensors`` file, a Hub repo id or a name
  recorded by ``lorahub base add``; each command's description says what it is used for.
* ``-v/--verbose`` (on the group): lorahub's log messages, ``-v`` INFO and ``-vv`` DEBUG.

Each is a decorator used like ``click.option``'s; those that take arguments also work bare::

    @click.command()
    @reference_argument()
    @base_option
    @quiet_option
    @json_option
    @env_vars("LORAHUB_HOME", "HF_TOKEN")
    def push(...): ...

``env_vars`` goes above ``@click.command()``: it appends an "Environment" section, listing
the variables the command reads, to the command's help.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, overload

import click

F = TypeVar("F", bound=Callable[..., Any])

#: Every environment variable the CLI reads, with what it does: one text each.
ENVIRONMENT: dict[str, str] = {
    "LORAHUB_HOME": "store directory (same as --home)",
    "LORAHUB_DATABASE_URL": "catalog database URL (default: SQLite inside the store)",
    "LORAHUB_BLOBS_URL": "s3://bucket/prefix: blobs on S3-compatible storage (default: the store)",
    "LORAHUB_BLOBS_CACHE_MAX_BYTES": "size cap of the local cache of blobs read from S3",
    "AWS_ENDPOINT_URL": "S3 endpoint for LORAHUB_BLOBS_URL (also AWS_ENDPOINT_URL_S3)",
    "AWS_ACCESS_KEY_ID": "S3 credentials, with AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)",
    "AWS_SECRET_ACCESS_KEY": "S3 secret key (never printed)",
    "AWS_PROFILE": "AWS profile boto3 reads S3 credentials from",
    "LORAHUB_MERGED_MAX_BYTES": "size cap of the merged-checkpoint cache",
    "LORAHUB_LOG_LEVEL": "lorahub's log level (DEBUG, INFO, WARNING...; -v/-vv override)",
    "LORAHUB_DEBUG": "1: show the traceback of an error",
    "HF_DEBUG": "1: as LORAHUB_DEBUG (and huggingface_hub's own debug logs)",
    "HF_TOKEN": "Hugging Face token (else the one saved by `hf auth login`)",
    "HF_ENDPOINT": "Hugging Face Hub URL (default https://huggingface.co)",
    "HF_HUB_OFFLINE": "1: never contact the Hub; use the Hugging Face cache only",
    "HF_HOME": "Hugging Face home (cache and saved token)",
    "HF_HUB_CACHE": "Hugging Face cache directory for repo ids",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1: no progress bars",
}

#: What every command that opens the store reads.
STORE_ENV = ("LORAHUB_HOME", "LORAHUB_DATABASE_URL", "LORAHUB_BLOBS_URL")
#: What a command whose blobs may live on S3 reads besides (``verify``, ``gc``, ``env``...).
S3_ENV = (
    "LORAHUB_BLOBS_CACHE_MAX_BYTES",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_PROFILE",
)
#: What a command that resolves Hub repo ids through the Hugging Face cache reads.
HF_CACHE_ENV = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE")
#: What a command that talks to the Hub reads.
HUB_ENV = ("HF_TOKEN", "HF_ENDPOINT", *HF_CACHE_ENV)

JSON_HELP = "Print the result as JSON."
QUIET_HELP = "Print only identifiers, one per line (see above); no progress."
BASE_HELP = "Base model: folder, .safetensors file, Hub repo id or recorded base name."
WEIGHTS_HELP = "One weight per adapter, comma-separated (default 1 each)."
DTYPE_HELP = "Output dtype (bfloat16, float16, float32); default: the base's."
DEVICE_HELP = "auto, cpu, cuda, cuda:1..."
BASE_MODEL_ID_HELP = (
    "The base's Hub repo id, written as base_model_name_or_path and the card's base_model "
    "(default: the recorded base's repo id, else the config's value when it is a repo id; "
    "never a local path)."
)


def json_option(f: F) -> F:
    """``--json``: the result as JSON (from its ``to_dict()``), into ``as_json``."""
    return click.option("--json", "as_json", is_flag=True, help=JSON_HELP)(f)


def quiet_option(f: F) -> F:
    """``-q/--quiet``: identifiers only, one per line, and no progress; into ``quiet``."""
    return click.option("-q", "--quiet", is_flag=True, help=QUIET_HELP)(f)


@overload
def base_option(f: F, /) -> F: ...
@overload
def base_option(*, required: bool = False) -> Callable[[F], F]: ...
def base_option(f: Any = None, /, *, required: bool = False) -> Any:
    """``--base``: a base model, into ``base``. Bare, or ``@base_option(required=True)``."""
    decorator = click.option("--base", "base", required=required, help=BASE_HELP)
    return decorator if f is None else decorator(f)


@overload
def base_model_id_option(f: F, /) -> F: ...
@overload
def base_model_id_option(*, prefix: str = "") -> Callable[[F], F]: ...
def base_model_id_option(f: Any = None, /, *, prefix: str = "") -> Any:
    """``--base-model-id REPO_ID``: the base's Hub repo id an output names (config and card),
    into ``base_model_id``. Bare, or ``@base_model_id_option(prefix="--layout peft: ")``."""
    decorator = click.option("--base-model-id", metavar="REPO_ID", help=prefix + BASE_MODEL_ID_HELP)
    return decorator if f is None else decorator(f)


def verbose_option(f: F) -> F:
    """``-v/--verbose`` (count): 1 shows lorahub's INFO logs, 2 its DEBUG logs."""
    return click.option(
        "-v",
        "--verbose",
        count=True,
        help="Show lorahub's log messages: -v info, -vv debug (or set LORAHUB_LOG_LEVEL).",
    )(f)


def yes_option(f: F) -> F:
    """``-y/--yes``: do not ask for confirmation."""
    return click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")(f)


def weights_option(f: F) -> F:
    """``-w/--weights``: one weight per adapter, comma-separated."""
    return click.option("-w", "--weights", help=WEIGHTS_HELP)(f)


def dtype_option(f: F) -> F:
    """``--dtype``: the output dtype."""
    return click.option("--dtype", help=DTYPE_HELP)(f)


@overload
def device_option(f: F, /) -> F: ...
@overload
def device_option(*, default: str = "auto") -> Callable[[F], F]: ...
def device_option(f: Any = None, /, *, default: str = "auto") -> Any:
    """``--device``: where to compute (default ``auto``; ``@device_option(default="cpu")``)."""
    decorator = click.option("--device", default=default, show_default=True, help=DEVICE_HELP)
    return decorator if f is None else decorator(f)


def force_out_option(f: F) -> F:
    """``--force`` on a command writing a folder OUT: replace an earlier lorahub output."""
    return click.option(
        "--force",
        is_flag=True,
        help="Replace OUT if it is an earlier lorahub output (never other files, the base or '.').",
    )(f)


def dry_run_option(f: F) -> F:
    """``--dry-run``: only print what would be done."""
    return click.option("--dry-run", is_flag=True, help="Only print what would be done.")(f)


def quick_option(f: F) -> F:
    """``--quick``: check blobs by existence and size, no re-hashing."""
    return click.option(
        "--quick", is_flag=True, help="Check blobs by existence and size only, no re-hashing."
    )(f)


def complete_reference(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[click.shell_completion.CompletionItem]:
    """Shell completion for an adapter reference: the stored ``name:tag`` references that
    start with what was typed, read through the catalog's fast SQLite path (never an error:
    a missing or busy store completes nothing)."""
    root = ctx.find_root()
    home = root.params.get("home") if root.params else None
    return [click.shell_completion.CompletionItem(n) for n in reference_names(home, incomplete)]


def reference_names(home: str | None, prefix: str = "") -> list[str]:
    """The stored ``name:tag`` references starting with ``prefix``, sorted, read from the
    embedded SQLite catalog with the standard library (no SQLAlchemy: completion must be
    quick). Empty when the catalog is elsewhere (``LORAHUB_DATABASE_URL``), absent, not yet
    migrated, or unreadable."""
    import sqlite3

    from ..catalog import lite
    from ..settings import load

    try:
        settings = load(home)
    except Exception:  # a bad LORAHUB_MERGED_MAX_BYTES must not break completion
        return []
    if settings.database_url is not None:
        return []
    conn = lite.open_current(settings.home / "lorahub.db")
    if conn is None:
        return []
    try:
        rows = conn.execute(
            "SELECT DISTINCT name, tag FROM refs WHERE substr(name || ':' || tag, 1, ?) = ?",
            (len(prefix), prefix),
        ).fetchall()
    except sqlite3.Error:
        return []
    finally:
        conn.close()
    return sorted(f"{name}:{tag}" for name, tag in rows)


def reference_argument(name: str = "reference", **kwargs: Any) -> Callable[[F], F]:
    """An adapter-reference argument (``name[:tag]``, ``@digest`` or a path) that completes
    stored references in the shell."""
    return click.argument(name, shell_complete=complete_reference, **kwargs)


def env_vars(*names: str) -> Callable[[click.Command], click.Command]:
    """List the environment variables a command reads in its help (an epilog section);
    goes above ``@click.command()``."""
    unknown = [n for n in names if n not in ENVIRONMENT]
    if unknown:
        raise ValueError(f"no description for environment variables {unknown}")
    text = environment_help(names)

    def decorate(command: click.Command) -> click.Command:
        if not isinstance(command, click.Command):
            raise TypeError("@env_vars(...) goes above @click.command()")
        command.epilog = f"{command.epilog}\n\n{text}" if command.epilog else text
        return command

    return decorate


def environment_help(names: tuple[str, ...] | list[str]) -> str:
    """The "Environment:" block for ``names``, kept as lines by click's ``\\b``."""
    width = max(map(len, names))
    lines = [f"  {n:<{width}}  {ENVIRONMENT[n]}" for n in dict.fromkeys(names)]
    return "\b\nEnvironment:\n" + "\n".join(lines)


def _check_filters(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    """A bad ``--filter`` is a usage error (exit 2), caught before the store is opened."""
    from ..catalog.reads import parse_filters
    from ..errors import InvalidInput

    try:
        parse_filters(value)
    except InvalidInput as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return value


def filter_option(f: F) -> F:
    """``-f/--filter key=value`` (repeatable), checked at parse time, into ``filters``."""
    from ..catalog.reads import FILTER_KEYS

    return click.option(
        "-f",
        "--filter",
        "filters",
        multiple=True,
        callback=_check_filters,
        help=f"key=value, repeatable (all must match); keys: {', '.join(FILTER_KEYS)}.",
    )(f)
