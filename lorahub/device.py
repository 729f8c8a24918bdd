"""The torch device arithmetic runs on: one rule for merge and compose alike.

``"auto"`` means CUDA when torch sees a GPU, else the CPU; ``"cuda"`` means the current CUDA
device, pinned to its index so later allocations and streams agree on it. Only cpu and cuda
are accepted: the merge kernels use pinned memory and CUDA streams, nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import DeviceUnavailable, InvalidArgument

if TYPE_CHECKING:
    import torch


def resolve_device(device: str) -> torch.device:
    """The torch device to compute on: ``"auto"`` is CUDA when available, else the CPU.

    Imports torch.

    Raises:
        InvalidArgument: an unknown device (merge and compose raise it as their own
            ``InvalidMergeArgument``, ``InvalidComposeArgument``).
        DeviceUnavailable: CUDA asked for where torch has none, or a CUDA index past the
            last device (raised as ``MergeDeviceUnavailable``, ``ComposeDeviceUnavailable``).

    Example::

        resolve_device("auto")  # device(type='cuda', index=0) on a GPU machine
    """
    import torch

    text = (device or "auto").strip()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise InvalidArgument(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"device {device!r} asked for, but torch sees no CUDA GPU; use cpu"
            )
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise DeviceUnavailable(
                f"device {device!r}: there are only {torch.cuda.device_count()} CUDA device(s)"
            )
        dev = torch.device("cuda", index)
    elif dev.type != "cpu":
        raise InvalidArgument(f"device must be cpu, cuda, cuda:N or auto, not {device!r}")
    return dev
