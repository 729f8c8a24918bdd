"""The arithmetic of a merge, one row block of one tensor at a time, on any torch device.

Per base weight ``W`` and adapter ``i`` with user weight ``w_i`` (PEFT's ``merge``)::

    W <- adapter.full[W]                       if an adapter replaces the tensor
    W <- W + w_i * s_i * delta_i               plain LoRA, one adapter after another
    W <- (m_i / ||W0 + w_i s_i delta_i||) * (W + w_i s_i delta_i)     DoRA

``W0`` is the weight before any adapter (after a replacement): PEFT takes the DoRA norm of the
unmerged weight even when earlier adapters are merged already, and so do we. The norm is per
output feature: rows of ``[out, in]`` weights (Linear, conv), columns of weights stored
``[in, out]`` (Conv1D with ``fan_in_fan_out``, embeddings). A LoRA bias adds ``w_i s_i b_i``
to the base bias. ``w_i`` multiplies the scaling, as PEFT's ``set_scale`` does. Updates run in
float32 (float64 where the base or the output is float64) and are cast once to the output dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from ..dtypes import torch_dtype as torch_dtype_or_none
from ..errors import InvalidMergeInput, MergeError

if TYPE_CHECKING:
    import torch

    from ..adapter import LoraAdapter, LoraModule
    from .plan import MergePlan, TensorPlan


@dataclass
class LoraOp:
    """One weight touch, ready on the device: ``W2d += alpha * left @ right``, then the DoRA
    rescale where there is a ``magnitude``."""

    alpha: float
    left: torch.Tensor
    right: torch.Tensor
    magnitude: torch.Tensor | None = None
    columnwise: bool = False


@dataclass
class BiasOp:
    """One bias touch, ready on the device: ``b += alpha * bias``."""

    alpha: float
    bias: torch.Tensor


Op: TypeAlias = LoraOp | BiasOp


def prepare_ops(
    plan: MergePlan, adapters: Sequence[LoraAdapter], dev: torch.device
) -> dict[str, list[Op]]:
    """Adapter factors in float32 on the device, laid out so every update is one ``addmm``."""

    ops: dict[str, list[Op]] = {}
    for tp in plan.tensors:
        for t in tp.touches:
            adapter = adapters[t.adapter]
            m = adapter.modules[t.module]
            alpha = t.weight * m.scaling(adapter.use_rslora)
            ct = compute_dtype(tp)
            if t.part == "bias":
                if m.bias is None:
                    raise MergeError(f"merge plan adds a bias for {t.module!r}, which has none")
                ops.setdefault(tp.name, []).append(BiasOp(alpha, m.bias.to(device=dev, dtype=ct)))
                continue
            a = m.A.to(device=dev, dtype=ct).reshape(m.rank, -1)
            b = m.B.to(device=dev, dtype=ct).reshape(-1, m.rank)
            columnwise = _columnwise(adapter, m)
            # [in, out] storage takes delta.T = A.T @ B.T; [out, ...] storage takes B @ A.
            left, right = (a.T.contiguous(), b.T.contiguous()) if columnwise else (b, a)
            mag = (
                m.magnitude.to(device=dev, dtype=ct).reshape(-1)
                if m.magnitude is not None
                else None
            )
            ops.setdefault(tp.name, []).append(LoraOp(alpha, left, right, mag, columnwise))
    return ops


def _columnwise(adapter: LoraAdapter, module: LoraModule) -> bool:
    """Whether the base stores this module's weight ``[in, out]`` (output features are columns)."""
    from ..adapter import EMBEDDING, LINEAR

    return module.kind == EMBEDDING or (adapter.fan_in_fan_out and module.kind == LINEAR)


def compute_dtype(tp: TensorPlan) -> torch.dtype:
    """float32, or float64 where the base or the output is float64."""
    import torch

    return torch.float64 if "F64" in (tp.source.dtype, tp.dtype) else torch.float32


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype to view a tensor's raw bytes as; InvalidMergeInput where this torch
    has none."""
    dtype = torch_dtype_or_none(code)
    if dtype is None:
        raise InvalidMergeInput(f"dtype {code} is not supported by this version of torch")
    return dtype


class Scratch:
    """A growable float buffer, so the kernel allocates once per merge, not once per tensor."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buf: dict[Any, torch.Tensor] = {}

    def get(self, n: int, dtype: torch.dtype, slot: int = 0) -> torch.Tensor:
        import torch

        t = self.buf.get((slot, dtype))
        if t is None or t.numel() < n:
            t = self.buf[(slot, dtype)] = torch.empty(n, dtype=dtype, device=self.device)
        return t[:n]


def row_blocks(tp: TensorPlan, ops: Sequence[Op], chunk: int) -> list[tuple[int, int]]:
    """Row ranges of about ``chunk`` elements; one range when a DoRA norm runs down columns."""
    rows, cols = matrix_shape(tp)
    whole = any(isinstance(op, LoraOp) and op.magnitude is not None and op.columnwise for op in ops)
    step = rows if whole else max(1, chunk // cols)
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def matrix_shape(tp: TensorPlan) -> tuple[int, int]:
    """The 2-D view every update works on: ``[out, in...]`` weights as they are, vectors as
    one row."""
    rows = tp.shape[0] if len(tp.shape) > 1 else 1
    return rows, max(1, tp.source.numel // max(rows, 1))


def merge_rows(
    tp: TensorPlan,
    first: torch.Tensor,
    out: torch.Tensor,
    ops: Sequence[Op],
    rows: tuple[int, int],
    scratch: Scratch,
) -> None:
    """Rows ``r0:r1`` of the merged tensor: ``first`` (base or replacement, any dtype, 2-D)
    in, ``out`` (output dtype, 2-D) out, computed in a float32 scratch block.

    On the CPU a block is small enough to stay in cache from the widening read through the
    rank-r updates to the narrowing write.
    """

    r0, r1 = rows
    acc = scratch.get((r1 - r0) * first.shape[1], compute_dtype(tp)).view(r1 - r0, -1)
    acc.copy_(first[r0:r1])
    for k, op in enumerate(ops):
        if isinstance(op, BiasOp):
            acc.add_(op.bias.view(1, -1), alpha=op.alpha)
        elif op.magnitude is None:
            acc.addmm_(op.left[r0:r1], op.right, alpha=op.alpha)
        else:
            _dora(op, op.magnitude, acc, first[r0:r1] if k else None, r0, r1, scratch)
    out[r0:r1].copy_(acc)


def _dora(
    op: LoraOp,
    magnitude: torch.Tensor,
    acc: torch.Tensor,
    w0: torch.Tensor | None,
    r0: int,
    r1: int,
    scratch: Scratch,
) -> None:
    """``acc <- m / ||w0 + d|| * (acc + d)``; with ``w0`` None, ``acc`` is still ``w0``."""
    import torch

    if w0 is None:
        acc.addmm_(op.left[r0:r1], op.right, alpha=op.alpha)
        v = acc
    else:
        v = scratch.get(acc.numel(), acc.dtype, slot=1).view_as(acc)
        torch.mm(op.left[r0:r1], op.right, out=v)
        v.mul_(op.alpha)
        acc.add_(v)
        v.add_(w0)
    if op.columnwise:
        acc.mul_((magnitude / torch.linalg.vector_norm(v, dim=0)).view(1, -1))
    else:
        acc.mul_((magnitude[r0:r1] / torch.linalg.vector_norm(v, dim=1)).view(-1, 1))
