"""Hub commands: push and pull, through huggingface_hub (HF_TOKEN / `hf auth login`)."""

from __future__ import annotations

import click

from ..units import human_size
from . import progress
from .logs import hf_duplicates_dropped
from .options import (
    HUB_ENV,
    STORE_ENV,
    base_model_id_option,
    base_option,
    env_vars,
    json_option,
    quiet_option,
    reference_argument,
)
from .output import echo_json, hub_from


@env_vars(*STORE_ENV, *HUB_ENV, "HF_HUB_DISABLE_PROGRESS_BARS")
@click.command()
@reference_argument()
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (when it is created).")
@click.option("--revision", help="Branch to push to (default main; created if missing).")
@click.option("--tag", help="Tag the pushed commit (e.g. v1).")
@click.option("--path-in-repo", help="Folder inside the repo to push into.")
@click.option(
    "--endpoint",
    metavar="URL",
    help="Push to this Hub instead of HF_ENDPOINT's, e.g. a lorahub serve (uploads via LFS).",
)
@base_option
@base_model_id_option
@json_option
@quiet_option
@click.pass_context
def push(
    ctx: click.Context,
    reference: str,
    repo_id: str,
    private: bool,
    revision: str | None,
    tag: str | None,
    path_in_repo: str | None,
    endpoint: str | None,
    base: str | None,
    base_model_id: str | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Push an adapter to the Hugging Face Hub as a PEFT adapter repo.

    Creates the repo if needed. Files already there are not uploaded again; an unchanged
    adapter makes no commit. Uses your Hugging Face token (HF_TOKEN or `hf auth login`).
    --base pushes the variant of REFERENCE made for that base model. The pushed
    adapter_config.json names the base by its Hub repo id (--base-model-id, else the
    recorded base's), never by a local path; a pull restores the stored value. -q prints the
    commit URL (the pushed state's identifier: it names the repo and the commit).

    \b
    Examples:
      lorahub push sql-expert:v1 myorg/sql-expert
      lorahub push sql-expert:v1 myorg/sql-expert --private --revision main --tag v1
      lorahub push sql-expert:v1 myorg/sql-expert --base-model-id meta-llama/Llama-3.2-1B
      HF_TOKEN=lh_... lorahub push sql-expert:v1 team/sql-expert --endpoint http://hub:8000
    """
    from ..remote import progress_bars

    hub = hub_from(ctx)
    with progress_bars(progress.enabled(quiet or as_json)), hf_duplicates_dropped():
        result = hub.push(
            reference,
            repo_id,
            private=True if private else None,
            revision=revision,
            tag=tag,
            path_in_repo=path_in_repo,
            base=base,
            base_model_id=base_model_id,
            endpoint=endpoint,
        )
    if as_json:
        echo_json(result.to_dict())
        return
    if quiet:
        click.echo(result.commit_url)
        return
    where = f"{result.repo_id}@{result.revision}"
    if result.path_in_repo:
        where += f" ({result.path_in_repo}/)"
    if result.committed:
        files = len(result.files_uploaded)
        click.echo(
            f"pushed   {result.digest}  -> {where}  commit {result.commit[:12]} "
            f"({files} file{'s' if files != 1 else ''}, {human_size(result.bytes_uploaded)})"
        )
    else:
        click.echo(
            f"unchanged {result.digest}  -> {where}  already at commit {result.commit[:12]}; "
            "nothing uploaded"
        )
    if result.tag:
        click.echo(f"tagged   {result.tag} -> {result.commit[:12]}")
    click.echo(result.commit_url)


@env_vars(*STORE_ENV, *HUB_ENV, "HF_HUB_DISABLE_PROGRESS_BARS")
@click.command()
@click.argument("repo_id")
@click.option("--revision", help="Branch, tag or commit (or write REPO_ID@REVISION).")
@click.option("--subfolder", help="Folder of the repo that holds the adapter.")
@click.option("-n", "--name", help="Reference to give it (default: the repo id, tag = revision).")
@json_option
@quiet_option
@click.pass_context
def pull(
    ctx: click.Context,
    repo_id: str,
    revision: str | None,
    subfolder: str | None,
    name: str | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Import a PEFT adapter from a Hugging Face Hub repo (any PEFT adapter repo works).

    Downloads only the adapter files, through the Hugging Face cache: a repo already there
    costs no download. With HF_HUB_OFFLINE=1 the cache alone is used. -q prints the
    stored adapter's digest reference (@xxh128:...).

    \b
    Examples:
      lorahub pull myorg/sql-expert@v1 --name sql-expert
      lorahub pull someone/their-peft-adapter --subfolder my_adapter
    """
    from ..remote import progress_bars

    hub = hub_from(ctx)
    with progress_bars(progress.enabled(quiet or as_json)), hf_duplicates_dropped():
        info = hub.pull(repo_id, revision=revision, subfolder=subfolder, name=name)
    if as_json:
        echo_json(info.to_dict())
        return
    if quiet:
        click.echo(f"@{info.digest}")
        return
    origin = info.origin
    source = f"{origin.get('repo_id', repo_id)}@{origin.get('revision', revision or 'main')}"
    commit = str(origin.get("commit", ""))[:12]
    refs = ", ".join(info.refs) or "(no name)"
    click.echo(f"pulled   {info.digest}  {refs}  <- {source} (commit {commit})")


def register(group: click.Group) -> None:
    for command in (push, pull):
        group.add_command(command)
