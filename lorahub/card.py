"""Model cards (README.md): the original card an adapter came with, kept at ``add``/``pull``,
and the cards lorahub writes for exported, pushed and merged folders, built with
huggingface_hub's ``ModelCard``/``ModelCardData`` so the Hub reads the metadata as it expects.

The original card is kept as text in the adapter's origin (``origin["card"]``): it is no part
of the adapter's identity, and it survives ``fsck``'s rebuild of the catalog with the origin
(the journal records it). A written card carries the original's metadata (license, datasets,
language, tags, pipeline_tag...) and text under lorahub's own section, which is fenced by
HTML comments so that a card lorahub wrote and imported again is not nested twice.

A card is a pure function of the adapter (its identity and kept card) and the ids given: no
date, no local path, so pushing one adapter twice uploads a byte-identical README.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .info import AdapterInfo

log = logging.getLogger(__name__)

README = "README.md"
#: Larger READMEs are not kept (a model card is a few kB; this is not one).
MAX_CARD_BYTES = 256 << 10
#: The origin key the original card's text is kept under.
ORIGIN_KEY = "card"
BEGIN = "<!-- lorahub:begin -->"
END = "<!-- lorahub:end -->"
_OURS = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n*", re.DOTALL)
# Cards lorahub wrote before the fences were all generated text: none of it is kept.
_LEGACY = "exported by [lorahub](https://pypi.org/project/lorahub/)"
_FRONT = re.compile(r"\A\s*---\s*\n(.*?\n)?---\s*(?:\n|\Z)", re.DOTALL)
# A Hub repo id as ``base_model`` takes it: ``namespace/name``, never a path. A bare name is
# refused too: it is as likely a local folder or a lorahub base label as a legacy repo id.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
# Keys ModelCardData would take as its own methods or arguments, and ``eval_results``, its
# EvalResult objects (never YAML: the Hub's key is ``model-index``).
_RESERVED = {"to_dict", "to_yaml", "get", "pop", "ignore_metadata_errors", "self", "eval_results"}
# ModelCardData's typed fields by what each takes from YAML (tests/test_cards.py checks these
# against the installed huggingface_hub), and lorahub's own ``base_model_relation``.
_STRING_FIELDS = {
    "license",
    "license_name",
    "license_link",
    "library_name",
    "pipeline_tag",
    "model_name",
    "base_model_relation",
}
_STRINGS_FIELDS = {"datasets", "language", "tags", "metrics", "base_model"}
# PEFT's task_type -> the Hub's pipeline tag and the transformers class that loads the base.
TASKS: dict[str, tuple[str, str]] = {
    "CAUSAL_LM": ("text-generation", "AutoModelForCausalLM"),
    "SEQ_2_SEQ_LM": ("text2text-generation", "AutoModelForSeq2SeqLM"),
    "SEQ_CLS": ("text-classification", "AutoModelForSequenceClassification"),
    "TOKEN_CLS": ("token-classification", "AutoModelForTokenClassification"),
    "QUESTION_ANS": ("question-answering", "AutoModelForQuestionAnswering"),
    "FEATURE_EXTRACTION": ("feature-extraction", "AutoModel"),
}
# What a merged checkpoint's card takes from its base's card: terms and audience, not scores.
_MERGED_KEEP = ("license", "license_name", "license_link", "language", "pipeline_tag")


def is_repo_id(name: Any) -> bool:
    """Whether ``name`` is a Hub repo id (``namespace/name``) rather than a local path.

    >>> is_repo_id("meta-llama/Llama-3.1-8B"), is_repo_id("/models/llama"), is_repo_id("llama")
    (True, False, False)
    """
    return (
        isinstance(name, str)
        and bool(_REPO_ID.match(name))
        and ".." not in name
        and "--" not in name
        and not name.endswith((".", "-"))
        and not name.split("/")[1].startswith((".", "-"))
    )


def read_card(path: Path) -> str | None:
    """The text of the model card at ``path``, or None when there is none to keep (missing,
    not a regular file, over :data:`MAX_CARD_BYTES`, not UTF-8, or a symbolic link that leads
    out of its folder); a refusal is logged, never raised.

    A ``README.md`` that is a symbolic link is read only when its target lies inside the
    card's folder, or, for a snapshot of the Hugging Face cache (whose files link into the
    repo's ``blobs/``), inside that cache repo's folder: a link to ``~/.aws/credentials``
    would otherwise be kept in the origin and published by ``export`` and ``push``."""
    try:
        real = _inside(path, card_root(path.parent))
        if real is None:
            return None
        data = _read_regular(real)
    except OSError as exc:
        log.warning("cannot read the model card %s: %s", path, exc)
        return None
    if data is None:
        return None
    if len(data) > MAX_CARD_BYTES:
        log.warning("%s is larger than a model card (%d bytes): not kept", path, MAX_CARD_BYTES)
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        log.warning("%s is not UTF-8 text: the model card was not kept", path)
        return None
    return text if _worth_keeping(text) else None


_CACHE_REPO = re.compile(r"^(models|datasets|spaces)--.+")


def card_root(folder: Path) -> Path:
    """The folder a card in ``folder`` may link within: the Hugging Face cache repo folder
    (``models--org--name``) when ``folder`` lies in one of its ``snapshots/<commit>/``,
    else ``folder`` itself (both as real paths)."""
    folder = Path(os.path.realpath(folder))
    for parent in folder.parents:
        if parent.name == "snapshots" and _CACHE_REPO.match(parent.parent.name):
            return parent.parent
    return folder


def _inside(path: Path, root: Path) -> Path | None:
    """``path``'s real path when it lies within ``root``'s (a link leading out is refused,
    logged), or None when there is no file to read."""
    if not path.is_symlink():
        return path if path.exists() else None
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(root):
        log.warning(
            "%s is a symbolic link to %s, outside %s: the model card was not kept",
            path,
            real,
            root,
        )
        return None
    return real


def _read_regular(path: Path) -> bytes | None:
    """At most :data:`MAX_CARD_BYTES` + 1 bytes of ``path``, opened without following a
    link (where the platform can) and read only when it is a regular file."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    flags |= getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # swapped for a link since it was checked
            log.warning("%s became a symbolic link: the model card was not kept", path)
            return None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        return f.read(MAX_CARD_BYTES + 1)


# What lorahub writes into a card by itself: a card holding no more is not kept.
_GENERATED_KEYS = {"library_name", "base_model", "base_model_relation", "tags", "pipeline_tag"}
_GENERATED_TAGS = {"lora", "lorahub", "peft"}


def _worth_keeping(text: str) -> bool:
    """False for an empty card, and for one lorahub wrote holding nothing of anyone else's
    (pulling a repo lorahub pushed keeps no card: the adapter's own facts make it again)."""
    if not text.strip():
        return False
    meta, body = split_card(text)
    tags = meta.get("tags") or []
    return bool(
        body.strip()
        or set(meta) - _GENERATED_KEYS
        or not isinstance(tags, list)
        or set(map(str, tags)) - _GENERATED_TAGS
    )


def split_card(text: str | None) -> tuple[dict[str, Any], str]:
    """A card's YAML metadata and its text, without any section lorahub wrote; YAML that
    does not parse is dropped (logged), the text kept."""
    if not text:
        return {}, ""
    text = text.replace("\r\n", "\n")
    match = _FRONT.match(text)
    meta: dict[str, Any] = {}
    body = text
    if match:
        body = text[match.end() :]
        meta = _parse_yaml(match.group(1) or "")
    body = _OURS.sub("", body)
    if _LEGACY in body:
        body = ""
    return meta, body.strip("\n")


def _parse_yaml(inner: str) -> dict[str, Any]:
    # PyYAML itself (huggingface_hub's own dependency), not ModelCard: an ``add`` reads cards
    # and must not import the Hub client.
    import yaml  # type: ignore[import-untyped]  # stubs are the separate types-PyYAML

    # libyaml's safe loader where PyYAML was built with it: the same documents, a tenth of
    # the time (`lorahub serve` reads a card per adapter it first answers for).
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        data = yaml.load(inner, Loader=loader)  # a safe loader, C or Python
    except (ValueError, TypeError, RecursionError, yaml.YAMLError) as exc:
        log.warning("the model card's YAML metadata does not parse (%s): dropped", exc)
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        log.warning("the model card's YAML metadata is not a mapping of names: dropped")
        return {}
    # Each key checked on its own: one ModelCardData cannot take (its methods and arguments,
    # a field of the wrong type, which would also have the Hub refuse the README at push)
    # is dropped, logged, and the rest kept.
    kept: dict[str, Any] = {}
    for k, v in data.items():
        if k.startswith("_") or k in _RESERVED or not _well_typed(k, v):
            log.warning(
                "the model card's metadata field %r (%s) is not one a card takes: dropped",
                k,
                type(v).__name__,
            )
        else:
            kept[k] = v
    return kept


def _well_typed(key: str, value: Any) -> bool:
    if key in _STRING_FIELDS:
        return isinstance(value, str)
    if key in _STRINGS_FIELDS:
        return isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        )
    if key == "model-index":
        return isinstance(value, list) and all(isinstance(v, dict) for v in value)
    return True


def original_card(info: AdapterInfo) -> str | None:
    """The model card the adapter came with (kept at ``add``/``pull``), or None."""
    card = info.origin.get(ORIGIN_KEY)
    return card if isinstance(card, str) else None


def hub_base_id(info: AdapterInfo, recorded: str | None = None) -> str | None:
    """The Hub repo id of the adapter's base: ``recorded`` (the repo id the recorded base
    came from, when the caller knows it), else the config's ``base_model_name_or_path`` when
    it is a repo id (:func:`is_repo_id`); None when only a local path or label is known."""
    if recorded:
        return recorded
    name = info.config.get("base_model_name_or_path")
    return str(name) if is_repo_id(name) else None


def adapter_card(
    info: AdapterInfo,
    *,
    title: str | None = None,
    repo_id: str | None = None,
    subfolder: str | None = None,
    base_model_id: str | None = None,
) -> str:
    """The README of an exported or pushed adapter folder.

    Metadata: the original card's (license, datasets, language, tags...), with
    ``library_name: peft``, ``base_model`` (a Hub repo id only, never a local path; dropped
    when none is known) with ``base_model_relation: adapter``, and ``pipeline_tag`` derived
    from the config's ``task_type`` when the original has none. Text: lorahub's facts and a
    usage snippet, then the original card's text.

    Args:
        info: the stored adapter.
        title: the heading (default: the adapter's first name, else its short digest).
        repo_id: where the adapter is published, for the usage snippet (a push's repo).
        subfolder: its folder in that repo.
        base_model_id: the base's Hub repo id, as checked by the caller (default:
            :func:`hub_base_id` of ``info``).

    Example:
        >>> adapter_card(info, repo_id="myorg/sql-expert")  # doctest: +SKIP
        '---\\nlibrary_name: peft\\nbase_model: tiny/llama\\n...'
    """
    original, body = split_card(original_card(info))
    base = base_model_id or hub_base_id(info)
    data = _adapter_metadata(original, base, info.config.get("task_type"))
    heading = title or (info.refs[0] if info.refs else info.short)
    revision = info.base.revision if base and base == info.base.name else None
    lines = [
        BEGIN,
        f"# {heading}",
        "",
        f"A LoRA adapter for `{base}`." if base else "A LoRA adapter.",
        "",
        f"- digest: `{info.digest}`",
        f"- rank: {info.rank}, alpha: {info.alpha:g}"
        + (", rsLoRA" if info.use_rslora else "")
        + (", DoRA" if info.use_dora else ""),
        f"- targets: {', '.join(info.targets)} ({info.module_count} modules)",
        f"- base model: {base or 'not on the Hub (a local model)'}"
        + (f" (revision {revision})" if revision else ""),
    ]
    if info.base.signature:
        lines.append(f"- base signature: `{info.base.signature}`")
    if info.base.content_hash:
        lines.append(f"- base content hash: `{info.base.content_hash}`")
    if not info.base.signature and not info.base.content_hash:
        lines.append("- base fingerprint: none recorded (base not verified)")
    lines.append(f"- provenance: {_provenance_line(info.provenance)}")
    snippet = _adapter_snippet(info.config.get("task_type"), base, revision, repo_id, subfolder)
    lines += ["", "## Usage", "", *snippet, END]
    text = "\n".join(lines) + "\n"
    if body:
        text += "\n" + body + "\n"
    return _render(data, text)


def adapter_card_data(info: AdapterInfo, *, base_model_id: str | None = None) -> dict[str, Any]:
    """The metadata :func:`adapter_card` writes in the card's front matter (what a reader of
    the card parses back), without rendering the card: a hundredth of its time, for
    ``lorahub serve``'s model info (``cardData``) of an adapter it has not answered for yet.
    Metadata the Hub's card code refuses takes the rendering path, which drops it as
    :func:`adapter_card` does."""
    from huggingface_hub import ModelCardData

    original, _ = split_card(original_card(info))
    base = base_model_id or hub_base_id(info)
    data = _adapter_metadata(original, base, info.config.get("task_type"))
    try:
        card = ModelCardData(ignore_metadata_errors=True, **data)
        if card.eval_results is None:
            # What to_dict gives, less its deep copy (a third of this function's time):
            # ``data`` was made for this call alone, so nothing else holds its values.
            return {k: v for k, v in vars(card).items() if v is not None}
        return dict(card.to_dict())  # eval results become a model-index again
    except Exception:  # any failure of a third party's card code: as the card handles it
        return split_card(adapter_card(info, base_model_id=base_model_id))[0]


def _adapter_metadata(
    original: Mapping[str, Any], base: str | None, task_type: Any
) -> dict[str, Any]:
    data = {k: v for k, v in original.items() if k not in ("base_model", "base_model_relation")}
    kept = original.get("base_model")
    if base is None and kept is not None:
        # The original card's own base_model, when every entry is a repo id (PEFT writes the
        # training machine's path there).
        listed = kept if isinstance(kept, list) else [kept]
        if listed and all(is_repo_id(b) for b in listed):
            data["base_model"] = kept
    if base is not None:
        data["base_model"] = base
    if "base_model" in data:
        data["base_model_relation"] = "adapter"
    data["library_name"] = "peft"
    data["tags"] = _tags(original.get("tags"), ("lora", "lorahub", "peft"))
    if not isinstance(data.get("pipeline_tag"), str):
        data.pop("pipeline_tag", None)
        task = TASKS.get(str(task_type)) if task_type else None
        if task is not None:
            data["pipeline_tag"] = task[0]
    return data


def _tags(original: Any, ours: Sequence[str]) -> list[str]:
    """The original tags (strings; none of the Hub's ``base_model:...`` tags, which PEFT
    fills with local paths and the Hub derives itself), then ours."""
    listed = original if isinstance(original, list) else [original] if original else []
    tags = [t for t in listed if isinstance(t, str) and not t.startswith("base_model:")]
    return tags + [t for t in ours if t not in tags]


def _adapter_snippet(
    task_type: Any,
    base: str | None,
    revision: str | None,
    repo_id: str | None,
    subfolder: str | None,
) -> list[str]:
    task = TASKS.get(str(task_type or ""))
    cls = task[1] if task else "AutoModel"
    base_arg = json.dumps(base) if base else '"path/to/base-model"  # the base it was trained on'
    if base and revision:
        base_arg = f"{json.dumps(base)}, revision={json.dumps(revision)}"
    adapter_arg = json.dumps(repo_id) if repo_id else '"path/to/this/folder"'
    if repo_id and subfolder:
        adapter_arg += f", subfolder={json.dumps(subfolder)}"
    return [
        "```python",
        "from peft import PeftModel",
        f"from transformers import {cls}",
        "",
        f"base = {cls}.from_pretrained({base_arg})",
        f"model = PeftModel.from_pretrained(base, {adapter_arg})",
        "```",
    ]


def merged_card(
    *,
    base_repo_id: str | None,
    base_revision: str | None,
    base_card: str | None,
    base_config: Mapping[str, Any] | None,
    adapters: Sequence[Mapping[str, Any]],
    weights: Sequence[float],
    dtype: str,
) -> str:
    """The README of a merged checkpoint folder.

    Metadata: the base card's license, language and pipeline tag; ``base_model`` (the base's
    Hub repo id, when it has one) with ``base_model_relation: merge``; ``library_name`` from
    the base's config (diffusers or transformers). Text: the inputs (each adapter's names,
    digest and weight), the output dtype, and how to load the folder.

    Args:
        base_repo_id: the base's Hub repo id, or None for a local base.
        base_revision: the base's commit, when it came from the Hugging Face cache.
        base_card: the base folder's README, if any.
        base_config: the base's ``config.json``, if any.
        adapters: ``{"digest", "refs"}`` of each merged adapter (``merge_metadata``'s).
        weights: the weight each adapter was merged with.
        dtype: the output's dtype.
    """
    original, _ = split_card(base_card)
    data: dict[str, Any] = {k: original[k] for k in _MERGED_KEEP if k in original}
    base = base_repo_id or None  # a BaseModel has one only when it came from the Hub
    config = dict(base_config or {})
    diffusers = isinstance(config.get("_class_name"), str)
    if diffusers:
        data["library_name"] = "diffusers"
    elif config.get("model_type") or config.get("architectures"):
        data["library_name"] = "transformers"
    if base:
        data["base_model"] = base
    data["base_model_relation"] = "merge"
    data["tags"] = ["lora", "lorahub", "merge"]
    intro = (
        (f"`{base}`" if base else "A local base model")
        + f" with LoRA adapters merged into its weights (output dtype {dtype}"
        + (f", base revision {base_revision}" if base and base_revision else "")
        + "). Inputs:"
    )
    lines = [BEGIN, "# Merged checkpoint", "", intro, ""]
    for k, w in enumerate(weights):
        entry = adapters[k] if k < len(adapters) else {}
        refs = entry.get("refs")
        name = ", ".join(map(str, refs)) if isinstance(refs, list) and refs else f"adapter {k + 1}"
        digest = entry.get("digest")
        lines.append(
            f"- {name}" + (f": `{digest}`" if isinstance(digest, str) else "") + f", weight {w:g}"
        )
    lines += ["", "## Usage", "", *_merged_snippet(config, diffusers), END]
    return _render(data, "\n".join(lines) + "\n")


def _merged_snippet(config: Mapping[str, Any], diffusers: bool) -> list[str]:
    if diffusers:
        cls = str(config["_class_name"])
        lib = "diffusers"
    else:
        archs = config.get("architectures")
        arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else ""
        cls = "AutoModelForCausalLM" if arch.endswith("ForCausalLM") else "AutoModel"
        lib = "transformers"
    if not re.fullmatch(r"[A-Za-z_]\w{0,99}", cls):
        cls, lib = "AutoModel", "transformers"
    return [
        "```python",
        f"from {lib} import {cls}",
        "",
        f'model = {cls}.from_pretrained("path/to/this/folder")',
        "```",
    ]


def _render(data: Mapping[str, Any], text: str) -> str:
    """The card of ``data`` and ``text``. Metadata ModelCardData cannot take (a value the
    checks of :func:`_parse_yaml` let through, such as a ``model-index`` of the wrong shape)
    never stops an export or a push: the card is made again from the known, well-typed
    fields only (lorahub's own among them), logged."""
    from huggingface_hub import ModelCard, ModelCardData

    try:
        card_data = ModelCardData(ignore_metadata_errors=True, **data)
        content = f"---\n{card_data.to_yaml()}\n---\n\n{text}"
        return str(ModelCard(content, ignore_metadata_errors=True))
    except Exception as exc:  # any failure of a third party's card code
        if not data:
            raise
        known = _STRING_FIELDS | _STRINGS_FIELDS
        kept = {k: v for k, v in data.items() if k in known and _well_typed(k, v)}
        if kept == dict(data):  # nothing to drop: the card goes out without metadata
            kept = {}
        dropped = sorted(set(data) - set(kept))
        log.warning(
            "the model card's metadata could not be written (%s: %s): dropped %s",
            type(exc).__name__,
            exc,
            ", ".join(dropped),
        )
        return _render(kept, text)


def _provenance_line(prov: dict[str, Any]) -> str:
    kind = prov.get("kind") or "import"
    if kind == "compose":
        parents = ", ".join(f"`{p}`" for p in prov.get("parents", []))
        return f"composed with `{prov.get('method')}` from {parents}"
    extra = ", ".join(f"{k}: {v}" for k, v in sorted(prov.items()) if k != "kind")
    return f"{kind} ({extra})" if extra else str(kind)
