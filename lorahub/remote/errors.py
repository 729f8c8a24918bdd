"""huggingface_hub's exceptions turned into lorahub errors that say what to do.

Every message is scrubbed of the token, and says only whether one was sent, never its value.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from .. import hfenv
from ..errors import (
    CorruptData,
    InvalidAdapter,
    InvalidReference,
    LorahubError,
    RemoteError,
    RemoteNotFound,
)
from .repo import public_url


def _token_sent(writing: bool) -> bool:
    """Whether the client sent a token (never its value: only whether there is one)."""
    from huggingface_hub import get_token

    if writing:
        return True
    if hfenv.implicit_token_disabled():
        return False
    try:
        return get_token() is not None
    except Exception:  # token resolution is best effort here: this only shapes a message
        return False


def scrub(text: str) -> str:
    """Remove the token from a message, should any layer below have echoed it."""
    from huggingface_hub import get_token

    try:
        token = get_token()
    except Exception:
        token = None
    if token and token in text:
        text = text.replace(token, "<token>")
    return text


def http_status(exc: BaseException) -> int | None:
    """The HTTP status an exception carries, if any."""
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _server_says(exc: BaseException) -> str:
    msg = getattr(exc, "server_message", None) or str(exc)
    return " ".join(str(msg).split())[:300]


_SIZES_RE = re.compile(r"should be of size (\d+) but has size (\d+)")


def _sizes(text: str) -> tuple[int | None, int | None]:
    """The announced and the received size in huggingface_hub's "Consistency check" message."""
    m = _SIZES_RE.search(text)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def _is_transport_error(exc: BaseException) -> bool:
    module = type(exc).__module__.split(".")[0]
    return module in ("httpx2", "httpx", "httpcore2", "httpcore", "requests", "urllib3") or (
        isinstance(exc, (ConnectionError, TimeoutError))
    )


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str, *, writing: bool) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into lorahub errors that say what to do.

    Every ``RemoteError`` carries ``repo_id`` and ``revision``. A repo, revision or file the
    Hub says is not there is a ``RemoteNotFound``; an HTTP failure carries its ``status`` and
    the server's (scrubbed) message; a download whose size does not match what the Hub
    announced is ``CorruptData``.
    """
    from huggingface_hub import errors as e

    ep = public_url(hfenv.endpoint())
    login = "log in with `hf auth login` (or set HF_TOKEN)"
    try:
        yield
    except LorahubError:
        raise
    except e.LocalTokenNotFoundError:
        if hfenv.offline():  # the token is asked for first, but offline is the cause
            raise RemoteError(
                f"HF_HUB_OFFLINE is set, so {ep} cannot be reached for {repo_id}: unset it to push",
                repo_id=repo_id,
                revision=revision,
            ) from None
        raise RemoteError(
            f"pushing to {repo_id} needs a Hugging Face token with write access: {login}",
            repo_id=repo_id,
            revision=revision,
        ) from None
    except e.OfflineModeIsEnabled:
        raise RemoteError(
            f"HF_HUB_OFFLINE is set, so {ep} cannot be reached for {repo_id}: unset it to "
            + ("push" if writing else "download"),
            repo_id=repo_id,
            revision=revision,
        ) from None
    except e.GatedRepoError as exc:
        how = (
            "the token sent has not been granted access"
            if _token_sent(writing)
            else "no token was sent"
        )
        raise RemoteError(
            f"{repo_id} is gated and {how}: request access at {ep}/{repo_id} with your account, "
            f"then {login}",
            repo_id=repo_id,
            revision=revision,
            status=http_status(exc),
        ) from exc
    except e.RepositoryNotFoundError as exc:
        if _token_sent(writing):
            hint = "or it is private and your token cannot see it: check the name and your access"
        else:
            hint = f"or it is private and no token was sent: check the name, or {login}"
        raise RemoteNotFound(
            f"{repo_id} was not found on {ep}, {hint}",
            repo_id=repo_id,
            revision=revision,
            status=http_status(exc),
        ) from exc
    except e.RevisionNotFoundError as exc:
        raise RemoteNotFound(
            f"{repo_id} has no revision {revision!r}: give an existing branch, tag or commit "
            f"(see {ep}/{repo_id}/tree/main)",
            repo_id=repo_id,
            revision=revision,
            status=http_status(exc),
        ) from exc
    except e.LocalEntryNotFoundError as exc:
        if hfenv.offline():
            raise RemoteError(
                f"HF_HUB_OFFLINE is set and {repo_id}@{revision} is not in the Hugging Face "
                f"cache ({hfenv.hub_cache()}): pull it once online, or unset HF_HUB_OFFLINE",
                repo_id=repo_id,
                revision=revision,
            ) from exc
        raise RemoteError(
            f"cannot reach {ep} for {repo_id}@{revision} and it is not in the Hugging Face "
            "cache: check your connection and HF_ENDPOINT, then try again",
            repo_id=repo_id,
            revision=revision,
        ) from exc
    except e.EntryNotFoundError as exc:
        said = scrub(_server_says(exc))
        raise RemoteNotFound(
            f"a file is missing from {repo_id} at {revision}: {said}",
            repo_id=repo_id,
            revision=revision,
            status=http_status(exc),
            server_message=said,
        ) from exc
    except e.SafetensorsParsingError as exc:
        raise InvalidAdapter(
            f"{repo_id}@{revision}: the safetensors header cannot be read "
            f"({scrub(str(exc)).splitlines()[0]}); the file is corrupt or not safetensors"
        ) from None
    except e.HfHubHTTPError as exc:
        raise _http_error(exc, repo_id, revision, writing, ep, login) from exc
    except e.HFValidationError as exc:
        raise InvalidReference(scrub(str(exc).splitlines()[0])) from None
    except ValueError as exc:
        if "Invalid filename" in str(exc):
            raise RemoteError(
                f"refusing to download from {repo_id}: {ep} lists a file name that escapes the "
                "repository; nothing was stored",
                repo_id=repo_id,
                revision=revision,
            ) from exc
        raise
    except OSError as exc:
        if "Consistency check failed" in str(exc):
            expected, actual = _sizes(str(exc))
            raise CorruptData(
                f"a download from {repo_id}@{revision} was cut short or altered in transit (its "
                "size does not match what the Hub announced); nothing was stored: pull again",
                expected=expected,
                actual=actual,
            ) from None
        if _is_transport_error(exc):
            raise _unreachable(exc, repo_id, revision, ep) from exc
        raise
    except Exception as exc:
        if _is_transport_error(exc):
            raise _unreachable(exc, repo_id, revision, ep) from exc
        raise


def _unreachable(exc: BaseException, repo_id: str, revision: str, ep: str) -> RemoteError:
    return RemoteError(
        f"cannot reach {ep} for {repo_id} ({type(exc).__name__}: {scrub(str(exc))[:200]}): "
        "check your connection and HF_ENDPOINT; with HF_HUB_OFFLINE=1, pull uses the cache",
        repo_id=repo_id,
        revision=revision,
    )


def _http_error(
    exc: BaseException, repo_id: str, revision: str, writing: bool, ep: str, login: str
) -> RemoteError:
    status = http_status(exc)
    said = scrub(_server_says(exc))

    def fail(message: str) -> RemoteError:
        return RemoteError(
            message, repo_id=repo_id, revision=revision, status=status, server_message=said
        )

    if status == 401:
        if writing or _token_sent(writing):
            return fail(
                f"{ep} refused the credentials for {repo_id} ({said}): the token is unknown or "
                f"expired; {login}"
            )
        return fail(f"{repo_id} needs authentication ({said}): {login}")
    if status == 403:
        if writing:
            namespace = repo_id.split("/")[0] if "/" in repo_id else "your namespace"
            return fail(
                f"your token cannot write to {repo_id} ({said}): use a token with write access "
                f"to {namespace!r}, then {login}"
            )
        return fail(f"access to {repo_id} was refused ({said}): check your access")
    if status == 412 and writing:
        return fail(
            f"{repo_id}@{revision} changed while pushing (someone else committed): push again"
        )
    if status == 400 and writing:
        hint = "; --revision must name a branch (tags are set with --tag)"
        return fail(
            f"the Hub refused the push to {repo_id}@{revision} ({said})"
            + (hint if "branch" in said.lower() else "")
        )
    return fail(f"the Hub answered {status} for {repo_id}@{revision}: {said}")
