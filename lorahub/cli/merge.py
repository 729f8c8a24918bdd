"""Merge commands: merge to a folder, and the on-demand merged cache (merged get/ls/rm)."""

from __future__ import annotations

import sys

import click

from ..digest import short
from ..units import human_size
from .output import echo_json, hub_from, parse_weights, progress, table


@click.command()
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("-w", "--weights", help="One weight per adapter, comma-separated (default 1 each).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1...")
@click.option("--dtype", help="Output dtype (bfloat16, float16, float32); default: the base's.")
@click.option(
    "--max-shard-size",
    default="5GB",
    show_default=True,
    callback=lambda ctx, param, value: _size(value),
    help="Largest output file (5GB, 500MB, 2GiB).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace OUT if it is an earlier lorahub output (never other files, the base or '.').",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def merge(
    ctx: click.Context,
    base: str,
    adapters: tuple[str, ...],
    out: str,
    weights: str | None,
    device: str,
    dtype: str | None,
    max_shard_size: int,
    force: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Merge adapters into a base model and write a full checkpoint folder.

    Streams one tensor at a time (memory bounded by the largest tensor), on the GPU when
    there is one; the folder appears only when complete. OUT must be new or empty; --force
    replaces an earlier lorahub output there, nothing else.

    \b
    Examples:
      lorahub merge ./Llama-3.2-1B sql-expert:v1 -o ./merged
      lorahub merge ./Llama-3.2-1B sql-expert tone-formal --weights 1.0,0.5 -o ./merged
      lorahub merge ./Llama-3.2-1B sql-expert --device cuda --dtype bfloat16 -o ./m
      lorahub merge ./Llama-3.2-1B ./my-peft-adapter -o ./merged   (added to the store first)
    """
    hub = hub_from(ctx)
    with progress("merging", quiet) as cb:
        result = hub.merge(
            base,
            list(adapters),
            parse_weights(weights, len(adapters)),
            out=out,
            device=device,
            dtype=dtype,
            max_shard_size=max_shard_size,
            force=force,
            progress=cb,
        )
    if as_json:
        echo_json(
            {
                "path": str(result.path),
                "tensors": result.tensors,
                "merged": result.merged,
                "bytes_written": result.bytes_written,
                "seconds": result.seconds,
                "device": result.device,
                "dtype": result.dtype,
            }
        )
        return
    click.echo(
        f"{result.path}: {result.merged} of {result.tensors} tensors merged, "
        f"{human_size(result.bytes_written)} in {result.seconds:.1f}s "
        f"({human_size(result.bytes_written / max(result.seconds, 1e-9))}/s on {result.device})"
    )


def _size(value: str) -> int:
    """The size in bytes, or a usage error that names the option."""
    from ..errors import MergeError
    from ..units import parse_size

    try:
        return parse_size(value)
    except MergeError as exc:
        raise click.BadParameter(str(exc)) from None


@click.group("merged")
def merged_group() -> None:
    """Merged checkpoints kept in the store and reused (LORAHUB_MERGED_MAX_BYTES caps them).

    \b
    Example:
      lorahub merged get ./Llama-3.2-1B sql-expert
    """


@merged_group.command("get")
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@click.option("-w", "--weights", help="One weight per adapter, comma-separated.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", help="Output dtype; default: the base's.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def merged_get(
    ctx: click.Context,
    base: str,
    adapters: tuple[str, ...],
    weights: str | None,
    device: str,
    dtype: str | None,
    quiet: bool,
) -> None:
    """Print the path of the merged checkpoint, merging only the first time.

    \b
    Example:
      vllm serve "$(lorahub merged get ./Llama-3.2-1B sql-expert)"
    """
    with progress("merging", quiet) as cb:
        path = hub_from(ctx).merged(
            base,
            list(adapters),
            parse_weights(weights, len(adapters)),
            device=device,
            dtype=dtype,
            progress=cb,
        )
    click.echo(str(path))


@merged_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Print one key per line.")
@click.pass_context
def merged_ls(ctx: click.Context, as_json: bool, quiet: bool) -> None:
    """List merged checkpoints, most recently used first.

    \b
    Example:
      lorahub merged ls --json
    """
    infos = hub_from(ctx).merged_list()
    if as_json:
        echo_json([i.to_dict() for i in infos])
        return
    if quiet:
        for i in infos:
            click.echo(i.key)
        return
    rows = [
        [
            short(i.key),
            i.base_name,
            " + ".join(f"{w:g}*{short(d)}" for d, w in i.adapters),
            i.dtype,
            human_size(i.size),
            i.last_used_at.strftime("%Y-%m-%d %H:%M"),
        ]
        for i in infos
    ]
    table(rows, ["KEY", "BASE", "ADAPTERS", "DTYPE", "SIZE", "LAST USED"])


@merged_group.command("rm")
@click.argument("keys", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Remove every merged checkpoint.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def merged_rm(ctx: click.Context, keys: tuple[str, ...], everything: bool, yes: bool) -> None:
    """Delete merged checkpoints by key (8+ hex) or all of them.

    \b
    Example:
      lorahub merged rm --all -y
    """
    if not keys and not everything:
        raise click.UsageError("give keys to remove, or --all")
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("refusing to remove without confirmation; pass -y")
        what = "every merged checkpoint" if everything else ", ".join(keys)
        if not click.confirm(f"Remove {what}?", default=False, err=True):
            sys.exit(1)
    for key in hub_from(ctx).merged_remove(list(keys), all=everything):
        click.echo(f"removed {key}")


def register(group: click.Group) -> None:
    group.add_command(merge)
    group.add_command(merged_group)
