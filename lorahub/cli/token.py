"""Access tokens of ``lorahub serve``: token add, token ls, token rm."""

from __future__ import annotations

import sys

import click

from ..errors import NotFound
from .options import STORE_ENV, env_vars, json_option, quiet_option, yes_option
from .output import echo_json, hub_from, table


@click.group("token")
def token_group() -> None:
    """Tokens that clients of `lorahub serve` send (HF_TOKEN, `token=`).

    A read token downloads; a write token also uploads. --namespace limits a token to
    those namespaces (the first part of a repo id); without it, a token covers them all.

    \b
    Example:
      lorahub token add ci --write --namespace team
    """


@env_vars(*STORE_ENV)
@token_group.command("add")
@click.argument("name")
@click.option("--write", is_flag=True, help="Allow uploads too (default: read only).")
@click.option(
    "--namespace",
    "namespaces",
    multiple=True,
    metavar="NS",
    help="Limit the token to this namespace; repeatable (default: every namespace).",
)
@quiet_option
@json_option
@click.pass_context
def token_add(
    ctx: click.Context,
    name: str,
    write: bool,
    namespaces: tuple[str, ...],
    quiet: bool,
    as_json: bool,
) -> None:
    """Make a token and print its secret, once: only its hash is kept.

    -q prints the secret alone; --json the token's record with the secret ("token").

    \b
    Examples:
      lorahub token add laptop
      HF_TOKEN=$(lorahub token add ci --write --namespace team -q)
    """
    new = hub_from(ctx).add_token(name, write=write, namespaces=namespaces)
    if as_json:
        echo_json(new.to_dict())
        return
    if quiet:
        click.echo(new.secret)
        return
    where = ", ".join(new.info.namespaces) or "every namespace"
    click.echo(new.secret)
    click.echo(
        f"token {name!r} ({new.info.scope}, {where}): shown once, only its hash is kept; "
        "clients send it as HF_TOKEN or token=...",
        err=True,
    )


@env_vars(*STORE_ENV)
@token_group.command("ls")
@quiet_option
@json_option
@click.pass_context
def token_ls(ctx: click.Context, quiet: bool, as_json: bool) -> None:
    """List tokens (never their secrets). -q prints each token's name.

    \b
    Example:
      lorahub token ls --json
    """
    infos = hub_from(ctx).tokens()
    if as_json:
        echo_json([i.to_dict() for i in infos])
        return
    if quiet:
        for i in infos:
            click.echo(i.name)
        return
    rows = [
        [
            i.name,
            i.scope,
            ",".join(i.namespaces) or "*",
            i.created_at.strftime("%Y-%m-%d %H:%M"),
            i.last_used_at.strftime("%Y-%m-%d %H:%M") if i.last_used_at else "-",
        ]
        for i in infos
    ]
    table(rows, ["NAME", "SCOPE", "NAMESPACES", "CREATED", "LAST USED"])


@env_vars(*STORE_ENV)
@token_group.command("rm")
@click.argument("names", nargs=-1, required=True)
@yes_option
@quiet_option
@json_option
@click.pass_context
def token_rm(
    ctx: click.Context, names: tuple[str, ...], yes: bool, quiet: bool, as_json: bool
) -> None:
    """Delete tokens; running servers refuse them from then on (no restart).

    -q prints each removed token's name; --json their records.

    \b
    Example:
      lorahub token rm laptop -y
    """
    hub = hub_from(ctx)
    known = {i.name for i in hub.tokens()}
    missing = [n for n in names if n not in known]
    if missing:  # before removing any, as `lorahub rm`
        raise NotFound(f"no token named {missing[0]!r}; see `lorahub token ls`")
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("refusing to remove without confirmation; pass -y")
        if not click.confirm(f"Remove token {', '.join(names)}?", default=False, err=True):
            click.echo("Nothing removed.", err=True)
            sys.exit(1)
    removed = [hub.remove_token(n) for n in dict.fromkeys(names)]
    if as_json:
        echo_json([i.to_dict() for i in removed])
        return
    for i in removed:
        click.echo(i.name if quiet else f"removed token {i.name}")


def register(group: click.Group) -> None:
    group.add_command(token_group)
