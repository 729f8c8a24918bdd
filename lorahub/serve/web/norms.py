"""How large each module's weight change is: the Frobenius norm of ``scale · B · A``, for the
per-module chart of the adapter page.

The full delta of a module is ``out × in`` (hundreds of megabytes for an embedding), so it is
never formed: with the ``r × r`` Gram matrices of the factors,
``‖s·B·A‖_F = |s|·sqrt(trace((BᵀB)(AAᵀ)))``, in float64 on the CPU. The factors are read
one tensor at a time from the weights blob (``safe_open``: an adapter can be gigabytes), and
only once the blob hashes to its name, so a damaged blob never leaves wrong numbers behind.

What the norm covers: the low-rank part only. For DoRA it leaves out the magnitude
rescaling; ``fan_in_fan_out`` and embeddings store the delta transposed, which does not
change its norm; a conv2d's factors are flattened to matrices (its kernel is ``B·A``
reshaped). A module with neither a ``lora_A``/``lora_B`` nor a
``lora_embedding_A``/``lora_embedding_B`` pair is left out.

A blob never changes, so the norms of its factors (``‖B·A‖``, before any scale: adapters
sharing a blob may differ in alpha) are kept by weights digest in
``<home>/serve/norms/<2 hex>/<30 hex>.json``, written atomically, and in memory; each
adapter's scales multiply them when asked. Two ``--workers`` processes asked at once may both
compute them; the result is the same file either way.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError

from ...adapter import PREFIX
from ...digest import Digest
from ...errors import LorahubError
from ...fsutil import write_atomic

log = logging.getLogger(__name__)

#: Where the norms are kept, under the store's home.
NORMS_FOLDER = ("serve", "norms")
_KEPT = 256  # adapters whose norms stay in memory
_RETRY_S = 60.0  # a blob that could not be read is tried again after this long
_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))


@dataclass(frozen=True)
class ModuleNorm:
    """One module's ``‖scale · B · A‖_F``."""

    name: str
    norm: float


def scaled(raw: Mapping[str, float], scales: Mapping[str, float]) -> list[ModuleNorm]:
    """The modules of ``scales`` found in ``raw`` (``‖B·A‖`` by module), scaled."""
    return [ModuleNorm(n, abs(s) * raw[n]) for n, s in scales.items() if n in raw]


def factor_norms(path: Path) -> dict[str, float]:
    """``‖B·A‖_F`` of every factor pair in the safetensors file ``path``, by module name
    (PEFT's ``base_model.model.`` prefix taken off), computed from the ``r × r`` Gram
    matrices, one factor in memory at a time.

    Raises:
        SafetensorError, OSError: the file cannot be read. ValueError: factors whose
            ranks disagree.
    """
    import torch
    from safetensors import safe_open

    out: dict[str, float] = {}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for key in sorted(keys):
            for a_suffix, b_suffix in _PAIRS:
                if not key.endswith(a_suffix) or key[: -len(a_suffix)] + b_suffix not in keys:
                    continue
                stem = key[: -len(a_suffix)]
                name = stem.removeprefix(PREFIX)
                # Widened to float64; conv factors flattened to matrices.
                a = f.get_tensor(key).to(torch.float64).flatten(1)
                gram_a = a @ a.T
                del a
                b = f.get_tensor(stem + b_suffix).to(torch.float64).flatten(1)
                gram_b = b.T @ b
                del b
                if gram_a.shape != gram_b.shape:
                    raise ValueError(
                        f"module {name!r}: lora_A has rank {gram_a.shape[0]} but lora_B has "
                        f"rank {gram_b.shape[0]}"
                    )
                # trace(XY) of two symmetric matrices is the sum of their elementwise
                # product; rounding can make a zero delta's value a tiny negative.
                squared = float((gram_a * gram_b).sum())
                out[name] = math.sqrt(max(squared, 0.0))
    return out


class NormCache:
    """Each blob's factor norms by its weights digest: in memory, then in ``root``, else
    computed and written there. A blob that cannot be read gives None (and a warning in the
    log), never an exception, and is not tried again for a minute."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._known: OrderedDict[str, dict[str, float]] = OrderedDict()
        self._failed: dict[str, float] = {}
        self._lock = threading.Lock()
        self._computing: dict[str, threading.Lock] = {}
        self._queued: set[str] = set()
        self._executor: ThreadPoolExecutor | None = None

    def entry(self, weights: str) -> Path:
        """The file holding the factor norms of the blob ``weights`` (``xxh128:<hex>``)."""
        key = Digest.parse(weights).hex
        return self.root / key[:2] / f"{key[2:]}.json"

    def get(
        self, weights: str, scales: Mapping[str, float], blob: Callable[[], Path]
    ) -> tuple[ModuleNorm, ...] | None:
        """The norms of the modules with ``scales`` of an adapter whose weights are the
        blob ``weights``; ``blob()`` gives its checked file, asked only when its norms are
        not kept yet. None when the blob cannot be read (missing, damaged).

        Only requests for this same blob wait while it is computed (the pages run in a
        thread pool), and each computes it once."""
        raw = self._raw(weights, blob)
        return None if raw is None else tuple(scaled(raw, scales))

    def ready(
        self, weights: str, scales: Mapping[str, float], blob: Callable[[], Path]
    ) -> tuple[ModuleNorm, ...] | bool | None:
        """:meth:`get` without waiting: the norms if kept (memory or file), None if the
        blob could not be read lately, else False, the computation started in the
        background (one thread per server process: a page never waits for a large blob)."""
        with self._lock:
            if self._failed_lately(weights) and weights not in self._known:
                return None
        found = self._cached(weights)
        if found is not None:
            return tuple(scaled(found, scales))
        with self._lock:
            if weights not in self._queued:
                self._queued.add(weights)
                self._background().submit(self._compute_queued, weights, blob)
        return False

    def _compute_queued(self, weights: str, blob: Callable[[], Path]) -> None:
        try:
            self._raw(weights, blob)
        finally:
            with self._lock:
                self._queued.discard(weights)

    def _background(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="lorahub-norms")
        return self._executor

    def _raw(self, weights: str, blob: Callable[[], Path]) -> dict[str, float] | None:
        with self._lock:
            found = self._remember(weights)
            if found is not None or self._failed_lately(weights):
                return found
            lock = self._computing.setdefault(weights, threading.Lock())
        try:
            with lock:  # another request computing it: wait for its result
                found = self._cached(weights)
                if found is not None:
                    return found
                with self._lock:
                    if self._failed_lately(weights):
                        return None
                found = self._compute(weights, blob)
                with self._lock:
                    if found is None:
                        self._failed[weights] = time.monotonic() + _RETRY_S
                    else:
                        self._keep(weights, found)
                return found
        finally:
            with self._lock:
                self._computing.pop(weights, None)

    def _cached(self, weights: str) -> dict[str, float] | None:
        """The norms in memory, else in their entry file (then kept in memory)."""
        with self._lock:
            found = self._remember(weights)
        if found is None:
            found = self._read(weights)
            if found is not None:
                with self._lock:
                    self._keep(weights, found)
        return found

    def _failed_lately(self, weights: str) -> bool:
        """Whether reading the blob failed less than :data:`_RETRY_S` ago (under the lock)."""
        return self._failed.get(weights, 0.0) > time.monotonic()

    def _remember(self, weights: str) -> dict[str, float] | None:
        found = self._known.get(weights)
        if found is not None:
            self._known.move_to_end(weights)
        return found

    def _keep(self, weights: str, norms: dict[str, float]) -> None:
        self._failed.pop(weights, None)
        self._known[weights] = norms
        while len(self._known) > _KEPT:
            self._known.popitem(last=False)

    def _read(self, weights: str) -> dict[str, float] | None:
        entry = self.entry(weights)
        try:
            data = json.loads(entry.read_bytes())
            norms = {str(name): float(norm) for name, norm in data["modules"].items()}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring a damaged norms entry %s (%s); computing it again", entry, exc)
            return None
        if not all(0 <= n < math.inf for n in norms.values()):
            log.warning("ignoring a damaged norms entry %s; computing it again", entry)
            return None
        return norms

    def _compute(self, weights: str, blob: Callable[[], Path]) -> dict[str, float] | None:
        try:
            norms = factor_norms(blob())
        except (LorahubError, OSError, SafetensorError, ValueError, RuntimeError) as exc:
            log.warning("no module norms for the blob %s: %s", weights, exc)
            return None
        entry = self.entry(weights)
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(entry, json.dumps({"modules": norms}).encode(), sync=False)
        except OSError as exc:  # a read-only store: kept in memory only
            log.warning("cannot keep the module norms of %s in %s: %s", weights, entry, exc)
        return norms
