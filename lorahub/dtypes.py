"""Safetensors dtypes: the one table of every code the format defines, its width, its torch name.

Headers are read, checked and sized without torch (``lorahub ls`` must not import it), so the
table holds torch *attribute names* and :func:`torch_dtype` resolves them on call. Codes newer
than the installed torch (float8 before 2.1, unsigned ints before 2.3) resolve to ``None``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    """One safetensors dtype: its header code, bits per element and torch attribute name."""

    code: str
    bits: int
    torch_name: str | None  # None: torch has no per-element match


# Every code safetensors 0.8 reads and writes. F4 has no entry in torch: its float4_e2m1fn_x2
# packs two values per element, so shapes would not match the header's.
_TABLE = (
    DType("BOOL", 8, "bool"),
    DType("U8", 8, "uint8"),
    DType("I8", 8, "int8"),
    DType("F8_E5M2", 8, "float8_e5m2"),
    DType("F8_E4M3", 8, "float8_e4m3fn"),
    DType("F8_E8M0", 8, "float8_e8m0fnu"),
    DType("F8_E4M3FNUZ", 8, "float8_e4m3fnuz"),
    DType("F8_E5M2FNUZ", 8, "float8_e5m2fnuz"),
    DType("F4", 4, None),
    DType("F6_E2M3", 6, None),
    DType("F6_E3M2", 6, None),
    DType("I16", 16, "int16"),
    DType("U16", 16, "uint16"),
    DType("F16", 16, "float16"),
    DType("BF16", 16, "bfloat16"),
    DType("I32", 32, "int32"),
    DType("U32", 32, "uint32"),
    DType("F32", 32, "float32"),
    DType("F64", 64, "float64"),
    DType("I64", 64, "int64"),
    DType("U64", 64, "uint64"),
    DType("C64", 64, "complex64"),
)

# Bits per element of every dtype the safetensors format defines.
DTYPE_BITS: Mapping[str, int] = MappingProxyType({d.code: d.bits for d in _TABLE})
# torch attribute name per code, for codes torch has a per-element match for.
TORCH_NAMES: Mapping[str, str] = MappingProxyType(
    {d.code: d.torch_name for d in _TABLE if d.torch_name}
)
# Dtypes a LoRA delta can be added to without dequantising first.
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})

# People's spellings of the float dtypes (``bf16``, ``half``...), lower-cased, to their codes.
ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "f64": "F64", "fp64": "F64", "float64": "F64", "double": "F64",
        "f32": "F32", "fp32": "F32", "float32": "F32", "float": "F32",
        "f16": "F16", "fp16": "F16", "float16": "F16", "half": "F16",
        "bf16": "BF16", "bfloat16": "BF16",
    }
)  # fmt: skip


def is_known(code: object) -> bool:
    """Whether ``code`` is a dtype code safetensors defines (``"BF16"`` yes, ``"bf16"`` no)."""
    return isinstance(code, str) and code in DTYPE_BITS


def nbytes(code: str, numel: int) -> int | None:
    """Bytes ``numel`` elements of ``code`` take; None when the code is unknown or the elements
    do not fill whole bytes (an odd count of F4 values), which a valid file never holds."""
    bits = DTYPE_BITS.get(code)
    if bits is None or (numel * bits) % 8:
        return None
    return numel * bits // 8


def torch_dtype(code: str) -> torch.dtype | None:
    """The torch dtype of a code, or None where this torch (or any torch) has no match.

    Imports torch, so call it only where tensors are made.
    """
    name = TORCH_NAMES.get(code)
    if name is None:
        return None
    import torch

    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) else None
