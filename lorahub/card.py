"""Model cards (README.md) for exported and pushed adapters, built with huggingface_hub's
``ModelCard`` so the Hub reads the metadata the way it expects.

A card is a pure function of the adapter's identity (and the title given): no date, no local
name, so pushing the same adapter twice uploads a byte-identical README and the Hub client
skips it.
"""

from __future__ import annotations

import re
from typing import Any

from .info import AdapterInfo

# What the Hub accepts as ``base_model``: a repo id, never a local path.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def is_repo_id(name: str | None) -> bool:
    """Whether ``name`` looks like a Hub repo id (``org/name``) rather than a local path."""
    return bool(name) and bool(_REPO_ID.match(name or "")) and ".." not in (name or "")


def adapter_card(info: AdapterInfo, *, title: str | None = None) -> str:
    """A card with ``library_name: peft``, the base model when known, and a short summary.

    ``title`` heads the card (default: the adapter's first name, else its short digest).
    ``base_model`` goes into the metadata only when it is a Hub repo id: the Hub rejects a
    local path there, and PEFT configs often hold one.
    """
    from huggingface_hub import ModelCard, ModelCardData

    base = info.base.name or info.config.get("base_model_name_or_path")
    data: dict[str, Any] = {"library_name": "peft", "tags": ["lora", "lorahub", "peft"]}
    if is_repo_id(base):
        data["base_model"] = base
        data["base_model_relation"] = "adapter"
    card_data = ModelCardData(**data)
    prov = info.provenance
    heading = title or (info.refs[0] if info.refs else info.short)
    lines = [
        f"# {heading}",
        "",
        "A LoRA adapter exported by [lorahub](https://pypi.org/project/lorahub/).",
        "",
        f"- digest: `{info.digest}`",
        f"- rank: {info.rank}, alpha: {info.alpha:g}"
        + (", rsLoRA" if info.use_rslora else "")
        + (", DoRA" if info.use_dora else ""),
        f"- targets: {', '.join(info.targets)} ({info.module_count} modules)",
        f"- base model: {base or 'unknown'}"
        + (f" (revision {info.base.revision})" if info.base.revision else ""),
    ]
    if info.base.signature:
        lines.append(f"- base signature: `{info.base.signature}`")
    if info.base.content_hash:
        lines.append(f"- base content hash: `{info.base.content_hash}`")
    if not info.base.signature and not info.base.content_hash:
        lines.append("- base fingerprint: none recorded (base not verified)")
    lines.append(f"- provenance: {_provenance_line(prov)}")
    lines += [
        "",
        "```python",
        "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base_model, path_or_repo)",
        "```",
        "",
    ]
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return str(ModelCard(content))


def _provenance_line(prov: dict[str, Any]) -> str:
    kind = prov.get("kind") or "import"
    if kind == "compose":
        parents = ", ".join(f"`{p}`" for p in prov.get("parents", []))
        return f"composed with `{prov.get('method')}` from {parents}"
    extra = ", ".join(f"{k}: {v}" for k, v in sorted(prov.items()) if k != "kind")
    return f"{kind} ({extra})" if extra else str(kind)
