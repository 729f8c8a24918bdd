"""Health commands: verify, gc, fsck."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from ..units import human_size
from .output import echo_json, hub_from, parse_duration, progress

if TYPE_CHECKING:
    from ..upkeep import FsckReport


@click.command()
@click.option("--quick", is_flag=True, help="Check existence and size only, no re-hashing.")
@click.option("--repair", is_flag=True, help="Run `lorahub fsck` first, then verify.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def verify(ctx: click.Context, quick: bool, repair: bool, quiet: bool, as_json: bool) -> None:
    """Check the catalog, re-hash every blob and check every adapter; exit 1 if anything
    is wrong.

    \b
    Example:
      lorahub verify --quick
    """
    hub = hub_from(ctx)
    if repair:
        fixed = hub.fsck(quick=quick)
        if not as_json:
            _print_fsck(fixed)
    with progress("verifying", quiet) as cb:
        report = hub.verify(quick=quick, progress=cb)
    if as_json:
        echo_json(
            {
                "ok": report.ok,
                "blobs": report.checked_blobs,
                "adapters": report.checked_adapters,
                "problems": [p.__dict__ for p in report.problems],
            }
        )
    else:
        for p in report.problems:
            click.echo(f"BAD {p.what} {p.digest}: {p.problem}", err=True)
        status = "ok" if report.ok else f"{len(report.problems)} problem(s)"
        click.echo(f"{report.checked_blobs} blobs, {report.checked_adapters} adapters: {status}")
        if not report.ok and not repair:
            click.echo("`lorahub fsck` repairs what the store's files allow.", err=True)
    if not report.ok:
        sys.exit(1)


@click.command()
@click.option(
    "--grace",
    default="1h",
    show_default=True,
    help="Keep unreferenced blobs younger than this (90s, 30m, 1h).",
)
@click.option("--dry-run", is_flag=True, help="Only print what would be freed.")
@click.option(
    "--force",
    is_flag=True,
    help="Delete unaccounted blobs even when the catalog is empty or they are most of the store.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def gc(ctx: click.Context, grace: str, dry_run: bool, force: bool, as_json: bool) -> None:
    """Delete blobs no adapter uses, stale temporary files and merge leftovers.

    Refuses to run on a damaged catalog, or one that cannot account for what it would
    delete (run `lorahub fsck` first).

    \b
    Example:
      lorahub gc --dry-run
    """
    report = hub_from(ctx).gc(grace=parse_duration(grace), dry_run=dry_run, force=force)
    if as_json:
        echo_json(report.__dict__)
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
    if report.unrecorded:
        click.echo(
            f"note: {len(report.unrecorded)} adapter(s) in the store's files are missing from "
            "the catalog; their blobs were kept. Run `lorahub fsck` to restore them.",
            err=True,
        )


@click.command()
@click.option("--dry-run", is_flag=True, help="Only print what would be repaired.")
@click.option("--quick", is_flag=True, help="Check blobs by size only, no re-hashing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def fsck(ctx: click.Context, dry_run: bool, quick: bool, as_json: bool) -> None:
    """Rebuild a missing or damaged catalog from the store's own files.

    Restores adapters, names and bases the catalog lacks, rewrites missing manifest
    files, and fetches damaged or missing blobs again from the adapter's source (else
    moves them to quarantine/). Deletes nothing; exit 1 if something could not be
    recovered.

    \b
    Example:
      lorahub fsck --dry-run
    """
    report = hub_from(ctx).fsck(dry_run=dry_run, quick=quick)
    if as_json:
        echo_json(report.to_dict())
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
