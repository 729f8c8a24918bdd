"""Merge commands: merge to a folder, and the on-demand merged cache (merged get/ls/rm)."""

from __future__ import annotations

import sys

import click

from ..digest import short
from ..units import human_size
from .options import (
    HF_CACHE_ENV,
    STORE_ENV,
    device_option,
    dtype_option,
    env_vars,
    force_out_option,
    json_option,
    quiet_option,
    reference_argument,
    weights_option,
    yes_option,
)
from .output import echo_json, folder_path, hub_from, parse_weights, table
from .progress import progress_bar


@env_vars(*STORE_ENV, *HF_CACHE_ENV, "HF_HUB_DISABLE_PROGRESS_BARS")
@click.command()
@click.argument("base")
@reference_argument("adapters", nargs=-1, required=True)
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@weights_option
@device_option
@dtype_option
@click.option(
    "--max-shard-size",
    default="5GB",
    show_default=True,
    callback=lambda ctx, param, value: _size(value),
    help="Largest output file (5GB, 500MB, 2GiB).",
)
@force_out_option
@quiet_option
@json_option
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
    replaces an earlier lorahub output there, nothing else. -q prints the folder's
    absolute path.

    \b
    Examples:
      lorahub merge ./Llama-3.2-1B sql-expert:v1 -o ./merged
      lorahub merge ./Llama-3.2-1B sql-expert tone-formal --weights 1.0,0.5 -o ./merged
      lorahub merge ./Llama-3.2-1B sql-expert --device cuda --dtype bfloat16 -o ./m
      lorahub merge ./Llama-3.2-1B ./my-peft-adapter -o ./merged   (added to the store first)
    """
    hub = hub_from(ctx)
    with progress_bar("merging") as cb:
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
        echo_json(result.to_dict())
        return
    if quiet:
        click.echo(folder_path(result.path))
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


@env_vars(*STORE_ENV, *HF_CACHE_ENV, "LORAHUB_MERGED_MAX_BYTES", "HF_HUB_DISABLE_PROGRESS_BARS")
@merged_group.command("get")
@click.argument("base")
@reference_argument("adapters", nargs=-1, required=True)
@weights_option
@device_option
@dtype_option
@quiet_option
@json_option
@click.pass_context
def merged_get(
    ctx: click.Context,
    base: str,
    adapters: tuple[str, ...],
    weights: str | None,
    device: str,
    dtype: str | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Print the path of the merged checkpoint, merging only the first time.

    -q prints the folder's absolute path too, with no progress; --json the path and the
    inputs.

    \b
    Example:
      vllm serve "$(lorahub merged get ./Llama-3.2-1B sql-expert)"
    """
    with progress_bar("merging") as cb:
        path = hub_from(ctx).merged(
            base,
            list(adapters),
            parse_weights(weights, len(adapters)),
            device=device,
            dtype=dtype,
            progress=cb,
        )
    if as_json:
        inputs = {"base": base, "adapters": list(adapters), "weights": weights}
        echo_json({"path": folder_path(path), **inputs})
        return
    click.echo(folder_path(path))


@env_vars(*STORE_ENV)
@merged_group.command("ls")
@json_option
@quiet_option
@click.pass_context
def merged_ls(ctx: click.Context, as_json: bool, quiet: bool) -> None:
    """List merged checkpoints, most recently used first. -q prints each key.

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


@env_vars(*STORE_ENV)
@merged_group.command("rm")
@click.argument("keys", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Remove every merged checkpoint.")
@yes_option
@quiet_option
@json_option
@click.pass_context
def merged_rm(
    ctx: click.Context,
    keys: tuple[str, ...],
    everything: bool,
    yes: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Delete merged checkpoints by key (8+ hex) or all of them.

    -q prints each removed key; --json the list of them.

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
    removed = hub_from(ctx).merged_remove(list(keys), all=everything)
    if as_json:
        echo_json(list(removed))
        return
    for key in removed:
        click.echo(key if quiet else f"removed {key}")


def register(group: click.Group) -> None:
    group.add_command(merge)
    group.add_command(merged_group)
