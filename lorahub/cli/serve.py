"""``lorahub serve``: the store over the Hugging Face Hub's HTTP API, run by uvicorn.

Callers send a token made by ``lorahub token add`` (``Authorization: Bearer``); without
``--allow-anonymous`` every read needs one. ``--gated NS`` makes downloads in the namespace
``NS`` need a token for it even when reads are anonymous.
"""

from __future__ import annotations

import os
import signal

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
    help="Serve reads to anyone who can connect (default: every request needs a token).",
)
@click.option(
    "--gated",
    multiple=True,
    metavar="NS",
    help="Downloads from namespace NS need a token for it (repeatable); info stays visible.",
)
@click.option(
    "--max-upload-size",
    default="10GB",
    show_default=True,
    metavar="SIZE",
    help="Largest file a client may upload (e.g. 500MB, 2GiB); checked while it streams.",
)
@click.pass_context
def serve(
    ctx: click.Context,
    host: str,
    port: int,
    workers: int,
    namespace: str,
    allow_anonymous: bool,
    gated: tuple[str, ...],
    max_upload_size: str,
) -> None:
    """Serve the store over the Hugging Face Hub API, to the holders of its tokens.

    Every client that honours HF_ENDPOINT (huggingface_hub, PEFT, transformers, `hf
    download`) then downloads adapters from it: the PEFT folder of `name:tag` is the repo
    `local/name` at revision `tag` (`main` is `latest`). No -q or --json: it prints the
    address it listens on to stderr and runs until interrupted.

    Each request needs a token (`lorahub token add NAME [--write]`, sent by the client as
    HF_TOKEN or token=...); --allow-anonymous serves reads without one.

    \b
    Examples:
      lorahub token add laptop
      lorahub serve --port 8000
      HF_ENDPOINT=http://127.0.0.1:8000 HF_TOKEN=lh_... hf download local/sql-expert
      lorahub serve --allow-anonymous --gated team
    """
    import uvicorn

    from ..serve.app import ANONYMOUS_ENV, GATED_ENV, MAX_UPLOAD_ENV, NAMESPACE_ENV, create_app
    from ..serve.mapping import Mapping
    from ..serve.workers import Supervisor, WorkerFailed
    from ..serve.zerocopy import PROTOCOL

    try:
        Mapping(namespace)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--namespace") from None
    for ns in gated:
        try:
            Mapping(ns)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--gated") from None
    from ..units import parse_size

    try:
        max_upload = parse_size(max_upload_size)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-upload-size") from None
    hub = hub_from(ctx)  # opened (and migrated) here, so a bad store fails before listening
    from ..serve.listen import listen, per_worker_sockets

    # Listening before any worker starts: a taken port is an error here, not in a worker.
    shared = workers == 1 or not per_worker_sockets()
    sockets = listen(host, port, 1 if shared else workers)
    port = int(sockets[0].getsockname()[1])
    access = "anonymous reads allowed" if allow_anonymous else "a token needed"
    url = f"http://[{host}]:{port}" if ":" in host and "[" not in host else f"http://{host}:{port}"
    click.echo(f"Serving {hub.home} at {url} ({access}); clients: HF_ENDPOINT={url}", err=True)
    if not hub.tokens():
        click.echo(
            "hint: this store has no token yet: make one with `lorahub token add NAME` "
            "(--write to upload)",
            err=True,
        )
    if workers == 1:
        app = create_app(
            hub,
            namespace,
            allow_anonymous=allow_anonymous,
            gated=gated,
            max_upload_size=max_upload,
            freeze_gc=True,
        )
        config = uvicorn.Config(app, host=host, port=port, access_log=False, http=PROTOCOL)
        server = uvicorn.Server(config)
        server.run(sockets=sockets)
        if not server.started:  # uvicorn before 0.31 returns quietly when startup fails
            raise WorkerFailed("the server could not start; its messages are above")
        return
    os.environ["LORAHUB_HOME"] = str(hub.home)
    os.environ[NAMESPACE_ENV] = namespace
    os.environ[ANONYMOUS_ENV] = "1" if allow_anonymous else "0"
    os.environ[GATED_ENV] = ",".join(gated)
    os.environ[MAX_UPLOAD_ENV] = str(max_upload)
    if os.name != "posix":  # no descriptors to pass: uvicorn's own workers, one socket
        for sock in sockets:
            sock.close()
        uvicorn.run(
            "lorahub.serve.app:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            access_log=False,
            http=PROTOCOL,
        )
        return
    import logging.config

    logging.config.dictConfig(uvicorn.config.LOGGING_CONFIG)
    stopped_by = Supervisor(sockets, workers, host).run()
    if stopped_by is not None:  # end as the signal says, as one uvicorn process does
        signal.raise_signal(stopped_by)


def register(group: click.Group) -> None:
    group.add_command(serve)
