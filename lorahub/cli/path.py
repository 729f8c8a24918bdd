"""``lorahub path``: the folder PeftModel.from_pretrained loads straight from the store."""

from __future__ import annotations

import click

from .options import (
    HF_CACHE_ENV,
    STORE_ENV,
    base_option,
    env_vars,
    json_option,
    quiet_option,
    reference_argument,
)
from .output import echo_json, folder_path, hub_from


@env_vars(*STORE_ENV, *HF_CACHE_ENV)
@click.command()
@reference_argument()
@base_option
@quiet_option
@json_option
@click.pass_context
def path(ctx: click.Context, reference: str, base: str | None, quiet: bool, as_json: bool) -> None:
    """Print a folder PeftModel.from_pretrained loads, without copying the weights.

    The folder (under the store, in paths/) holds the adapter's config, model card and
    lorahub.json, read-only, and its weights as a hard link to the store's blob (a symbolic
    link when the store spans filesystems). It is made the first time and printed as it is
    after that. Do not write into it; `lorahub gc` removes it once the adapter is removed.
    --base picks the variant made for that base model. -q prints the folder's absolute
    path (as without it).

    \b
    Examples:
      lorahub path sql-expert:v1
      lorahub path sql-expert --base ./Llama-3.2-1B --json
      In Python: PeftModel.from_pretrained(model, hub.path("sql-expert:v1"))
    """
    from ..paths import link_kind

    hub = hub_from(ctx)
    info = hub.get(reference, base=base)
    folder = hub.path(f"@{info.digest}")
    if as_json:
        from ..digest import Digest
        from ..formats.peft import SAFETENSORS

        blob = hub.blobs.path(Digest.parse(info.weights_digest))
        echo_json(
            {
                "path": folder_path(folder),
                "digest": info.digest,
                "refs": list(info.refs),
                "weights": str(folder / SAFETENSORS),
                "link": link_kind(folder / SAFETENSORS, blob),
            }
        )
        return
    click.echo(folder_path(folder))


def register(group: click.Group) -> None:
    group.add_command(path)
