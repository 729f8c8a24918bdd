"""``lorahub env``: what lorahub runs with, for a bug report or a quick look.

Versions (lorahub, Python, torch and CUDA, huggingface_hub, SQLAlchemy), the store, the
catalog's URL with any password masked, the Hugging Face endpoint, cache and offline mode,
and whether a Hugging Face token is present: never the token itself. Reads nothing of the
store but its path, so it answers on a broken store too.
"""

from __future__ import annotations

import platform
import re
import sys
from importlib import metadata
from typing import Any
from urllib.parse import parse_qsl, urlencode

import click

from .options import HUB_ENV, S3_ENV, STORE_ENV, env_vars, json_option
from .output import echo_json

MASK = "***"
#: Query parameters of a database URL that carry a secret.
_SECRET_KEYS = re.compile(r"pass|pwd|secret|token|key", re.I)


def mask_url(url: str) -> str:
    """``url`` with the password (in the authority or in the query) replaced by ``***``."""
    # scheme://user:password@host... ; the password runs to the last '@' before the path.
    masked = re.sub(r"^([\w+.-]+://[^:/@]*):[^/]*@", rf"\1:{MASK}@", url)
    base, sep, query = masked.partition("?")
    if not sep:
        return masked
    pairs = [
        (k, MASK if _SECRET_KEYS.search(k) else v)
        for k, v in parse_qsl(query, keep_blank_values=True)
    ]
    return f"{base}?{urlencode(pairs, safe='*/:')}"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _torch() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"version": None, "cuda_available": False, "cuda": None, "devices": []}
    available = bool(torch.cuda.is_available())
    return {
        "version": str(torch.__version__),
        "cuda_available": available,
        "cuda": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if available
        else [],
    }


def _token_source() -> str | None:
    """Where huggingface_hub would take a token from ("HF_TOKEN" or "saved"), or None."""
    import os

    from huggingface_hub import get_token

    if get_token() is None:
        return None
    return "HF_TOKEN" if os.environ.get("HF_TOKEN", "").strip() else "saved"


def _aws_endpoint() -> str | None:
    import os

    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return mask_url(url) if url else None


def _aws_credentials() -> str | None:
    """Where boto3 finds S3 credentials ("env", "shared-credentials-file"...) and the access
    key id; never the secret key."""
    try:
        import boto3
    except ImportError:
        return "boto3 not installed (pip install 'lorahub-store[s3]')"
    creds = boto3.session.Session().get_credentials()
    if creds is None:
        return None
    return f"{creds.access_key} ({creds.method})"


def collect(home: str | None) -> dict[str, Any]:
    """The environment as plain data (``lorahub env --json``)."""
    from huggingface_hub import constants

    from .._version import __version__
    from ..hfenv import hub_cache, offline
    from ..settings import load

    settings = load(home)
    token = _token_source()
    return {
        "lorahub": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": _torch(),
        "huggingface_hub": _version("huggingface_hub"),
        "sqlalchemy": _version("SQLAlchemy"),
        "safetensors": _version("safetensors"),
        "peft": _version("peft"),
        "store": str(settings.home),
        "database_url": mask_url(settings.db_url),
        "blobs_url": mask_url(settings.blobs_url) if settings.blobs_url else None,
        "aws_endpoint_url": _aws_endpoint(),
        "aws_credentials": _aws_credentials() if settings.blobs_url else None,
        "hf_endpoint": str(constants.ENDPOINT),
        "hf_cache": hub_cache(),
        "hf_offline": offline(),
        "hf_token": token is not None,
        "hf_token_source": token,
    }


@env_vars(*STORE_ENV, *S3_ENV, *HUB_ENV)
@click.command("env")
@json_option
@click.pass_context
def env(ctx: click.Context, as_json: bool) -> None:
    """Print versions, the store, the catalog URL (password masked) and the Hugging Face
    settings lorahub runs with. Shows whether a Hub token is set, never the token.

    No -q: it reports settings, not objects, so there is no identifier to print; --json
    gives each value to a script.

    \b
    Example:
      lorahub env --json
    """
    root = ctx.find_root()
    home = root.obj.get("home") if isinstance(root.obj, dict) else None
    data = collect(home)
    if as_json:
        echo_json(data)
        return
    t = data["torch"]
    if t["version"] is None:
        torch_line = "not installed"
    elif t["cuda_available"]:
        torch_line = f"{t['version']} (CUDA {t['cuda']}: {', '.join(t['devices'])})"
    else:
        torch_line = f"{t['version']} (CUDA not available)"
    token = data["hf_token_source"]
    lines = [
        ("lorahub", data["lorahub"]),
        ("python", f"{data['python']} ({data['platform']})"),
        ("torch", torch_line),
        ("huggingface_hub", data["huggingface_hub"] or "-"),
        ("SQLAlchemy", data["sqlalchemy"] or "-"),
        ("safetensors", data["safetensors"] or "-"),
        ("peft", data["peft"] or "not installed"),
        ("store", data["store"]),
        ("database", data["database_url"]),
        ("blobs", data["blobs_url"] or f"{data['store']}/blobs"),
    ]
    if data["blobs_url"]:
        lines += [
            ("S3 endpoint", data["aws_endpoint_url"] or "AWS default"),
            ("S3 credentials", data["aws_credentials"] or "none found"),
        ]
    lines += [
        ("HF endpoint", data["hf_endpoint"]),
        ("HF cache", data["hf_cache"]),
        ("HF offline", "yes" if data["hf_offline"] else "no"),
        ("HF token", {None: "none", "HF_TOKEN": "set (HF_TOKEN)"}.get(token, f"set ({token})")),
    ]
    width = max(len(k) for k, _ in lines)
    click.echo("\n".join(f"{k:<{width}}  {v}" for k, v in lines))


def register(group: click.Group) -> None:
    group.add_command(env)
