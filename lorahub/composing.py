"""Composing stored adapters into a new one and storing it with its provenance.

The arithmetic is :mod:`lorahub.compose`'s; this module picks the parents from the store,
settles which base the result is recorded for, and records how it was made, so composing
the same inputs again gives the same digest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import manifest as mf
from .aliases import Progress
from .errors import ComposeError
from .info import AdapterInfo, ComposeResult
from .lazy import lazy_module
from .manifest import BaseRef

if TYPE_CHECKING:
    from .catalog import bases as bases_q
    from .catalog import db
    from .compat import CompatReport
    from .compose import ParentBase
    from .storing import Importer
else:
    bases_q = lazy_module("lorahub.catalog.bases")
    db = lazy_module("lorahub.catalog.db")


@dataclass(frozen=True)
class ComposeOptions:
    """How to compose; see ``Hub.compose`` for each option."""

    method: str = "cat"
    rank: int | None = None
    density: float | None = None
    majority_sign: str = "total"
    seed: int | None = None
    device: str = "cpu"
    allow_mixed_bases: bool = False


def compose_and_store(
    importer: Importer,
    refs: Sequence[str],
    weights: Sequence[float] | None,
    options: ComposeOptions,
    name: str | None = None,
    progress: Progress | None = None,
) -> ComposeResult:
    """Compose the adapters ``refs`` name (a path is added first) and store the result
    under ``name``; see ``Hub.compose``. ``progress(modules_done, modules_in_all)`` is
    called after each module is composed.

    The parents must be made for one base: recorded for one architecture, naming one base
    model where they were not checked against one (and then fitting the recorded base of
    those that were), and agreeing on ``fan_in_fan_out``. The result is recorded for the
    base they agree on, and under ``name`` takes that base's place like an add.
    ``allow_mixed_bases`` lifts the check; the result then keeps only what they agree on.

    ``cat`` and ``linear`` are exact; ``svd`` truncates the exact blend to ``rank``;
    ``ties``, ``dare_linear``, ``dare_ties`` and ``magnitude_prune`` prune the deltas
    (``density``) and then refactor; the report gives each module's relative error.

    Raises:
        IncompatibleParents: parents for different bases, each named with its base.
        InvalidComposeArgument: a bad method, weights, rank, density, seed or device.
        ComposeError: those two; also parents that cannot be combined.
    """
    from .compose import compose

    store = importer.store
    infos = [store.find_info(importer.resolver.stored_ref(r, None)) for r in refs]
    base = _result_base(importer, refs, infos, options.allow_mixed_bases)
    o = options
    adapter, report = compose(
        [store.load_adapter(i) for i in infos],
        weights,
        method=o.method,
        rank=o.rank,
        density=o.density,
        majority_sign=o.majority_sign,
        seed=o.seed,
        device=o.device,
        progress=progress,
    )
    provenance: dict[str, Any] = {
        "kind": "compose",
        "parents": [i.digest for i in infos],
        "weights": list(report.weights),
        "method": o.method,
        "rank": o.rank,
        "density": o.density,
        "majority_sign": o.majority_sign if o.method in ("ties", "dare_ties") else None,
        "seed": o.seed,
    }
    info, added = importer.store_adapter(
        adapter,
        name=name,
        origin_kind="compose",
        origin={
            "method": o.method,
            "parents": [i.refs[0] if i.refs else i.digest for i in infos],
            # How far the stored deltas are from their target: beside the identity, not
            # in it (the figures depend on the device and library that computed them).
            "error": {
                "exact": report.exact,
                "max": report.max_error,
                "mean": report.mean_error,
            },
        },
        provenance=provenance,
        base=base,
    )
    return ComposeResult(info, report, added)


def _result_base(
    importer: Importer, refs: Sequence[str], infos: list[AdapterInfo], allow_mixed: bool
) -> BaseRef:
    """The base the parents agree on, after checking that the ones never checked against
    a base fit the base the others were recorded for."""
    from .compose import ParentBase, parents_base

    parents = []
    for r, i in zip(refs, infos, strict=True):
        claimed = i.config.get("base_model_name_or_path")
        claimed = claimed if isinstance(claimed, str) else None
        parents.append(ParentBase(r, i.base, claimed, i.config.get("fan_in_fan_out") is True))
    base = parents_base(parents, allow_mixed=allow_mixed)
    loose = [(p, i) for p, i in zip(parents, infos, strict=True) if not i.base.verified]
    if base.verified and loose:
        misfits = _misfits(importer, base, loose)
        if misfits and not allow_mixed:
            p, fit = misfits[0]
            raise ComposeError(
                f"{p.label} was not recorded for a base and does not fit "
                f"{base.name or base.variant}, the base the other parents were recorded "
                f"for: {fit.summary}\nPass --allow-mixed-bases to compose them anyway"
            )
        if misfits:  # the result cannot claim a base some of it does not fit
            base = BaseRef(base.name)
    return base


def _misfits(
    importer: Importer, base: BaseRef, loose: list[tuple[ParentBase, AdapterInfo]]
) -> list[tuple[ParentBase, CompatReport]]:
    """The unverified parents that do not fit ``base``'s tensor table (any base row of its
    signature will do: one signature, one table); none when no row has it."""
    from . import compat

    with db.read_session(importer.store.engine) as s:
        rows = [r for r in bases_q.find(s, str(base.signature)) if r.signature == base.signature]
        table = bases_q.tensor_table(rows[0]) if rows else {}
    return [
        (p, fit)
        for p, i in loose
        if table and not (fit := compat.check(mf.skeleton(i.manifest), table)).ok
    ]
