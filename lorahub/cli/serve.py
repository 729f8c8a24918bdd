"""``lorahub serve``: the store over the Hugging Face Hub's HTTP API, run by uvicorn.

A preview: the read API only, and anonymous, so ``--allow-anonymous`` is required until
tokens come (``lorahub token``); without it the command refuses to start.
"""

from __future__ import annotations

import os

import click

from .options import STORE_ENV, env_vars
from .output import hub_from


@env_vars(*STORE_ENV)
@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 256),
    help="Server processes sharing the store.",
)
@click.option(
    "--namespace",
    default="local",
    show_default=True,
    help="Where adapter names without a namespace appear: sql-expert -> local/sql-expert.",
)
@click.option(
    "--allow-anonymous",
    is_flag=True,
    help="Serve reads to anyone who can connect (required: tokens are not implemented yet).",
)
@click.pass_context
def serve(
    ctx: click.Context, host: str, port: int, workers: int, namespace: str, allow_anonymous: bool
) -> None:
    """Serve the store over the Hugging Face Hub API (preview: read only, anonymous).

    Every client that honours HF_ENDPOINT (huggingface_hub, PEFT, transformers, `hf
    download`) then downloads adapters from it: the PEFT folder of `name:tag` is the repo
    `local/name` at revision `tag` (`main` is `latest`). No -q or --json: it prints the
    address it listens on to stderr and runs until interrupted.

    \b
    Example:
      lorahub serve --allow-anonymous --port 8000
      HF_ENDPOINT=http://127.0.0.1:8000 hf download local/sql-expert --revision v1
    """
    import uvicorn

    from ..serve.app import ANONYMOUS_ENV, NAMESPACE_ENV, create_app
    from ..serve.mapping import Mapping

    if not allow_anonymous:
        raise click.UsageError(
            "tokens are not implemented yet: this preview serves anonymous reads only; "
            "start it with --allow-anonymous"
        )
    try:
        Mapping(namespace)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--namespace") from None
    hub = hub_from(ctx)  # opened (and migrated) here, so a bad store fails before listening
    click.echo(
        f"Serving {hub.home} at http://{host}:{port} (read only, anonymous); "
        f"clients: HF_ENDPOINT=http://{host}:{port}",
        err=True,
    )
    if workers == 1:
        app = create_app(hub, namespace, allow_anonymous=allow_anonymous)
        uvicorn.run(app, host=host, port=port, access_log=False)
        return
    os.environ["LORAHUB_HOME"] = str(hub.home)
    os.environ[NAMESPACE_ENV] = namespace
    os.environ[ANONYMOUS_ENV] = "1" if allow_anonymous else "0"
    uvicorn.run(
        "lorahub.serve.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        access_log=False,
    )


def register(group: click.Group) -> None:
    group.add_command(serve)
