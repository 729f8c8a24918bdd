"""``lorahub migrate-store``: copy this store to a team setup (a catalog database and,
optionally, S3-compatible blob storage), every digest verified."""

from __future__ import annotations

import dataclasses
import sys

import click

from ..units import human_size
from .env import mask_url
from .options import S3_ENV, STORE_ENV, env_vars, json_option, quick_option
from .output import echo_json, hub_from
from .progress import progress_bar


@env_vars(*STORE_ENV, *S3_ENV, "HF_HUB_DISABLE_PROGRESS_BARS")
@click.command("migrate-store")
@click.option(
    "--to-database",
    required=True,
    metavar="URL",
    help="The target catalog's SQLAlchemy URL (postgresql+psycopg://..., sqlite:///...).",
)
@click.option(
    "--to-blobs",
    metavar="URL",
    help="The target blob store, s3://bucket/prefix (default: the blobs stay where they are).",
)
@quick_option
@json_option
@click.pass_context
def migrate_store(
    ctx: click.Context, to_database: str, to_blobs: str | None, quick: bool, as_json: bool
) -> None:
    """Copy this store's adapters, names and bases, and their blobs, to another catalog
    and blob store: each blob is hashed before it leaves and again where it lands, then
    the catalog rows follow. Running it again copies nothing ("0 copied"). A name the
    target already sets to another adapter is left as it is and reported (exit 1).

    Afterwards, point LORAHUB_DATABASE_URL (and LORAHUB_BLOBS_URL) at the target.
    Credentials for S3 come from the AWS variables, never from the URL; passwords and
    secret keys are never printed. --quick checks blobs already at the target by size.

    No -q: it reports counts, not objects; --json gives the lists to a script.

    \b
    Example:
      lorahub migrate-store --to-database postgresql+psycopg://lora@db/lorahub \\
          --to-blobs s3://team-lora/hub
    """
    from ..migrating import migrate_store as run
    from ..s3blobs import parse_blobs_url

    hub = hub_from(ctx)
    if to_blobs is not None:
        parse_blobs_url(to_blobs, "--to-blobs")  # a bad URL fails before anything is opened
    target = dataclasses.replace(
        hub.settings,
        database_url=to_database,
        blobs_url=to_blobs if to_blobs is not None else hub.settings.blobs_url,
    )
    with progress_bar("copying blobs", quiet=as_json) as cb:
        report = run(hub.engine, hub.blobs, target, quick=quick, progress=cb)
    if as_json:
        echo_json(report.to_dict())
    else:
        click.echo(
            f"{report.copied} copied to {mask_url(to_database)}: "
            f"{len(report.blobs_copied)} blob(s) ({human_size(report.bytes_copied)}), "
            f"{len(report.adapters_copied)} adapter(s), {len(report.names_copied)} name(s), "
            f"{len(report.bases_copied)} base(s); already there: {report.blobs_present} "
            f"blob(s), {report.adapters_present} adapter(s); blobs at {report.target_blobs}"
        )
        for line in report.conflicts:
            click.echo(f"conflict: {line}", err=True)
    if report.conflicts:
        sys.exit(1)


def register(group: click.Group) -> None:
    group.add_command(migrate_store)
