"""The merge pipelines: every planned tensor in order, copied as raw bytes or merged, on the
CPU (row blocks on worker threads) or CUDA (read-ahead, upload, merge, download overlapped).
:func:`iter_merged` hands the tensors to a caller; the writer puts them in shards."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .kernels import Op, Scratch, matrix_shape, merge_rows, prepare_ops, row_blocks, torch_dtype
from .plan import plan_merge, resolve_device
from .source import Copy, Sources

if TYPE_CHECKING:
    import torch

    from ..adapter import LoraAdapter
    from ..base import BaseModel
    from .plan import MergePlan, TensorPlan

# Row chunk of the CPU kernel, in float32 elements: small enough to stay in cache between the
# bf16->f32 read, the rank-r update and the f32->bf16 write.
CPU_CHUNK = 1 << 20


def iter_merged(
    base: BaseModel,
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | None = None,
    *,
    device: str = "auto",
    dtype: str | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of the merged model, one at a time.

    Tensors are CPU tensors the caller owns, in the order they lie in the base files; only
    the one being yielded (and the small look-ahead of the device pipeline) is in memory,
    so this suits loaders that take a state dict piece by piece.

    Raises:
        IncompatibleAdapter, MergeError: as :func:`plan_merge`, before the first tensor.
    """
    import torch

    plan = plan_merge(base, adapters, weights, dtype=dtype)
    dev = resolve_device(device)
    fresh: list[torch.Tensor] = []

    def reserve(tp: TensorPlan) -> memoryview:
        fresh[:] = [torch.empty(tp.nbytes, dtype=torch.uint8)]
        return _bytes_of(fresh[0])

    with Sources(base, plan) as sources:
        stream = stream_merged(plan, adapters, sources, dev, reserve)
        with contextlib.closing(stream) as items:
            for tp, item in zip(plan.tensors, items, strict=True):
                if item is None:
                    raw = fresh.pop()
                else:
                    raw = torch.empty(tp.nbytes, dtype=torch.uint8)
                    if isinstance(item, Copy):
                        sources.read_into(item.file, item.offset, _bytes_of(raw))
                    else:
                        raw.numpy()[:] = item
                yield tp.name, raw.view(torch_dtype(tp.dtype)).reshape(tp.shape)


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A CPU uint8 tensor's bytes as a writable memoryview, without a copy."""
    # numpy declares ndarray's buffer protocol (``__buffer__``) only for Python >= 3.12.
    return memoryview(t.numpy())  # type: ignore[arg-type]


def stream_merged(
    plan: MergePlan,
    adapters: Sequence[LoraAdapter],
    sources: Sources,
    dev: torch.device,
    reserve: Callable[[TensorPlan], memoryview],
) -> Generator[Copy | memoryview | None, None, None]:
    """For each planned tensor in order: a :class:`Copy` (untouched), its merged bytes (a
    memoryview, valid until the next item is asked for), or None when the bytes were merged
    straight into ``reserve(tp)``, the place the consumer wants them.
    """
    ops = prepare_ops(plan, adapters, dev)
    work = [tp for tp in plan.tensors if not tp.copied]
    if dev.type == "cuda":
        return _stream_cuda(plan, work, adapters, sources, ops, dev)
    return _stream_cpu(plan, adapters, sources, ops, reserve)


def _replacement(
    tp: TensorPlan, adapters: Sequence[LoraAdapter], dev: torch.device
) -> torch.Tensor | None:
    if tp.replaced_by is None:
        return None
    i, key = tp.replaced_by
    return adapters[i].full[key].to(dev)


def _stream_cpu(
    plan: MergePlan,
    adapters: Sequence[LoraAdapter],
    sources: Sources,
    ops: Mapping[str, list[Op]],
    reserve: Callable[[TensorPlan], memoryview],
) -> Generator[Copy | None, None, None]:
    """The CPU loop: worker threads take row blocks of each merged tensor in turn, reading the
    base through the page cache map and writing the result where the consumer wants it.

    torch's own intra-op threads are set to 1 meanwhile: with many short ops, a parallel
    region waits for its slowest thread, and on a busy machine that one is often descheduled.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import torch

    cpu = torch.device("cpu")
    local = threading.local()
    threads = torch.get_num_threads()

    def block(
        tp: TensorPlan, first: torch.Tensor, out: torch.Tensor, rows: tuple[int, int]
    ) -> None:
        if not hasattr(local, "scratch"):
            local.scratch = Scratch(cpu)
        merge_rows(tp, first, out, ops.get(tp.name, ()), rows, local.scratch)

    with ThreadPoolExecutor(threads, thread_name_prefix="lorahub-merge") as pool:
        for tp in plan.tensors:
            if tp.copied:
                yield sources.copy_of(tp)
                continue
            shape = matrix_shape(tp)
            src = sources.mapped(tp).view(torch_dtype(tp.source.dtype)).view(shape)
            rep = _replacement(tp, adapters, cpu)
            first = src if rep is None else rep.reshape(shape)
            target = torch.frombuffer(reserve(tp), dtype=torch.uint8)
            out = target.view(torch_dtype(tp.dtype)).view(shape)
            blocks = row_blocks(tp, ops.get(tp.name, ()), CPU_CHUNK)
            # Only while this tensor's blocks run: the caller's setting (read afresh, it may
            # change between items) is back by the yield.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for f in [pool.submit(block, tp, first, out, rows) for rows in blocks]:
                    f.result()
            finally:
                torch.set_num_threads(threads)
            del src, first, target, out
            sources.unmap_tensor(tp)
            yield None


def _stream_cuda(
    plan: MergePlan,
    work: Sequence[TensorPlan],
    adapters: Sequence[LoraAdapter],
    sources: Sources,
    ops: Mapping[str, list[Op]],
    dev: torch.device,
) -> Generator[Copy | memoryview, None, None]:
    """The CUDA pipeline: read ahead into pinned buffers on a thread, copy up on one stream,
    merge on the compute stream, copy down on another, and write the previous tensor's bytes
    meanwhile. Slot ``j % SLOTS`` holds tensor ``j``; events order the reuse of each slot.
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch

    if not work:
        yield from (sources.copy_of(tp) for tp in plan.tensors)
        return
    depth, slots = 2, 3
    max_in = max(tp.source_nbytes for tp in work)
    max_out = max(tp.nbytes for tp in work)
    with torch.cuda.device(dev):
        pin_in = [torch.empty(max_in, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
        pin_out = [torch.empty(max_out, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
        dev_in = [torch.empty(max_in, dtype=torch.uint8, device=dev) for _ in range(slots)]
        dev_out = [torch.empty(max_out, dtype=torch.uint8, device=dev) for _ in range(slots)]
        up, down = torch.cuda.Stream(dev), torch.cuda.Stream(dev)
        compute = torch.cuda.current_stream(dev)
        uploaded = [torch.cuda.Event() for _ in range(slots)]
        merged = [torch.cuda.Event() for _ in range(slots)]
        downloaded = [torch.cuda.Event() for _ in range(slots)]
    scratch = Scratch(dev)
    reads: dict[int, Any] = {}
    pool = ThreadPoolExecutor(1, thread_name_prefix="lorahub-read")

    def read(j: int) -> None:
        s, tp = j % slots, work[j]
        uploaded[s].synchronize()  # the previous tensor in this slot has left the pinned buffer
        view = _bytes_of(pin_in[s][: tp.source_nbytes])
        sources.read_tensor(tp, view)

    def launch(j: int) -> None:
        reads.pop(j).result()
        s, tp = j % slots, work[j]
        with torch.cuda.device(dev):
            with torch.cuda.stream(up):
                up.wait_event(merged[s])  # tensor j - SLOTS is done reading dev_in[s]
                dev_in[s][: tp.source_nbytes].copy_(
                    pin_in[s][: tp.source_nbytes], non_blocking=True
                )
                uploaded[s].record(up)
            # On the compute stream explicitly: an iter_merged consumer may call next() under
            # a stream of its own, and the events below must order this work, not that.
            with torch.cuda.stream(compute):
                compute.wait_event(uploaded[s])
                compute.wait_event(downloaded[s])  # dev_out[s] has been copied down
                shape = matrix_shape(tp)
                src = dev_in[s][: tp.source_nbytes].view(torch_dtype(tp.source.dtype))
                out = dev_out[s][: tp.nbytes].view(torch_dtype(tp.dtype)).view(shape)
                rep = _replacement(tp, adapters, dev)
                first = src.view(shape) if rep is None else rep.reshape(shape)
                merge_rows(tp, first, out, ops.get(tp.name, ()), (0, shape[0]), scratch)
                merged[s].record(compute)
            with torch.cuda.stream(down):
                down.wait_event(merged[s])
                pin_out[s][: tp.nbytes].copy_(dev_out[s][: tp.nbytes], non_blocking=True)
                downloaded[s].record(down)
        if j + slots < len(work):
            reads[j + slots] = pool.submit(read, j + slots)

    try:
        for j in range(min(slots, len(work))):
            reads[j] = pool.submit(read, j)
        for j in range(min(depth, len(work))):
            launch(j)
        j = 0
        for tp in plan.tensors:
            if tp.copied:
                yield sources.copy_of(tp)
                continue
            if j + depth < len(work):
                launch(j + depth)
            s = j % slots
            downloaded[s].synchronize()
            yield _bytes_of(pin_out[s][: tp.nbytes])
            j += 1
    finally:
        for fut in reads.values():
            fut.cancel()
        pool.shutdown(wait=True)
        torch.cuda.synchronize(dev)
