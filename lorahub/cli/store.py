"""Store commands: add, ls, show, tag, rm, export."""

from __future__ import annotations

import shlex
import sys

import click

from ..digest import short
from ..errors import AdapterNotFound, InvalidArgument, InvalidReference
from ..info import AdapterInfo, AddResult
from ..refs import format_ref, parse
from ..serving import hints as serving_hints
from ..units import human_size
from .options import (
    HF_CACHE_ENV,
    STORE_ENV,
    base_model_id_option,
    base_option,
    env_vars,
    filter_option,
    force_out_option,
    json_option,
    quiet_option,
    reference_argument,
    yes_option,
)
from .output import echo_json, echo_json_list, folder_path, hub_from, table
from .progress import echo, progress_bar


def _ranks_label(info: AdapterInfo) -> str:
    """``8``, or every rank when the modules' differ (``8,16``; ``4..64`` for many)."""
    ranks = sorted(info.ranks)
    if len(ranks) == 1:
        return str(info.rank)
    return ",".join(map(str, ranks)) if len(ranks) <= 3 else f"{ranks[0]}..{ranks[-1]}"


def _rank_line(info: AdapterInfo) -> str:
    if len(info.ranks) == 1:
        return str(info.rank)
    counts = ", ".join(f"{n} of rank {r}" for r, n in sorted(info.ranks.items()))
    return f"{info.rank} (r; modules: {counts})"


def _clip(value: str, limit: int = 200) -> str:
    """A metadata value on one line (kohya's tag frequencies run to kilobytes)."""
    flat = value.replace("\n", " ").replace("\r", " ")
    return flat if len(flat) <= limit else f"{flat[:limit]}... ({len(flat)} chars; --json for all)"


def _base_label(info: AdapterInfo) -> str:
    b = info.base
    if b.name:
        return b.name if b.verified else f"{b.name} (unverified)"
    return short(b.signature) if b.signature else "-"


@env_vars(*STORE_ENV, *HF_CACHE_ENV, "HF_HUB_DISABLE_PROGRESS_BARS")
@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("-n", "--name", help="Reference to give it: name or name:tag (default: folder name).")
@click.option("-r", "--recursive", is_flag=True, help="Find every adapter below each folder.")
@base_option
@click.option("--force", is_flag=True, help="Store even if it does not fit --base.")
@quiet_option
@json_option
@click.pass_context
def add(
    ctx: click.Context,
    paths: tuple[str, ...],
    name: str | None,
    recursive: bool,
    base: str | None,
    force: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Import adapters (PEFT folders; kohya/diffusers files with --base).

    --base records the base model the adapters are for and checks that they fit it.
    -q prints each stored adapter's digest reference (@xxh128:...).

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

    def report(r: AddResult) -> None:  # each as it finishes, not all at the end
        if as_json:
            return
        if r.adapter is None:
            echo(f"refused  {r.source}: {r.reason}", err=True)
        elif quiet:
            echo(f"@{r.adapter.digest}")
        else:
            refs = ", ".join(r.adapter.refs) or "(no name)"
            echo(f"{r.status:<8} {r.adapter.digest}  {refs}  <- {r.source}")
            unmapped = r.adapter.origin.get("unmapped_keys") or []
            if unmapped:
                shown = ", ".join(unmapped[:5]) + (" ..." if len(unmapped) > 5 else "")
                echo(
                    f"note: {len(unmapped)} keys matched no base tensor and were left out: {shown}",
                    err=True,
                )

    with progress_bar("adding", unit="adapter") as cb:
        results = hub.add_many(
            list(paths),
            recursive=recursive,
            name=name,
            base=base,
            force=force,
            progress=cb,
            on_result=report,
        )
    if as_json:
        echo_json([r.to_dict() for r in results])
    if not results or any(r.status == "refused" for r in results):
        sys.exit(1)


@env_vars(*STORE_ENV, *HF_CACHE_ENV)
@click.command("ls")
@filter_option
@base_option
@quiet_option
@json_option
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

    --base lists only the adapters that fit that base model. -q prints each adapter's
    digest reference (@xxh128:...). A bad --filter is a usage error (exit 2).
    --filter rank=N matches an adapter any of whose modules has rank N (a rank_pattern),
    not only its config's r; RANK shows every rank when they differ.

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
                    _ranks_label(i),
                    f"{i.alpha:g}",
                    ",".join(i.targets),
                    _base_label(i),
                    human_size(i.size),
                    i.created_at.strftime("%Y-%m-%d %H:%M"),
                ]
            )
    table(rows, ["REFERENCE", "DIGEST", "RANK", "ALPHA", "TARGETS", "BASE", "SIZE", "CREATED"])


@env_vars(*STORE_ENV, *HF_CACHE_ENV)
@click.command()
@reference_argument()
@base_option
@quiet_option
@json_option
@click.option(
    "--metadata",
    "with_metadata",
    is_flag=True,
    help="Also print the safetensors header metadata; warn where its rank/alpha disagree "
    "with the config.",
)
@click.pass_context
def show(
    ctx: click.Context,
    reference: str,
    base: str | None,
    quiet: bool,
    as_json: bool,
    with_metadata: bool,
) -> None:
    """Show one adapter: identity, LoRA settings, base, origin and provenance.

    --base picks the variant of REFERENCE made for that base model. -q prints the digest
    reference (@xxh128:...); --json the full record, manifest included.

    \b
    Example:
      lorahub show sql-expert:v1 --json
    """
    hub = hub_from(ctx)
    info = hub.get(reference, base=base)
    meta = hub.metadata("@" + info.digest) if with_metadata else None
    if as_json:
        record = info.to_dict(manifest=True, card=True)
        record["serving"] = serving_hints(info).to_dict()
        if meta is not None:
            record["metadata"] = meta.to_dict()
        echo_json(record)
        return
    if meta is not None:
        for d in meta.disagreements:
            click.echo(f"warning: {d.message}", err=True)
    if quiet:
        click.echo(f"@{info.digest}")
        return
    cfg = info.config
    lines = [
        ("digest", info.digest),
        ("names", ", ".join(info.refs) or "-"),
        ("rank", _rank_line(info)),
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
        if k == "metadata" and isinstance(v, dict):  # header metadata: --metadata lists it
            v = f"{len(v)} header key(s); `lorahub show --metadata` lists them"
        if k == "card" and isinstance(v, str):  # the original model card: exported, pushed
            v = f"README.md kept ({len(v.encode())} bytes)"
        lines.append((f"  {k}", str(v)))
    prov = info.provenance
    if prov.get("kind") not in (None, "import"):
        for k, v in sorted(prov.items()):
            if v is None:
                continue
            text = ", ".join(map(str, v)) if isinstance(v, list | tuple) else str(v)
            lines.append((f"provenance {k}", text))
    lines.append(("created", info.created_at.strftime("%Y-%m-%d %H:%M:%S UTC")))
    if meta is not None:
        for title, items in (("metadata", meta.imported), ("blob metadata", meta.stored)):
            lines.append((title, "-" if not items else f"{len(items)} key(s)"))
            lines += [(f"  {k}", _clip(v)) for k, v in sorted(items.items())]
    lines += _serving_lines(info)
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        click.echo(f"{k:<{width}}  {v}")


@env_vars(*STORE_ENV)
@click.command()
@reference_argument()
@click.argument("new")
@quiet_option
@json_option
@click.pass_context
def tag(ctx: click.Context, reference: str, new: str, quiet: bool, as_json: bool) -> None:
    """Give an adapter another name:tag.

    -q prints the adapter's digest reference (@xxh128:...); --json its record.

    \b
    Example:
      lorahub tag sql-expert:v1 sql-expert:prod
    """
    info = hub_from(ctx).tag(reference, new)
    if as_json:
        echo_json(info.to_dict())
        return
    if quiet:
        click.echo(f"@{info.digest}")
        return
    target = parse(new)
    click.echo(f"{format_ref(target.name or new, target.tag)} -> {info.digest}")


@env_vars(*STORE_ENV, *HF_CACHE_ENV)
@click.command()
@reference_argument("references", nargs=-1, required=True)
@yes_option
@base_option
@quiet_option
@json_option
@click.pass_context
def rm(
    ctx: click.Context,
    references: tuple[str, ...],
    yes: bool,
    base: str | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Remove names (a digest removes the adapter and all its names).

    Blobs are freed later by `lorahub gc`. --base picks the variant made for that base
    model. -q prints the digest reference (@xxh128:...) of each adapter that lost a name,
    once; --json one object per REFERENCE, with the names removed.

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
    done = []
    printed: set[str] = set()
    for ref, info in zip(references, infos, strict=True):
        try:
            removed = hub.remove(ref, base=base)
        except AdapterNotFound:  # `rm @digest name`: the digest already took the name with it
            removed = []
        done.append({"reference": ref, "digest": info.digest, "removed": list(removed)})
        if as_json:
            continue
        if quiet:
            if removed and info.digest not in printed:
                printed.add(info.digest)
                click.echo(f"@{info.digest}")
        elif not removed:
            click.echo(f"{ref} was already removed ({info.short})")
        else:
            click.echo(f"removed {', '.join(removed)} ({info.short})")
    if as_json:
        echo_json(done)


@env_vars(*STORE_ENV, *HF_CACHE_ENV, "HF_HUB_DISABLE_PROGRESS_BARS")
@click.command()
@reference_argument("references", nargs=-1)
@click.argument("out", type=click.Path(file_okay=False))
@force_out_option
@base_option
@click.option(
    "--layout",
    type=click.Choice(["peft", "vllm"]),
    default="peft",
    show_default=True,
    help="peft: one adapter as a PEFT folder. vllm: a folder per adapter that fits --base.",
)
@click.option(
    "--served-model-id",
    help="--layout vllm: the model the engine serves (`vllm serve MODEL`), written as "
    "base_model_name_or_path (default: the base's Hub repo id).",
)
@base_model_id_option(prefix="--layout peft: ")
@quiet_option
@json_option
@click.pass_context
def export(
    ctx: click.Context,
    references: tuple[str, ...],
    out: str,
    force: bool,
    base: str | None,
    layout: str,
    served_model_id: str | None,
    base_model_id: str | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Write an adapter as a PEFT folder (PeftModel.from_pretrained loads it), or keep a
    folder of adapters a serving engine loads (--layout vllm).

    OUT must be new or empty; --force replaces an earlier lorahub output there, never a
    folder holding other files, a symbolic link or the current directory. --base picks the
    variant made for that base model. -q prints the folder's absolute path; --json the
    adapter, that path and the base_model_name_or_path written.

    --layout vllm OUT writes OUT/<lora name>/ for every adapter name whose variant fits
    --base (or only the REFERENCES given): adapter_config.json with base_model_name_or_path
    set to --served-model-id, and the weights linked from the store (no copy). The LoRA name
    is the adapter's name for tag latest, name@tag for other tags (org/x is org--x). Run it
    again to update: unchanged folders stay as they are, folders of adapters removed or no
    longer fitting are deleted, and nothing lorahub did not make is touched. vLLM reads OUT
    as VLLM_LORA_RESOLVER_CACHE_DIR; LoRAX as local adapter ids. -q prints the absolute
    path of each LoRA folder kept (OUT/<lora name>).

    \b
    Examples:
      lorahub export sql-expert:prod ./out
      lorahub export --layout vllm /srv/loras --base meta-llama/Llama-3.2-1B
    """
    if layout == "vllm" and base_model_id is not None:
        raise click.UsageError("--base-model-id goes with --layout peft (vllm: --served-model-id)")
    if layout == "vllm":
        _export_layout(ctx, references, out, force, base, served_model_id, quiet, as_json)
        return
    if len(references) != 1 or served_model_id is not None:
        raise click.UsageError(
            "export takes one REFERENCE and OUT (--served-model-id goes with --layout vllm)"
        )
    reference = references[0]
    with progress_bar("exporting") as cb:
        result = hub_from(ctx).export_result(
            reference, out, force=force, base=base, progress=cb, base_model_id=base_model_id
        )
    if as_json:
        echo_json(result.to_dict())
        return
    click.echo(folder_path(result.path))


def _serving_lines(info: AdapterInfo) -> list[tuple[str, str]]:
    """``show``'s serving hints: the --max-lora-rank vLLM needs, what engines may refuse."""
    h = serving_hints(info)
    need = f"--max-lora-rank {h.vllm_max_lora_rank} (vLLM); " if h.vllm_max_lora_rank else ""
    lines = [("serving", f"{need}largest module rank {h.max_rank}")]
    return lines + [("  warning", w) for w in h.warnings]


def _export_layout(
    ctx: click.Context,
    references: tuple[str, ...],
    out: str,
    force: bool,
    base: str | None,
    served_model_id: str | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """``export --layout vllm``: print what changed, the notes and how to serve the folder."""
    if force:
        raise click.UsageError(
            "--force does not apply to --layout vllm: it always updates lorahub's own folders "
            "and never touches others"
        )
    result = hub_from(ctx).export_layout(
        out, base=base, served_model_id=served_model_id, references=references
    )
    if as_json:
        echo_json(result.to_dict())
        return
    if quiet:
        if result.adapters:
            click.echo("\n".join(folder_path(result.out / a.folder) for a in result.adapters))
        return
    for a in result.adapters:
        click.echo(f"{a.status:<9} {a.folder}  <- {a.reference} ({short(a.digest)})")
        for warning in a.hints.warnings:
            click.echo(f"note: {a.folder}: {warning}", err=True)
    for folder in result.removed:
        click.echo(f"{'removed':<9} {folder}")
    for name, reason in result.skipped:
        click.echo(f"skipped {name}: {reason}", err=True)
    if result.adapters:
        click.echo(
            f"serve: VLLM_ALLOW_RUNTIME_LORA_UPDATING=True VLLM_PLUGINS=lora_filesystem_resolver "
            f"VLLM_LORA_RESOLVER_CACHE_DIR={shlex.quote(str(result.out.absolute()))} vllm serve "
            f"{shlex.quote(result.served_model_id)} --enable-lora "
            f"--max-lora-rank {result.vllm_max_lora_rank or result.max_rank}",
            err=True,
        )
    else:
        click.echo(f"no adapter fits {result.base}", err=True)


def register(group: click.Group) -> None:
    for command in (add, ls, show, tag, rm, export):
        group.add_command(command)
