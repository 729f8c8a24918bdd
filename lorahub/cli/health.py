"""Health commands: verify, gc, fsck."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from ..units import human_size
from .options import (
    STORE_ENV,
    dry_run_option,
    env_vars,
    json_option,
    quick_option,
    quiet_option,
)
from .output import echo_json, hub_from, parse_duration
from .progress import progress_bar

if TYPE_CHECKING:
    from ..upkeep import FsckReport


@env_vars(*STORE_ENV, "HF_HUB_DISABLE_PROGRESS_BARS")
@click.command()
@quick_option
@click.option("--repair", is_flag=True, help="Run `lorahub fsck` first, then verify.")
@quiet_option
@json_option
@click.pass_context
def verify(ctx: click.Context, quick: bool, repair: bool, quiet: bool, as_json: bool) -> None:
    """Check the catalog, re-hash every blob and check every adapter; exit 1 if anything
    is wrong.

    -q prints each bad thing once, nothing when all is well: a blob's digest (xxh128:...),
    an adapter's digest reference (@xxh128:...), the catalog's URL (password masked).

    \b
    Example:
      lorahub verify --quick
    """
    hub = hub_from(ctx)
    if repair:
        fixed = hub.fsck(quick=quick)
        if not as_json and not quiet:
            _print_fsck(fixed)
    with progress_bar("verifying") as cb:
        report = hub.verify(quick=quick, progress=cb)
    if as_json:
        echo_json(report.to_dict())
    elif quiet:
        bad = (f"@{p.digest}" if p.what == "adapter" else p.digest for p in report.problems)
        for identifier in dict.fromkeys(bad):
            click.echo(identifier)
    else:
        for p in report.problems:
            click.echo(f"BAD {p.what} {p.digest}: {p.problem}", err=True)
        status = "ok" if report.ok else f"{len(report.problems)} problem(s)"
        click.echo(f"{report.checked_blobs} blobs, {report.checked_adapters} adapters: {status}")
        if not report.ok and not repair:
            click.echo("`lorahub fsck` repairs what the store's files allow.", err=True)
    if not report.ok:
        sys.exit(1)


@env_vars(*STORE_ENV)
@click.command()
@click.option(
    "--grace",
    default="1h",
    show_default=True,
    help="Keep unreferenced blobs younger than this (90s, 30m, 1h).",
)
@dry_run_option
@click.option(
    "--force",
    is_flag=True,
    help="Delete unaccounted blobs even when the catalog is empty or they are most of the store.",
)
@quiet_option
@json_option
@click.pass_context
def gc(
    ctx: click.Context, grace: str, dry_run: bool, force: bool, quiet: bool, as_json: bool
) -> None:
    """Delete blobs no adapter uses, stale temporary files and merge leftovers.

    Refuses to run on a damaged catalog, or one that cannot account for what it would
    delete (run `lorahub fsck` first). -q prints each blob digest and leftover path
    deleted (or, with --dry-run, that would be).

    \b
    Example:
      lorahub gc --dry-run
    """
    report = hub_from(ctx).gc(grace=parse_duration(grace), dry_run=dry_run, force=force)
    if as_json:
        echo_json(report.to_dict())
        return
    if quiet:
        for item in (*report.blobs, *report.temp_files):
            click.echo(item)
        return
    verb = "would free" if dry_run else "freed"
    for b in report.blobs:
        click.echo(f"{'would delete' if dry_run else 'deleted'} blob {b}")
    for t in report.temp_files:
        click.echo(f"{'would delete' if dry_run else 'deleted'} leftover {t}")
    click.echo(
        f"{verb} {human_size(report.bytes_freed)} "
        f"({len(report.blobs)} blobs, {len(report.temp_files)} leftovers)"
    )
    if report.kept_blobs:
        n = len(report.kept_blobs)
        click.echo(
            f"note: {'would keep' if dry_run else 'kept'} {n} unused blob(s) "
            f"({human_size(report.kept_bytes)}) younger than the {grace} grace period; "
            f"`lorahub gc --grace 0` frees {'it' if n == 1 else 'them'} now",
            err=True,
        )
    if report.unrecorded:
        click.echo(
            f"note: {len(report.unrecorded)} adapter(s) in the store's files are missing from "
            "the catalog; their blobs were kept. Run `lorahub fsck` to restore them.",
            err=True,
        )


@env_vars(*STORE_ENV)
@click.command()
@dry_run_option
@quick_option
@quiet_option
@json_option
@click.pass_context
def fsck(ctx: click.Context, dry_run: bool, quick: bool, quiet: bool, as_json: bool) -> None:
    """Rebuild a missing or damaged catalog from the store's own files.

    Restores adapters, names and bases the catalog lacks, rewrites missing manifest
    files, and fetches damaged or missing blobs again from the adapter's source (else
    moves them to quarantine/). Deletes nothing; exit 1 if something could not be
    recovered. -q prints nothing on a store that is, or was made, whole; else each item
    that could not be recovered, one per line (what it is, then why).

    \b
    Example:
      lorahub fsck --dry-run
    """
    report = hub_from(ctx).fsck(dry_run=dry_run, quick=quick)
    if as_json:
        echo_json(report.to_dict())
    elif quiet:
        for line in report.unrecovered:
            click.echo(line)
    else:
        _print_fsck(report)
    if not report.ok:
        sys.exit(1)


def _print_fsck(report: FsckReport) -> None:
    would = "would " if report.dry_run else ""
    if report.catalog_set_aside:
        click.echo(f"{would}set the damaged catalog aside as {report.catalog_set_aside}")
    if report.reindexed:
        click.echo(f"{would}rebuild the catalog's damaged indexes")
    lists = (
        ("restore adapter", "restored adapter", report.adapters_restored),
        ("restore name", "restored name", report.names_restored),
        ("restore base", "restored base", report.bases_restored),
        ("rewrite manifest", "rewrote manifest", report.manifests_rewritten),
        ("repair blob", "repaired blob", report.blobs_repaired),
        ("quarantine blob", "quarantined blob", report.blobs_quarantined),
    )
    for future, past, items in lists:
        for item in items:
            click.echo(f"would {future} {item}" if report.dry_run else f"{past} {item}")
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    for line in report.unrecovered:
        click.echo(f"NOT RECOVERED {line}", err=True)
    total = sum(len(items) for _, _, items in lists)
    status = "ok" if report.ok else f"{len(report.unrecovered)} item(s) could not be recovered"
    click.echo(f"fsck: {total} repair(s){' planned' if report.dry_run else ''}; {status}")


def register(group: click.Group) -> None:
    for command in (verify, gc, fsck):
        group.add_command(command)
