"""kohya-ss (sd-scripts) and diffusers LoRA files, read into a PEFT-style ``LoraAdapter``.

kohya keys are ``<prefix>_<module path with "." replaced by "_">.lora_down.weight`` (A),
``.lora_up.weight`` (B) and ``.alpha`` (0-d; 0 or absent means alpha = rank), with prefixes
``lora_unet``, ``lora_te`` (SD1/2) and ``lora_te1`` / ``lora_te2`` (SDXL). Underscores are
ambiguous, so names are mapped back to dotted module names through a base model's tensor
table; keys that map to nothing in that table are returned, not guessed.

diffusers saves PEFT-like keys under a component prefix (``unet.``, ``text_encoder.``,
``transformer.``...), with ``lora_A``/``lora_B`` (or the older ``lora.down``/``lora.up`` and
``lora_linear_layer.down``/``.up``), and since diffusers 0.34 the PEFT ``LoraConfig`` as JSON
in the header metadata under ``lora_adapter_metadata``, with keys prefixed by component
(``"unet.r"``) when a pipeline saved it, or bare when a single model did.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import LoraAdapter
from ..errors import InvalidAdapter

if TYPE_CHECKING:
    import torch

    from ..base import TensorInfo

log = logging.getLogger(__name__)

KOHYA_PREFIXES = ("lora_unet", "lora_te1", "lora_te2", "lora_te")
# Component folder names a kohya prefix corresponds to, for tables that hold a whole pipeline.
_KOHYA_COMPONENT = {
    "lora_unet": ("unet", "transformer"),
    "lora_te": ("text_encoder",),
    "lora_te1": ("text_encoder",),
    "lora_te2": ("text_encoder_2",),
}
_KOHYA_KEY = re.compile(
    r"^(lora_unet|lora_te1|lora_te2|lora_te)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$"
)
# LyCORIS and other kohya-family networks this reader does not turn into LoRA.
_UNSUPPORTED = {
    ".hada_w1_a": "LoHa",
    ".lokr_w1": "LoKr",
    ".lokr_w1_a": "LoKr",
    ".lora_mid.weight": "LoCon with CP decomposition (lora_mid)",
    ".dora_scale": "kohya/LyCORIS DoRA (dora_scale)",
    ".oft_blocks": "OFT",
    ".oft_diag": "OFT",
    ".diff": "full-weight diff (LyCORIS 'full')",
    ".w_norm": "LyCORIS norm",
}
KEEP_METADATA = ("ss_", "sshs_", "modelspec.")

DIFFUSERS_COMPONENTS = (
    "unet",
    "transformer",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "prior",
    "decoder",
)
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
# diffusers suffix spellings -> the PEFT part they are.
_DIFFUSERS_PARTS = (
    (".lora_A.weight", ".lora_A.weight"),
    (".lora_B.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora_B.weight"),
    (".lora_linear_layer.down.weight", ".lora_A.weight"),
    (".lora_linear_layer.up.weight", ".lora_B.weight"),
    (".lora_B.bias", ".lora_B.bias"),
    (".lora_magnitude_vector", ".lora_magnitude_vector"),
    (".lora_embedding_A", ".lora_embedding_A"),
    (".lora_embedding_B", ".lora_embedding_B"),
    (".alpha", ".alpha"),
)


def is_kohya(keys: Iterable[str]) -> bool:
    """True when any key is a kohya LoRA key (``lora_unet_...lora_down.weight`` and co)."""
    return any(_KOHYA_KEY.match(k) for k in keys)


def is_diffusers(keys: Iterable[str], metadata: Mapping[str, str] | None) -> bool:
    """True for a diffusers LoRA file: the ``lora_adapter_metadata`` header, or LoRA keys
    under a diffusers component prefix (``unet.``, ``transformer.``, ``text_encoder.``...)."""
    if metadata and DIFFUSERS_METADATA_KEY in metadata:
        return True
    for key in keys:
        component = key.split(".", 1)[0]
        part = _diffusers_part(key)
        if component in DIFFUSERS_COMPONENTS and part is not None and part[1] != ".alpha":
            return True
    return False


# --------------------------------------------------------------------------------------
# kohya


def read_kohya(
    path: Path,
    tensors_of_base: Mapping[str, TensorInfo],
    *,
    prefixes: Iterable[str] | None = None,
) -> tuple[LoraAdapter, list[str]]:
    """Read a kohya LoRA file against a base tensor table.

    Args:
        path: the ``.safetensors`` file.
        tensors_of_base: the base's tensor names (a transformers/diffusers model, or a whole
            pipeline whose names start with ``unet.``/``text_encoder.``...).
        prefixes: only these kohya prefixes (``lora_unet``, ``lora_te1``...); default all.

    Returns:
        The adapter, with PEFT module names and config (``r`` the most common rank, the
        others in ``rank_pattern``; ``lora_alpha`` likewise with ``alpha_pattern``), and the
        sorted file keys that mapped to nothing in the base (e.g. the text encoder's, when the
        table is a UNet's).

    Raises:
        InvalidAdapter: not a safetensors file, unsupported network type (LoHa, LoKr...),
            incomplete modules, or no module maps onto the base.

    Example:
        >>> adapter, skipped = read_kohya(Path("style.safetensors"), unet.tensors)  # doctest: +SKIP
    """
    tensors, metadata = _load(path)
    wanted = set(prefixes) if prefixes is not None else set(KOHYA_PREFIXES)
    lookup = _underscore_lookup(tensors_of_base)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    keys_of: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    unmapped: list[str] = []
    for key in sorted(tensors):
        m = _KOHYA_KEY.match(key)
        if m is None:
            _refuse_unsupported(path, key)
            unmapped.append(key)
            continue
        prefix, flat, part = m.groups()
        module = _map_flat(prefix, flat, lookup) if prefix in wanted else None
        if module is None:
            unmapped.append(key)
            continue
        kohya_name = f"{prefix}_{flat}"
        if owner.setdefault(module, kohya_name) != kohya_name:
            raise InvalidAdapter(
                f"{path}: {owner[module]} and {kohya_name} both map to {module!r} in this base; "
                "import against the matching model only (e.g. prefixes=['lora_te1'])"
            )
        parts.setdefault(module, {})[part] = tensors[key]
        keys_of.setdefault(module, []).append(key)
    if not parts:
        sample = ", ".join(unmapped[:3])
        raise InvalidAdapter(
            f"{path}: no kohya LoRA module maps onto this base model ({len(unmapped)} keys, "
            f"e.g. {sample}); pass the base it was trained on (for Stable Diffusion the UNet "
            "or the text encoder folder)"
        )
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]] = {}
    for module, p in parts.items():
        down, up = p.get("lora_down.weight"), p.get("lora_up.weight")
        if down is None or up is None:
            missing = "lora_down" if down is None else "lora_up"
            raise InvalidAdapter(f"{path}: module {owner[module]} has no {missing}.weight")
        alpha = p.get("alpha")
        factors[module] = (down, up, None if alpha is None else _scalar(path, owner[module], alpha))
    adapter = _build(
        path, factors, {k: v for k, v in metadata.items() if k.startswith(KEEP_METADATA)}
    )
    return adapter, unmapped


def _underscore_lookup(tensors_of_base: Mapping[str, Any]) -> dict[str, str | None]:
    """``layers_0_self_attn_q_proj`` -> ``layers.0.self_attn.q_proj`` for every ``*.weight``;
    None where two dotted names flatten to the same string."""
    out: dict[str, str | None] = {}
    for name in tensors_of_base:
        if not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        flat = module.replace(".", "_")
        out[flat] = module if out.get(flat, module) == module else None
    return out


def _map_flat(prefix: str, flat: str, lookup: Mapping[str, str | None]) -> str | None:
    names = [flat]
    if prefix != "lora_unet" and flat.startswith("text_model_"):
        # transformers 5 dropped CLIPTextModel's ``text_model.`` level; kohya names keep it.
        names.append(flat[len("text_model_") :])
    for name in names:
        for candidate in (name, *(f"{c}_{name}" for c in _KOHYA_COMPONENT[prefix])):
            if candidate in lookup:
                return lookup[candidate]
    return None


def _refuse_unsupported(path: Path, key: str) -> None:
    if not key.startswith(KOHYA_PREFIXES):
        return
    for marker, kind in _UNSUPPORTED.items():
        if marker in key:
            raise InvalidAdapter(
                f"{path} is a {kind} network (key {key!r}), not plain LoRA; lorahub imports "
                "LoRA only (lora_down/lora_up)"
            )


def _scalar(path: Path, module: str, t: torch.Tensor) -> float:
    if t.numel() != 1:
        raise InvalidAdapter(f"{path}: {module}.alpha must be a scalar, got {list(t.shape)}")
    return float(t.reshape(()).item())


def _build(
    path: Path,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, float | None]],
    metadata: Mapping[str, str],
) -> LoraAdapter:
    """A PEFT config + keys from ``module -> (A, B, alpha or None)``; alpha None or 0 -> r."""
    ranks = {m: int(a.shape[0]) for m, (a, _, _) in factors.items()}
    alphas = {
        m: (float(alpha) if alpha else float(ranks[m])) for m, (_, _, alpha) in factors.items()
    }
    r = _most_common(ranks.values())
    lora_alpha = _most_common(alphas.values())
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": _num(lora_alpha),
        "rank_pattern": {m: k for m, k in sorted(ranks.items()) if k != r},
        "alpha_pattern": {m: _num(a) for m, a in sorted(alphas.items()) if a != lora_alpha},
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in factors}),
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "bias": "none",
    }
    state: dict[str, torch.Tensor] = {}
    for m, (a, b, _) in factors.items():
        if a.dim() == 4 and b.dim() == 2:
            b = b[:, :, None, None]
        state[f"{m}.lora_A.weight"] = a
        state[f"{m}.lora_B.weight"] = b
    try:
        return LoraAdapter.from_state_dict(config, state, metadata)
    except InvalidAdapter as e:
        raise InvalidAdapter(f"{path}: {e}") from e


def _most_common(values: Iterable[Any]) -> Any:
    counts = Counter(values)
    top = max(counts.values())
    # Ties go to the smallest value so the result does not depend on key order.
    return min(v for v, c in counts.items() if c == top)


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


# --------------------------------------------------------------------------------------
# diffusers


def read_diffusers_lora(
    path: Path,
    tensors_of_base: Mapping[str, TensorInfo] | None,
    *,
    component: str | None = None,
) -> LoraAdapter:
    """Read a diffusers LoRA file (``pytorch_lora_weights.safetensors``) for one component.

    The component is ``component`` if given, else the only one in the file, else the one
    whose modules best match ``tensors_of_base`` (others are skipped with a warning), else
    (no base, several components) all of them with their prefixes kept in module names.
    The config comes from the ``lora_adapter_metadata`` header when present; otherwise
    ``r`` is inferred from the tensors and alpha from ``.alpha`` keys, or equals ``r``.

    Raises:
        InvalidAdapter: unreadable file, unknown keys, no component matches the base.

    Example:
        >>> path = Path("pytorch_lora_weights.safetensors")
        >>> adapter = read_diffusers_lora(path, unet.tensors)  # doctest: +SKIP
    """
    tensors, metadata = _load(path)
    groups: dict[str | None, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        first, _, rest = key.partition(".")
        if first in DIFFUSERS_COMPONENTS and rest:
            groups.setdefault(first, {})[rest] = t
        else:
            groups.setdefault(None, {})[key] = t
    chosen = _choose_component(path, groups, tensors_of_base, component)
    selected = dict(tensors) if chosen == "*" else groups[chosen]
    config = _diffusers_config(metadata, chosen)
    state: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for key, t in selected.items():
        hit = _diffusers_part(key)
        if hit is None:
            if key.endswith((".weight", ".bias")):
                state[key] = t  # a whole saved module (modules_to_save)
                continue
            raise InvalidAdapter(f"{path}: unexpected tensor {key!r}: not a LoRA key")
        module, part = hit
        if part == ".alpha":
            alphas[module] = _scalar(path, module, t)
        else:
            state[module + part] = t
    ranks = {
        k[: -len(".lora_A.weight")]: int(t.shape[0])
        for k, t in state.items()
        if k.endswith(".lora_A.weight")
    }
    ranks.update(
        {
            k[: -len(".lora_embedding_A")]: int(t.shape[0])
            for k, t in state.items()
            if k.endswith(".lora_embedding_A")
        }
    )
    if not ranks:
        raise InvalidAdapter(f"{path}: no LoRA tensors (lora_A/lora_B) in component {chosen!r}")
    if config is None:
        config = _inferred_config(ranks, alphas)
    elif alphas:
        log.warning("%s: has both lora_adapter_metadata and .alpha keys; using the metadata", path)
    kept = {k: v for k, v in metadata.items() if k.startswith(KEEP_METADATA)}
    try:
        return LoraAdapter.from_state_dict(config, state, kept)
    except InvalidAdapter as e:
        raise InvalidAdapter(f"{path}: {e}") from e


def _diffusers_part(key: str) -> tuple[str, str] | None:
    for suffix, part in _DIFFUSERS_PARTS:
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def _choose_component(
    path: Path,
    groups: Mapping[str | None, Mapping[str, Any]],
    tensors_of_base: Mapping[str, Any] | None,
    component: str | None,
) -> str | None:
    """The component to import; ``"*"`` means all, with prefixes kept."""
    named = [g for g in groups if g is not None]
    if component is not None:
        if component not in groups:
            raise InvalidAdapter(
                f"{path} has no {component!r} LoRA; it holds: {', '.join(map(str, groups))}"
            )
        return component
    if len(groups) == 1:
        return next(iter(groups))
    if tensors_of_base is None:
        return "*"
    scores = {g: _matches(groups[g], tensors_of_base) for g in groups}
    best = max(scores, key=lambda g: (scores[g], g is not None))
    if scores[best] == 0:
        raise InvalidAdapter(
            f"{path}: none of its components ({', '.join(map(str, named))}) matches this base "
            "model; pass the component's own base (e.g. the unet folder)"
        )
    skipped = [str(g) for g in groups if g != best]
    log.warning("%s: importing the %s LoRA only; skipping %s", path, best, ", ".join(skipped))
    return best


def _matches(group: Mapping[str, Any], tensors_of_base: Mapping[str, Any]) -> int:
    modules = {hit[0] for k in group if (hit := _diffusers_part(k)) is not None}
    return sum(f"{m}.weight" in tensors_of_base for m in modules)


def _diffusers_config(metadata: Mapping[str, str], chosen: str | None) -> dict[str, Any] | None:
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise InvalidAdapter(f"{DIFFUSERS_METADATA_KEY} in the header is not JSON: {e}") from e
    if not isinstance(data, dict):
        raise InvalidAdapter(f"{DIFFUSERS_METADATA_KEY} in the header is not a JSON object")
    if chosen and chosen != "*":
        scoped = {k[len(chosen) + 1 :]: v for k, v in data.items() if k.startswith(f"{chosen}.")}
        if scoped:
            data = scoped
    elif any("." in k and k.split(".", 1)[0] in DIFFUSERS_COMPONENTS for k in data):
        return None  # several components' configs in one blob: infer instead
    data = dict(data)
    data.setdefault("peft_type", "LORA")
    return data


def _inferred_config(ranks: Mapping[str, int], alphas: Mapping[str, float]) -> dict[str, Any]:
    r = _most_common(ranks.values())
    per_alpha = {m: (alphas.get(m) or float(k)) for m, k in ranks.items()}
    lora_alpha = _most_common(per_alpha.values())
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": _num(lora_alpha),
        "rank_pattern": {m: k for m, k in sorted(ranks.items()) if k != r},
        "alpha_pattern": {m: _num(a) for m, a in sorted(per_alpha.items()) if a != lora_alpha},
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
    }


# --------------------------------------------------------------------------------------
# reading


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the header metadata; any safetensors failure becomes InvalidAdapter."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except FileNotFoundError as e:
        raise InvalidAdapter(f"{path} does not exist") from e
    except Exception as e:  # SafetensorError, OSError: truncated file, header lies, not safetensors
        raise InvalidAdapter(
            f"{path} is not a readable safetensors file ({e}); it is corrupt or truncated, "
            "download it again"
        ) from e
    for key, t in tensors.items():
        if not t.is_floating_point() and not key.endswith(".alpha"):  # alphas may be ints
            raise InvalidAdapter(f"{path}: tensor {key!r} has dtype {t.dtype}; expected a float")
    return tensors, metadata
