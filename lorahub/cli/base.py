"""Base-model commands: base add, base ls, check, resolve."""

from __future__ import annotations

import sys

import click

from ..digest import short
from ..units import human_size
from .output import echo_json, hub_from, progress, table


@click.group("base")
def base_group() -> None:
    """Record base models so adapters can be checked against them without their files.

    \b
    Example:
      lorahub base add ./Llama-3.2-1B
    """


@base_group.command("add")
@click.argument("source")
@click.option("--revision", help="Branch, tag or commit, for a Hub repo id.")
@click.option("-n", "--name", help="Name to refer to it by (default: repo id or folder name).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
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
    weights once (cached by file size and time) for the content hash.

    \b
    Examples:
      lorahub base add ./Llama-3.2-1B
      lorahub base add meta-llama/Llama-3.2-1B --revision main
    """
    with progress("hashing", quiet) as cb:
        info = hub_from(ctx).add_base(source, revision=revision, name=name, progress=cb)
    if as_json:
        echo_json(info.to_dict())
        return
    click.echo(f"{info.name}: {info.tensor_count} tensors, {human_size(info.total_bytes)}")
    click.echo(f"  signature     {info.signature}")
    click.echo(f"  content hash  {info.content_hash or '(not computed: weights not local)'}")


@base_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Print one content hash (or signature) per line.")
@click.pass_context
def base_ls(ctx: click.Context, as_json: bool, quiet: bool) -> None:
    """List recorded base models.

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


@base_group.command("rm")
@click.argument("reference")
@click.pass_context
def base_rm(ctx: click.Context, reference: str) -> None:
    """Forget a recorded base model (adapters made for it are kept).

    \b
    Example:
      lorahub base rm llama-old
    """
    info = hub_from(ctx).remove_base(reference)
    click.echo(f"removed base {info.name} ({short(info.content_hash or info.signature)})")


@click.command()
@click.argument("reference")
@click.option("--base", required=True, help="Base model: folder, file, repo id or recorded name.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def check(ctx: click.Context, reference: str, base: str, as_json: bool) -> None:
    """Say whether an adapter fits a base: exact, compatible or incompatible (exit 1).

    \b
    Example:
      lorahub check sql-expert --base ./Llama-3.2-1B-Instruct
    """
    report = hub_from(ctx).check(reference, base=base)
    if as_json:
        echo_json(
            {
                "status": report.status,
                "matched": report.matched,
                "total": report.total,
                "missing": report.missing,
                "mismatched": report.mismatched,
                "prefix_note": report.prefix_note,
                "problems": [
                    {
                        "module": p.module,
                        "base_tensor": p.base_tensor,
                        "expected": list(p.expected) if p.expected else None,
                        "found": list(p.found) if p.found else None,
                        "reason": p.reason,
                    }
                    for p in report.problems
                ],
            }
        )
    else:
        click.echo(report.summary)
    if not report.ok:
        sys.exit(1)


@click.command()
@click.argument("reference")
@click.option("--base", required=True, help="Base model: folder, file, repo id or recorded name.")
@click.option("--json", "as_json", is_flag=True, help="Print the adapter record as JSON.")
@click.pass_context
def resolve(ctx: click.Context, reference: str, base: str, as_json: bool) -> None:
    """Pick the variant of NAME[:TAG] made for a base (or one that fits it).

    \b
    Example:
      lorahub resolve sql-expert --base ./Llama-3.2-1B --json
    """
    info = hub_from(ctx).resolve(reference, base=base)
    if as_json:
        echo_json(info.to_dict())
        return
    click.echo(f"{info.digest}  {', '.join(info.refs)}  ({info.match})")


def register(group: click.Group) -> None:
    group.add_command(base_group)
    group.add_command(check)
    group.add_command(resolve)
