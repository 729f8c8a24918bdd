"""Base-model commands: base add, base ls, check, resolve."""

from __future__ import annotations

import sys

import click

from ..digest import short
from ..units import human_size
from .errors import EXIT_INCOMPATIBLE
from .options import (
    HF_CACHE_ENV,
    STORE_ENV,
    base_option,
    env_vars,
    json_option,
    quiet_option,
    reference_argument,
)
from .output import echo_json, hub_from, table
from .progress import progress_bar


@click.group("base")
def base_group() -> None:
    """Record base models so adapters can be checked against them without their files.

    \b
    Example:
      lorahub base add ./Llama-3.2-1B
    """


@env_vars(*STORE_ENV, *HF_CACHE_ENV, "HF_HUB_DISABLE_PROGRESS_BARS")
@base_group.command("add")
@click.argument("source")
@click.option("--revision", help="Branch, tag or commit, for a Hub repo id.")
@click.option("-n", "--name", help="Name to refer to it by (default: repo id or folder name).")
@quiet_option
@json_option
@click.pass_context
def base_add(
    ctx: click.Context,
    source: str,
    revision: str | None,
    name: str | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Record a base model (folder, .safetensors file or Hub repo id in the HF cache).

    Reads the safetensors headers for the tensor table and signature, and hashes the
    weights once (cached by file size and time) for the content hash. -q prints the
    content hash (the signature when the weights are not local).

    \b
    Examples:
      lorahub base add ./Llama-3.2-1B
      lorahub base add meta-llama/Llama-3.2-1B --revision main
    """
    with progress_bar("hashing") as cb:
        info = hub_from(ctx).add_base(source, revision=revision, name=name, progress=cb)
    if as_json:
        echo_json(info.to_dict())
        return
    if quiet:
        click.echo(info.content_hash or info.signature)
        return
    click.echo(f"{info.name}: {info.tensor_count} tensors, {human_size(info.total_bytes)}")
    click.echo(f"  signature     {info.signature}")
    click.echo(f"  content hash  {info.content_hash or '(not computed: weights not local)'}")


@env_vars(*STORE_ENV)
@base_group.command("ls")
@json_option
@quiet_option
@click.pass_context
def base_ls(ctx: click.Context, as_json: bool, quiet: bool) -> None:
    """List recorded base models. -q prints each content hash (or signature).

    \b
    Example:
      lorahub base ls --json
    """
    infos = hub_from(ctx).bases()
    if as_json:
        echo_json([i.to_dict() for i in infos])
        return
    if quiet:
        for i in infos:
            click.echo(i.content_hash or i.signature)
        return
    rows = [
        [
            i.name,
            short(i.content_hash or "-"),
            short(i.signature),
            str(i.tensor_count),
            human_size(i.total_bytes),
            i.repo_id or i.path or "-",
        ]
        for i in infos
    ]
    table(rows, ["NAME", "CONTENT", "SIGNATURE", "TENSORS", "SIZE", "WHERE"])


@env_vars(*STORE_ENV)
@base_group.command("rm")
@click.argument("reference")
@quiet_option
@json_option
@click.pass_context
def base_rm(ctx: click.Context, reference: str, quiet: bool, as_json: bool) -> None:
    """Forget a recorded base model (adapters made for it are kept).

    -q prints its content hash (or signature); --json its record.

    \b
    Example:
      lorahub base rm llama-old
    """
    info = hub_from(ctx).remove_base(reference)
    if as_json:
        echo_json(info.to_dict())
        return
    if quiet:
        click.echo(info.content_hash or info.signature)
        return
    click.echo(f"removed base {info.name} ({short(info.content_hash or info.signature)})")


@env_vars(*STORE_ENV, *HF_CACHE_ENV)
@click.command()
@reference_argument()
@base_option(required=True)
@quiet_option
@json_option
@click.pass_context
def check(ctx: click.Context, reference: str, base: str, quiet: bool, as_json: bool) -> None:
    """Say whether an adapter fits a base: exact, compatible or incompatible.

    Exits 0 when it fits, 3 when it was checked and does not fit, 1 on an error (the
    adapter or base could not be read). -q prints nothing: the exit status is the answer
    (as with `grep -q`); a verdict has no identifier to print.

    \b
    Example:
      lorahub check sql-expert --base ./Llama-3.2-1B-Instruct
    """
    report = hub_from(ctx).check(reference, base=base)
    if as_json:
        echo_json(report.to_dict())
    elif not quiet:
        click.echo(report.summary)
    if not report.ok:
        sys.exit(EXIT_INCOMPATIBLE)


@env_vars(*STORE_ENV, *HF_CACHE_ENV)
@click.command()
@reference_argument()
@base_option(required=True)
@quiet_option
@json_option
@click.pass_context
def resolve(ctx: click.Context, reference: str, base: str, quiet: bool, as_json: bool) -> None:
    """Pick the variant of NAME[:TAG] made for a base (or one that fits it).

    -q prints its digest reference (@xxh128:...); --json its record.

    \b
    Example:
      lorahub resolve sql-expert --base ./Llama-3.2-1B --json
    """
    info = hub_from(ctx).resolve(reference, base=base)
    if as_json:
        echo_json(info.to_dict())
        return
    if quiet:
        click.echo(f"@{info.digest}")
        return
    click.echo(f"{info.digest}  {', '.join(info.refs)}  ({info.match})")


def register(group: click.Group) -> None:
    group.add_command(base_group)
    group.add_command(check)
    group.add_command(resolve)
