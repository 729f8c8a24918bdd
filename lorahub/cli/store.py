"""Store commands: add, ls, show, tag, rm, export."""

from __future__ import annotations

import sys

import click

from ..digest import short
from ..errors import AdapterNotFound, InvalidArgument, InvalidReference
from ..info import AdapterInfo
from ..refs import format_ref, parse
from ..units import human_size
from .output import echo_json, echo_json_list, hub_from, table


def _base_label(info: AdapterInfo) -> str:
    b = info.base
    if b.name:
        return b.name if b.verified else f"{b.name} (unverified)"
    return short(b.signature) if b.signature else "-"


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("-n", "--name", help="Reference to give it: name or name:tag (default: folder name).")
@click.option("-r", "--recursive", is_flag=True, help="Find every adapter below each folder.")
@click.option(
    "--base",
    help="Base model (folder, .safetensors file or Hub repo id) to record and check against.",
)
@click.option("--force", is_flag=True, help="Store even if it does not fit --base.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
@click.pass_context
def add(
    ctx: click.Context,
    paths: tuple[str, ...],
    name: str | None,
    recursive: bool,
    base: str | None,
    force: bool,
    as_json: bool,
) -> None:
    """Import adapters (PEFT folders; kohya/diffusers files with --base).

    \b
    Examples:
      lorahub add ./my-peft-adapter --name sql-expert:v1
      lorahub add --recursive ~/runs
    """
    if any(not p.strip() for p in paths) or (base is not None and not base.strip()):
        raise InvalidArgument("an empty path was given; name a folder or file")
    if name is not None and not name.strip():
        raise InvalidReference("--name is empty; give a name like 'sql-expert:v1'")
    hub = hub_from(ctx)
    results = hub.add_many(list(paths), recursive=recursive, name=name, base=base, force=force)
    if as_json:
        echo_json([r.to_dict() for r in results])
    else:
        for r in results:
            if r.adapter is not None:
                refs = ", ".join(r.adapter.refs) or "(no name)"
                click.echo(f"{r.status:<8} {r.adapter.digest}  {refs}  <- {r.source}")
                unmapped = r.adapter.origin.get("unmapped_keys") or []
                if unmapped:
                    shown = ", ".join(unmapped[:5]) + (" ..." if len(unmapped) > 5 else "")
                    click.echo(
                        f"note: {len(unmapped)} keys matched no base tensor and were left out: "
                        f"{shown}",
                        err=True,
                    )
            else:
                click.echo(f"refused  {r.source}: {r.reason}", err=True)
    if not results or any(r.status == "refused" for r in results):
        sys.exit(1)


@click.command("ls")
@click.option(
    "-f",
    "--filter",
    "filters",
    multiple=True,
    help="key=value; keys: rank, alpha, target, module, base, dora, rslora, origin, name.",
)
@click.option("--base", "base", help="Only adapters that fit this base model.")
@click.option("-q", "--quiet", is_flag=True, help="Print one digest reference per line.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many adapters.")
@click.pass_context
def ls(
    ctx: click.Context,
    filters: tuple[str, ...],
    base: str | None,
    quiet: bool,
    as_json: bool,
    limit: int | None,
) -> None:
    """List stored adapters, newest first.

    \b
    Examples:
      lorahub ls --filter rank=16 --filter target=q_proj
      lorahub rm -y $(lorahub ls -q --filter base=meta-llama/Llama-3.2-1B)
    """
    hub = hub_from(ctx)
    infos = hub.list_adapters(filters, base=base, limit=limit)
    if as_json:
        echo_json_list([i.to_dict() for i in infos])
        return
    if quiet:
        if infos:
            click.echo("\n".join(f"@{i.digest}" for i in infos))
        return
    rows = []
    for i in infos:
        for ref in i.refs or ("<none>",):
            rows.append(
                [
                    ref,
                    i.short,
                    str(i.rank),
                    f"{i.alpha:g}",
                    ",".join(i.targets),
                    _base_label(i),
                    human_size(i.size),
                    i.created_at.strftime("%Y-%m-%d %H:%M"),
                ]
            )
    table(rows, ["REFERENCE", "DIGEST", "RANK", "ALPHA", "TARGETS", "BASE", "SIZE", "CREATED"])


@click.command()
@click.argument("reference")
@click.option("--base", help="The variant made for this base model (path, name or hub id).")
@click.option("--json", "as_json", is_flag=True, help="Print the full record, manifest included.")
@click.pass_context
def show(ctx: click.Context, reference: str, base: str | None, as_json: bool) -> None:
    """Show one adapter: identity, LoRA settings, base, origin and provenance.

    \b
    Example:
      lorahub show sql-expert:v1 --json
    """
    info = hub_from(ctx).get(reference, base=base)
    if as_json:
        echo_json(info.to_dict(manifest=True))
        return
    cfg = info.config
    lines = [
        ("digest", info.digest),
        ("names", ", ".join(info.refs) or "-"),
        ("rank", str(info.rank)),
        ("alpha", f"{info.alpha:g}"),
        ("rsLoRA", "yes" if info.use_rslora else "no"),
        ("DoRA", "yes" if info.use_dora else "no"),
        ("targets", f"{', '.join(info.targets)} ({info.module_count} modules)"),
        ("task", str(cfg.get("task_type") or "-")),
        ("size", human_size(info.size)),
        ("weights", info.weights_digest),
        ("base", _base_label(info)),
    ]
    if info.base.revision:
        lines.append(("base revision", info.base.revision))
    if info.base.signature:
        lines.append(("base signature", info.base.signature))
    if info.base.content_hash:
        lines.append(("base content", info.base.content_hash))
    lines.append(("origin", info.origin_kind))
    for k, v in sorted(info.origin.items()):
        lines.append((f"  {k}", str(v)))
    prov = info.provenance
    if prov.get("kind") not in (None, "import"):
        for k, v in sorted(prov.items()):
            if v is None:
                continue
            text = ", ".join(map(str, v)) if isinstance(v, list | tuple) else str(v)
            lines.append((f"provenance {k}", text))
    lines.append(("created", info.created_at.strftime("%Y-%m-%d %H:%M:%S UTC")))
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        click.echo(f"{k:<{width}}  {v}")


@click.command()
@click.argument("reference")
@click.argument("new")
@click.pass_context
def tag(ctx: click.Context, reference: str, new: str) -> None:
    """Give an adapter another name:tag.

    \b
    Example:
      lorahub tag sql-expert:v1 sql-expert:prod
    """
    info = hub_from(ctx).tag(reference, new)
    target = parse(new)
    click.echo(f"{format_ref(target.name or new, target.tag)} -> {info.digest}")


@click.command()
@click.argument("references", nargs=-1, required=True)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--base", help="The variant made for this base model (path, name or hub id).")
@click.pass_context
def rm(ctx: click.Context, references: tuple[str, ...], yes: bool, base: str | None) -> None:
    """Remove names (a digest removes the adapter and all its names).

    Blobs are freed later by `lorahub gc`.

    \b
    Example:
      lorahub rm sql-expert:v1
    """
    hub = hub_from(ctx)
    references = tuple(dict.fromkeys(references))  # the same reference twice: once
    infos = [hub.get(r, base=base) for r in references]  # fail on a bad one before removing any
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("refusing to remove without confirmation; pass -y")
        listed = ", ".join(references)
        if not click.confirm(f"Remove {listed}?", default=False, err=True):
            click.echo("Nothing removed.", err=True)
            sys.exit(1)
    for ref, info in zip(references, infos, strict=True):
        try:
            removed = hub.remove(ref, base=base)
        except AdapterNotFound:  # `rm @digest name`: the digest already took the name with it
            click.echo(f"{ref} was already removed ({info.short})")
            continue
        click.echo(f"removed {', '.join(removed)} ({info.short})")


@click.command()
@click.argument("reference")
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--force", is_flag=True, help="Replace OUT if it is an earlier lorahub output (nothing else)."
)
@click.option("--base", help="The variant made for this base model (path, name or hub id).")
@click.pass_context
def export(ctx: click.Context, reference: str, out: str, force: bool, base: str | None) -> None:
    """Write an adapter as a PEFT folder (PeftModel.from_pretrained loads it).

    OUT must be new or empty; --force replaces an earlier lorahub output there, never a
    folder holding other files, a symbolic link or the current directory.

    \b
    Example:
      lorahub export sql-expert:prod ./out
    """
    path = hub_from(ctx).export(reference, out, force=force, base=base)
    click.echo(str(path))


def register(group: click.Group) -> None:
    for command in (add, ls, show, tag, rm, export):
        group.add_command(command)
