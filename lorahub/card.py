"""Model cards (README.md) for exported and pushed adapters, built with huggingface_hub's
``ModelCard`` so the Hub reads the metadata the way it expects."""

from __future__ import annotations

from typing import Any

from .info import AdapterInfo


def adapter_card(info: AdapterInfo) -> str:
    """A card with ``library_name: peft``, the base model when known, and a short summary."""
    from huggingface_hub import ModelCard, ModelCardData

    base = info.base.name or info.config.get("base_model_name_or_path")
    data: dict[str, Any] = {"library_name": "peft", "tags": ["lora", "lorahub", "peft"]}
    if base:
        data["base_model"] = base
        data["base_model_relation"] = "adapter"
    card_data = ModelCardData(**data)
    prov = info.provenance
    lines = [
        f"# {info.refs[0] if info.refs else info.short}",
        "",
        "A LoRA adapter exported by [lorahub](https://pypi.org/project/lorahub/).",
        "",
        f"- digest: `{info.digest}`",
        f"- rank: {info.rank}, alpha: {info.alpha:g}"
        + (", rsLoRA" if info.use_rslora else "")
        + (", DoRA" if info.use_dora else ""),
        f"- targets: {', '.join(info.targets)} ({info.module_count} modules)",
        f"- base model: {base or 'unknown'}",
    ]
    if info.base.signature:
        lines.append(f"- base signature: `{info.base.signature}`")
    if info.base.content_hash:
        lines.append(f"- base content hash: `{info.base.content_hash}`")
    if prov.get("kind") == "compose":
        parents = ", ".join(f"`{p}`" for p in prov.get("parents", []))
        lines.append(f"- composed with `{prov.get('method')}` from {parents}")
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
