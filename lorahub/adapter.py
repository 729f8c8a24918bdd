"""The in-memory LoRA adapter: per-module factors, scales and the extras PEFT saves.

A ``LoraAdapter`` is what every format reader produces and every consumer (store, compat,
merge, compose, export) works on. Its tensor keys on disk are always PEFT's, so the store's
canonical blob is a file ``PeftModel.from_pretrained`` can load as it is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import peft_config
from .errors import InvalidAdapter

if TYPE_CHECKING:
    import torch

PREFIX = "base_model.model."

# Suffixes of PEFT's saved keys, longest first so ".lora_B.bias" wins over a bare module key.
_PARTS: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_B.bias", "bias"),
    (".lora_embedding_A", "embA"),
    (".lora_embedding_B", "embB"),
    (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector", "magnitude"),
)

LINEAR = "linear"
EMBEDDING = "embedding"
CONV2D = "conv2d"


def pattern_value(patterns: Mapping[str, Any], module: str) -> Any | None:
    """The value of the first pattern key (dict order) that matches a dot-aligned suffix.

    This is PEFT's rule for ``rank_pattern`` and ``alpha_pattern``, matched in bounded time.

    Raises:
        InvalidAdapter: a key that is no valid pattern, or too slow to match.
    """
    return peft_config.Matcher().pattern_value(patterns, module, "pattern")


@dataclass
class LoraModule:
    """One adapted module of the base model.

    ``name`` is the module's path in the base model's state dict, without PEFT's
    ``base_model.model.`` prefix and without ``.weight``. Shapes follow PEFT:
    ``A`` is ``[r, in]`` (``[r, in, kh, kw]`` for conv2d, ``[r, num_embeddings]`` for
    embeddings) and ``B`` is ``[out, r]`` (``[out, r, 1, 1]`` for conv2d).
    """

    name: str
    kind: str
    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    def scaling(self, use_rslora: bool = False) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if use_rslora else self.rank)

    def base_shape(self, fan_in_fan_out: bool = False) -> tuple[int, ...]:
        """The shape the base weight must have for this module to apply."""
        if self.kind == EMBEDDING:
            return (self.in_features, self.out_features)
        if self.kind == CONV2D:
            return (self.out_features, self.in_features, *self.A.shape[2:])
        if fan_in_fan_out:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)

    def delta(
        self,
        *,
        use_rslora: bool = False,
        fan_in_fan_out: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """``scaling * B @ A`` laid out like the base weight, computed in ``dtype``
        (float32 by default)."""
        import torch

        dtype = dtype or torch.float32
        a = self.A.to(device=device, dtype=dtype)
        b = self.B.to(device=device, dtype=dtype)
        s = self.scaling(use_rslora)
        if self.kind == CONV2D:
            if a.shape[2:] == (1, 1):
                d = (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], a.shape[1], 1, 1)
            else:
                # B is a 1x1 conv applied after A: compose the kernels per output channel.
                d = torch.nn.functional.conv2d(a.permute(1, 0, 2, 3), b).permute(1, 0, 2, 3)
            return d * s
        d = b @ a
        if self.kind == EMBEDDING or fan_in_fan_out:
            d = d.T
        return d * s


@dataclass
class LoraAdapter:
    """A LoRA adapter: the PEFT config (every key kept) plus its tensors, by module.

    ``full`` holds whole tensors that replace base tensors (``modules_to_save`` and
    saved embedding layers), keyed by the base tensor name (``lm_head.weight``).
    ``metadata`` holds format metadata worth keeping (kohya ``ss_*`` keys).
    """

    config: dict[str, Any]
    modules: dict[str, LoraModule]
    full: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.config.get("r", 8))

    @property
    def alpha(self) -> float:
        return float(self.config.get("lora_alpha", self.rank))

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora", False))

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    @property
    def base_model_name(self) -> str | None:
        return self.config.get("base_model_name_or_path") or None

    @property
    def targets(self) -> list[str]:
        """Sorted leaf names of the adapted modules (``q_proj``, ``v_proj``, ...)."""
        return sorted({name.rsplit(".", 1)[-1] for name in self.modules})

    def delta(self, name: str, **kwargs: Any) -> torch.Tensor:
        """The delta of one module with this adapter's rsLoRA and fan-in-fan-out settings."""
        return self.modules[name].delta(
            use_rslora=self.use_rslora, fan_in_fan_out=self.fan_in_fan_out, **kwargs
        )

    def base_shape(self, name: str) -> tuple[int, ...]:
        return self.modules[name].base_shape(self.fan_in_fan_out)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under PEFT's on-disk keys, contiguous, ready for safetensors."""
        out: dict[str, torch.Tensor] = {}
        for name, m in self.modules.items():
            p = PREFIX + name
            if m.kind == EMBEDDING:
                out[p + ".lora_embedding_A"] = m.A
                out[p + ".lora_embedding_B"] = m.B
            else:
                out[p + ".lora_A.weight"] = m.A
                out[p + ".lora_B.weight"] = m.B
            if m.bias is not None:
                out[p + ".lora_B.bias"] = m.bias
            if m.magnitude is not None:
                out[p + ".lora_magnitude_vector"] = m.magnitude
        for key, t in self.full.items():
            out[PREFIX + _full_saved_key(key, self.modules)] = t
        return {k: v.contiguous() for k, v in out.items()}

    @classmethod
    def from_state_dict(
        cls,
        config: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str] | None = None,
    ) -> LoraAdapter:
        """Build and validate an adapter from PEFT-style keys.

        The config must be one PEFT loads as this same adapter (see :mod:`lorahub.peft_config`).

        Raises:
            InvalidAdapter: unknown or incomplete keys, non-float tensors, factor shapes
                that disagree with each other or with ``r`` / ``rank_pattern``, a config PEFT
                would refuse or read differently, patterns too slow to match.
        """
        import torch

        config = dict(config)
        peft_config.check(config)
        # What PEFT assumes when a key is missing, recorded: PEFT cannot load a config without
        # peft_type, and an exported config must scale each module as the merge here does.
        for key, default in (("peft_type", "LORA"), ("r", 8), ("lora_alpha", 8)):
            config.setdefault(key, default)
        parts: dict[str, dict[str, torch.Tensor]] = {}
        full: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            if not peft_config.is_text(key):
                raise InvalidAdapter(f"tensor name {key!r} is not valid Unicode text")
            if not tensor.is_floating_point():
                raise InvalidAdapter(f"tensor {key!r} has dtype {tensor.dtype}; expected a float")
            # isfinite has no float8 kernel on the CPU: check those one byte types widened.
            probe = tensor if tensor.element_size() > 1 else tensor.float()
            if tensor.device.type != "meta" and not bool(torch.isfinite(probe).all()):
                raise InvalidAdapter(
                    f"tensor {key!r} holds NaN or infinite values: the training diverged or the "
                    "file is damaged; merging it would give a broken model"
                )
            bare = key[len(PREFIX) :] if key.startswith(PREFIX) else key
            for suffix, part in _PARTS:
                if bare.endswith(suffix):
                    parts.setdefault(bare[: -len(suffix)], {})[part] = tensor
                    break
            else:
                if not bare.endswith((".weight", ".bias")):
                    raise InvalidAdapter(
                        f"unexpected tensor {key!r}: not a LoRA or saved module key"
                    )
                full[bare.replace(".base_layer.", ".")] = tensor
        if not parts:
            raise InvalidAdapter("no LoRA tensors found (no lora_A/lora_B keys)")
        matcher = peft_config.Matcher()
        modules = {name: _module(name, p, config, matcher) for name, p in sorted(parts.items())}
        for m in modules.values():
            if not math.isfinite(m.alpha):
                raise InvalidAdapter(f"module {m.name!r}: its alpha ({m.alpha}) is not finite")
        peft_config.check_targets(config, {n: m.kind for n, m in modules.items()}, matcher)
        return cls(config=config, modules=modules, full=full, metadata=dict(metadata or {}))


def _full_saved_key(base_key: str, modules: Mapping[str, LoraModule]) -> str:
    """Saved key of a whole tensor: PEFT writes an adapted module's own weight as base_layer."""
    module, _, leaf = base_key.rpartition(".")
    return f"{module}.base_layer.{leaf}" if module in modules else base_key


def _module(
    name: str,
    p: dict[str, torch.Tensor],
    config: Mapping[str, Any],
    matcher: peft_config.Matcher,
) -> LoraModule:
    if "embA" in p or "embB" in p:
        kind, a, b = EMBEDDING, p.get("embA"), p.get("embB")
    else:
        kind, a, b = LINEAR, p.get("A"), p.get("B")
    if a is None or b is None:
        missing = "lora_A" if a is None else "lora_B"
        raise InvalidAdapter(f"module {name!r} has no {missing} tensor")
    if a.dim() == 4:
        kind = CONV2D
    if kind == CONV2D:
        if b.dim() != 4 or tuple(b.shape[2:]) != (1, 1):
            raise InvalidAdapter(
                f"module {name!r}: conv lora_B must be [out, r, 1, 1], got {list(b.shape)}"
            )
    elif a.dim() != 2 or b.dim() != 2:
        raise InvalidAdapter(
            f"module {name!r}: factors must be 2-D, got A {list(a.shape)} and B {list(b.shape)}"
        )
    if a.shape[0] != b.shape[1]:
        raise InvalidAdapter(
            f"module {name!r}: lora_A has rank {a.shape[0]} but lora_B has rank {b.shape[1]}"
        )
    rank = int(a.shape[0])
    if rank < 1:
        raise InvalidAdapter(f"module {name!r}: lora_A has rank 0; a LoRA needs rank 1 or more")
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    expected_r = matcher.pattern_value(ranks, name, "rank_pattern") or config["r"]
    if int(expected_r) != rank:
        raise InvalidAdapter(
            f"module {name!r}: the config says r={expected_r} but the tensors have rank {rank}; "
            "the adapter is corrupt or its adapter_config.json belongs to another adapter"
        )
    alpha = matcher.pattern_value(alphas, name, "alpha_pattern")
    if alpha is None:
        alpha = config["lora_alpha"]
    out = int(b.shape[0])
    bias, magnitude = p.get("bias"), p.get("magnitude")
    if bias is not None and tuple(bias.shape) != (out,):
        raise InvalidAdapter(
            f"module {name!r}: lora_B.bias has shape {list(bias.shape)}, expected [{out}]"
        )
    # One norm per output feature: [out] for Linear and embeddings, [1, out, 1, 1] for conv.
    if magnitude is not None and (
        magnitude.numel() != out or sum(d != 1 for d in magnitude.shape) > 1
    ):
        raise InvalidAdapter(
            f"module {name!r}: DoRA magnitude has shape {list(magnitude.shape)}; expected "
            f"{out} values, one per output feature"
        )
    return LoraModule(name, kind, a, b, float(alpha), bias, magnitude)
