"""Composition: a new LoRA adapter made from several, in delta space, with its error measured.

Every parent module contributes the task vector ``w_i * s_i * B_i @ A_i`` (``s_i`` its own
scaling: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA). The methods:

- ``cat``: exact. ``A = [w_i s_i A_i]`` stacked as rows, ``B = [B_i]`` as columns; rank is the
  sum of the parents' ranks.
- ``linear``: the same exact weighted sum; with ``rank`` it is refactored like ``svd``.
- ``svd``: the weighted sum truncated to ``rank`` (optimal in the Frobenius norm), computed
  from a QR of the stacked factors and an SVD of the small ``R x R`` core, never forming the
  ``[out, in]`` delta.
- ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: elementwise methods on the full
  task vectors, formed one module at a time on ``device``, then refactored to ``rank``.

Every module's stored delta is compared with its target (the exact weighted sum for the first
three, the pruned/merged delta for the others) and the relative Frobenius error is reported.
The composed adapter has scaling 1 everywhere (``lora_alpha == r`` per module), no rsLoRA and
no DoRA, so it loads in PEFT as it is.

Pure torch math on in-memory adapters: no disk, no catalog.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import xxhash

from .adapter import CONV2D, EMBEDDING, LoraAdapter, LoraModule
from .aliases import Progress
from .digest import short
from .errors import ComposeError, IncompatibleParents, InvalidComposeArgument
from .manifest import BaseRef

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

METHODS = ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
MAJORITY_SIGNS = ("total", "frequency")
_ELEMENTWISE = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
_SIGN_ELECTION = ("ties", "dare_ties")

# The elementwise methods refactor a dense [out, in] matrix. A full LAPACK SVD of a 4096 x 11008
# matrix takes over a minute on two CPU cores; a seeded randomized SVD (subspace iteration with
# 2x oversampling) takes a few seconds and, on merged LoRA deltas, lands within 1e-5 of the
# optimal error. It is used when the short side is at least this long and the sketch is small.
_RANDOMIZED_MIN_DIM = 1024
_POWER_ITERATIONS = 4


@dataclass(frozen=True)
class ModuleError:
    """How far one module's stored delta is from its target, and the rank it was stored at."""

    module: str
    rel_error: float
    rank: int


@dataclass(frozen=True)
class ComposeReport:
    """What a composition did: method, parameters, per-module errors and notes for the user.

    ``exact`` means the stored deltas are the exact weighted sum of the parents' deltas (up
    to float32 rounding). ``rank`` is the composed config's ``r`` (the most common module
    rank; ``ranks`` differ by module where ``rank_pattern`` says so). ``copied`` lists whole
    tensors (``modules_to_save``) carried over unchanged, not weighted.
    """

    method: str
    exact: bool
    errors: tuple[ModuleError, ...]
    max_error: float
    rank: int
    weights: tuple[float, ...]
    density: float | None = None
    majority_sign: str | None = None
    seed: int | None = None
    notes: tuple[str, ...] = ()
    copied: tuple[str, ...] = ()

    @property
    def mean_error(self) -> float:
        return sum(e.rel_error for e in self.errors) / len(self.errors) if self.errors else 0.0

    @property
    def summary(self) -> str:
        """One line for people: method, rank, and how far from the target."""
        kind = "exact" if self.exact else f"max relative error {self.max_error:.3g}"
        return f"{self.method}: {len(self.errors)} modules, r={self.rank}, {kind}"

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``--json`` output and provenance records."""
        return {
            "method": self.method,
            "exact": self.exact,
            "rank": self.rank,
            "weights": list(self.weights),
            "density": self.density,
            "majority_sign": self.majority_sign,
            "seed": self.seed,
            "max_error": self.max_error,
            "errors": {e.module: {"rel_error": e.rel_error, "rank": e.rank} for e in self.errors},
            "notes": list(self.notes),
            "copied": list(self.copied),
        }


@dataclass(frozen=True)
class _Part:
    """One parent's contribution to a module: ``coef * B @ A`` in the ``[out, in]`` layout
    of the factors (conv kernels flattened), whatever the parent's fan_in_fan_out."""

    index: int
    coef: float
    A: torch.Tensor
    B: torch.Tensor
    bias: torch.Tensor | None


@dataclass(frozen=True)
class _Composed:
    A: torch.Tensor
    B: torch.Tensor
    rel_error: float
    truncated: bool
    randomized: bool = False


def dare_seed(seed: int, module: str, index: int) -> int:
    """The seed of the DARE drop mask of parent ``index`` (its position in the inputs) on
    ``module``: ``xxh64("<seed>:<module>:<index>")``. The mask is
    ``torch.rand(out, in, generator=torch.Generator(device).manual_seed(that)) < density``
    in float32, over the module's ``[out, in]`` factor layout (``B @ A``)."""
    return xxhash.xxh64_intdigest(f"{seed}:{module}:{index}".encode())


def compose(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | None = None,
    *,
    method: str = "cat",
    rank: int | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    seed: int | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
) -> tuple[LoraAdapter, ComposeReport]:
    """Combine adapters into a new adapter, exactly where the method allows, and measure
    the error of each module where it does not.

    Args:
        adapters: the parents, LoRA (not DoRA) adapters for one base model. A module missing
            from a parent counts as a zero delta for it.
        weights: one per parent (default all 1.0); negative weights subtract.
        method: one of ``METHODS``.
        rank: target rank for ``linear`` (optional), ``svd`` and the elementwise methods.
            Without it, ``svd`` keeps every rank (exact) and the elementwise methods use the
            sum of the parents' ranks per module; both are capped at ``min(out, in)``.
        density: fraction of elements kept, in ``(0, 1]``; required by the elementwise methods.
        majority_sign: ``"total"`` (sign of the sum) or ``"frequency"`` (sign of the count),
            for ``ties`` and ``dare_ties``; ties in the vote go to ``+``.
        seed: seeds DARE's drop masks and the randomized SVD; ``None`` means 0, so a
            composition is always reproducible on a given device.
        device: torch device for the arithmetic; the result is on the CPU.
        progress: called as ``progress(modules_done, modules_in_all)`` after each module.

    Returns:
        The composed adapter (float32 factors, scaling 1 per module) and its report.

    Raises:
        InvalidComposeArgument: unknown method, bad weights, rank, density, seed or device.
        ComposeDeviceUnavailable: a CUDA device this machine does not have.
        ComposeError: those; also DoRA parents, parents whose shared modules differ in kind
            or shape, or that disagree on ``modules_to_save``.

    Example:
        >>> blend, report = compose([sql, tone], [1.0, 0.5], method="svd", rank=32)
        >>> report.max_error  # relative Frobenius error of the worst module
    """

    weights = _check_args(adapters, weights, method, rank, density, majority_sign, seed)
    seed = 0 if seed is None else int(seed)
    notes: list[str] = []
    modules = _gather(adapters, weights)
    # Everything that can refuse the inputs does so before the arithmetic starts.
    settings = {
        "modules_to_save": _agreed(adapters, "modules_to_save", _modules_to_save),
        "bias": _agreed(adapters, "bias", lambda c: c.get("bias") or "none"),
    }
    full = _full_tensors(adapters)
    _check_lora_bias(modules)
    dev = _device(device)

    out_modules: dict[str, LoraModule] = {}
    errors: list[ModuleError] = []
    exact = True
    randomized = 0
    for done, (name, (kind, a_shape, parts)) in enumerate(modules.items(), 1):
        total_rank = sum(p.A.shape[0] for p in parts)
        limit = min(parts[0].B.shape[0], parts[0].A.shape[1])
        if method == "cat" or (method == "linear" and rank is None):
            res = _cat(parts, dev)
        elif method in ("linear", "svd"):
            res = _svd(parts, min(rank or total_rank, total_rank, limit), dev)
        else:
            target = _elementwise(
                method, name, parts, float(density or 1), majority_sign, seed, dev
            )
            res = _refactor(target, min(rank or total_rank, limit), _mix(seed, name, "svd"))
            del target
        exact = exact and method in ("cat", "linear", "svd") and not res.truncated
        randomized += res.randomized
        k = int(res.A.shape[0])
        out_modules[name] = LoraModule(
            name=name,
            kind=kind,
            A=res.A.reshape(k, *a_shape).contiguous(),
            B=res.B.reshape(res.B.shape[0], k, *([1, 1] if kind == CONV2D else [])).contiguous(),
            alpha=float(k),
            bias=_bias(parts),
        )
        errors.append(ModuleError(name, res.rel_error, k))
        logger.debug("compose %s: %s rank %d, error %.3g", method, name, k, res.rel_error)
        if progress is not None:
            progress(done, len(modules))

    if rank is None and method in ("svd", *_ELEMENTWISE):
        notes.append(
            f"rank not given: each module kept the sum of its parents' ranks, capped at "
            f"min(out, in){'' if method == 'svd' else '; pass rank to choose the size'}"
        )
    if rank is not None and any(e.rank < rank for e in errors):
        notes.append(
            f"some modules are stored below rank {rank}: capped at min(out, in)"
            + (
                " or at the sum of the parents' ranks (nothing is lost)"
                if method in ("linear", "svd")
                else ""
            )
        )
    if randomized:
        notes.append(
            f"{randomized} module(s) were refactored with a seeded randomized SVD "
            f"({_POWER_ITERATIONS} power iterations, 2x oversampling); their errors are measured"
        )
    notes.extend(_disagreements(adapters))
    if any(m.bias is not None for m in out_modules.values()):
        notes.append("lora_B biases were combined as the plain weighted sum of w * scaling * bias")
        _fill_biases(out_modules)

    config, common_rank = _config(adapters, out_modules, settings)
    if full:
        notes.append(
            "modules_to_save tensors were copied unchanged (they replace base tensors and "
            "cannot be weighted without the base): " + ", ".join(sorted(full))
        )
    adapter = LoraAdapter(config=config, modules=out_modules, full=full)
    max_error = max((e.rel_error for e in errors), default=0.0)
    report = ComposeReport(
        method=method,
        exact=exact,
        errors=tuple(errors),
        max_error=max_error,
        rank=common_rank,
        weights=tuple(weights),
        density=density,
        majority_sign=majority_sign if method in _SIGN_ELECTION else None,
        seed=seed if method in _ELEMENTWISE else None,
        notes=tuple(notes),
        copied=tuple(sorted(full)),
    )
    return adapter, report


# --- the parents' base ---------------------------------------------------------------------


@dataclass(frozen=True)
class ParentBase:
    """What a parent says about the base model it is for, as compose checks it.

    ``base`` is what the store recorded (verified when it has a signature); ``claimed`` is the
    parent's own ``base_model_name_or_path``; ``fan_in_fan_out`` is its weight layout.
    """

    label: str
    base: BaseRef
    claimed: str | None = None
    fan_in_fan_out: bool = False

    @property
    def described(self) -> str:
        b = self.base
        if b.verified:
            what = f"base {b.name or '?'} (signature {short(b.signature or '?')}"
            what += f", content {short(b.content_hash)})" if b.content_hash else ")"
        else:
            what = f"base {self.names[0]!r} (unverified)" if self.names else "base unknown"
        return f"{self.label}: {what}, fan_in_fan_out {str(self.fan_in_fan_out).lower()}"

    @property
    def names(self) -> tuple[str, ...]:
        """The names this parent's base goes by, the one it is known by first."""
        first, second = (
            (self.claimed, self.base.name) if self.base.verified else (self.base.name, self.claimed)
        )
        return tuple(dict.fromkeys(n for n in map(_plain_name, (first, second)) if n))


def parents_base(parents: Sequence[ParentBase], *, allow_mixed: bool = False) -> BaseRef:
    """The base a composition of ``parents`` is recorded for, after checking they share one.

    Parents verified against a base (a signature) must share its architecture; when some
    were not, nothing better than names is known, so each unverified parent's base name must
    be one the others use. All must agree on ``fan_in_fan_out``. The result keeps what the
    parents agree on: the verified ones' base (its content hash only if they share it), else
    the name they give.

    Raises:
        IncompatibleParents: the parents were made for different bases (each parent and its base
            named), unless ``allow_mixed``: then the result keeps a base name only if every
            parent gives it, and no signature unless all were verified for one architecture.
    """
    reasons = _base_conflicts(parents)
    if reasons and not allow_mixed:
        raise IncompatibleParents(
            "cannot compose adapters made for different base models: "
            + "; ".join(reasons)
            + ".\n  "
            + "\n  ".join(p.described for p in parents)
            + "\nCompose adapters made for one base (record each against it with `lorahub add "
            "--base BASE` to prove it fits), or pass --allow-mixed-bases if you know the result "
            "is meant for one model"
        )
    verified = [p.base for p in parents if p.base.verified]
    if reasons and (len(verified) < len(parents) or len({b.signature for b in verified}) > 1):
        # Mixed on purpose: only a name every parent gives is kept, nothing verified.
        names = {p.names[0] if p.names else None for p in parents}
        return BaseRef(names.pop() if len(names) == 1 else None)
    if verified:
        name = _only(b.name for b in verified)
        return BaseRef(
            name,
            _only(b.revision for b in verified) if name else None,
            verified[0].signature,
            _only(b.content_hash for b in verified),
        )
    name = _only(p.names[0] for p in parents if p.names)
    return BaseRef(name, _only(p.base.revision for p in parents) if name else None)


def _base_conflicts(parents: Sequence[ParentBase]) -> list[str]:
    reasons = []
    signatures = {p.base.signature for p in parents if p.base.verified}
    if len(signatures) > 1:
        reasons.append("they were recorded for different base architectures")
    else:
        unverified = [p for p in parents if not p.base.verified and p.names]
        known = {n for p in parents if p.base.verified for n in p.names}
        if known:
            strays = [p for p in unverified if not set(p.names) & known]
        else:
            strays = unverified if len({p.names[0] for p in unverified}) > 1 else []
        if strays:
            reasons.append(
                "they name different base models and "
                + ("not all were" if known else "none was")
                + " checked against one"
            )
    if len({p.fan_in_fan_out for p in parents}) > 1:
        reasons.append("they disagree on fan_in_fan_out (weights laid out for another model)")
    return reasons


def _plain_name(name: str | None) -> str | None:
    return name.strip().rstrip("/") or None if name else None


def _only(values: Iterable[str | None]) -> str | None:
    """The one value given (Nones aside), else None."""
    found = {v for v in values if v}
    return found.pop() if len(found) == 1 else None


# --- validation and gathering -------------------------------------------------------------


def _check_args(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | None,
    method: str,
    rank: int | None,
    density: float | None,
    majority_sign: str,
    seed: int | None,
) -> list[float]:
    if method not in METHODS:
        raise InvalidComposeArgument(
            f"unknown composition method {method!r}; choose one of {', '.join(METHODS)}"
        )
    if not adapters:
        raise InvalidComposeArgument("nothing to compose: give at least one adapter")
    if weights is None:
        weights = [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise InvalidComposeArgument(
            f"{len(weights)} weights for {len(adapters)} adapters; give one weight per adapter"
        )
    ws = []
    for w in weights:
        try:
            f = float(w)
        except (TypeError, ValueError):
            raise InvalidComposeArgument(f"weight {w!r} is not a number") from None
        if not math.isfinite(f):
            raise InvalidComposeArgument(f"weight {w!r} is not finite")
        ws.append(f)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise InvalidComposeArgument(f"rank must be a positive integer, got {rank!r}")
    if method == "cat" and rank is not None:
        raise InvalidComposeArgument(
            "cat keeps every parent's rank (the rank is their sum); "
            "use --method svd or linear with --rank to choose a rank"
        )
    if method in _ELEMENTWISE:
        if density is None:
            raise InvalidComposeArgument(
                f"method {method!r} needs a density in (0, 1], e.g. --density 0.3"
            )
        if (
            isinstance(density, bool)
            or not isinstance(density, (int, float))
            or not (0.0 < float(density) <= 1.0)
        ):
            raise InvalidComposeArgument(
                f"density must be a number in (0, 1] (the fraction of elements kept), "
                f"got {density!r}"
            )
    elif density is not None:
        raise InvalidComposeArgument(
            f"density is used only by {', '.join(_ELEMENTWISE)}; method {method!r} takes none"
        )
    if majority_sign not in MAJORITY_SIGNS:
        raise InvalidComposeArgument(
            f"majority_sign must be one of {', '.join(MAJORITY_SIGNS)}, got {majority_sign!r}"
        )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidComposeArgument(f"seed must be an integer, got {seed!r}")
    for i, a in enumerate(adapters):
        dora = [n for n, m in a.modules.items() if m.magnitude is not None]
        if a.use_dora or dora:
            where = f" (module {dora[0]!r})" if dora else ""
            raise ComposeError(
                f"adapter #{i + 1} is a DoRA adapter{where}: a DoRA layer rescales each row of "
                "W + delta by a learned magnitude over its norm, which depends on the base "
                "weights, so no weighted combination of DoRA adapters is a LoRA or DoRA adapter; "
                "merge it into the base with `lorahub merge` instead"
            )
    return ws


def _gather(
    adapters: Sequence[LoraAdapter], weights: Sequence[float]
) -> dict[str, tuple[str, tuple[int, ...], list[_Part]]]:
    """Each module of the union (sorted), with its kind, A's trailing shape and its parts;
    refuses modules whose kind or shape differs between parents."""
    seen: dict[str, tuple[str, int, tuple[int, ...], int]] = {}
    out: dict[str, tuple[str, tuple[int, ...], list[_Part]]] = {}
    for i, (adapter, w) in enumerate(zip(adapters, weights, strict=True)):
        for name, m in adapter.modules.items():
            key = (m.kind, m.out_features, tuple(m.A.shape[1:]))
            if name in seen and seen[name][:3] != key:
                raise ComposeError(
                    f"module {name!r} differs between adapter #{seen[name][3] + 1} "
                    f"({_describe(*seen[name][:3])}) and adapter #{i + 1} ({_describe(*key)}); "
                    "composed adapters must target the same base model"
                )
            seen.setdefault(name, (*key, i))
            part = _Part(
                index=i,
                coef=w * m.scaling(adapter.use_rslora),
                A=m.A.flatten(1) if m.kind == CONV2D else m.A,
                B=m.B.flatten(1) if m.kind == CONV2D else m.B,
                bias=m.bias,
            )
            out.setdefault(name, (m.kind, key[2], []))[2].append(part)
    return dict(sorted(out.items()))


def _describe(kind: str, out: int, a_tail: tuple[int, ...]) -> str:
    if kind == EMBEDDING:
        return f"embedding, {a_tail[0]} x {out}"
    if kind == CONV2D:
        return f"conv2d, out {out}, in {a_tail[0]}, kernel {a_tail[1]}x{a_tail[2]}"
    return f"linear, in {a_tail[0]} -> out {out}"


def _disagreements(adapters: Sequence[LoraAdapter]) -> list[str]:
    notes = []
    bases = {a.base_model_name for a in adapters if a.base_model_name}
    if len(bases) > 1:
        notes.append(
            f"parents name different base models ({', '.join(sorted(bases))}); their module "
            f"shapes agree, the result names {adapters[0].base_model_name!r}"
        )
    if len({a.fan_in_fan_out for a in adapters}) > 1:
        notes.append(
            "parents disagree on fan_in_fan_out; deltas were combined in the factors' "
            "[out, in] layout and the result keeps the first parent's setting"
        )
    return notes


# --- the math ---------------------------------------------------------------------------------


def _stack(parts: Sequence[_Part], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``B = [B_i]``, ``A = [coef_i A_i]`` in float64, so that ``B @ A`` is the target."""
    import torch

    a = torch.cat([p.A.to(dev, torch.float64) * p.coef for p in parts])
    b = torch.cat([p.B.to(dev, torch.float64) for p in parts], dim=1)
    return a, b


def _inner(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> float:
    """``<B1 A1, B2 A2>_F`` from two small Gram matrices, never forming ``[out, in]``."""
    return float(((b1.T @ b2) * (a1 @ a2.T)).sum())


def _rel_error(b_t: torch.Tensor, a_t: torch.Tensor, b_s: torch.Tensor, a_s: torch.Tensor) -> float:
    """``||T - S||_F / ||T||_F`` for low-rank ``T = B_t A_t`` and stored ``S = B_s A_s``.

    The squared-norm expansion resolves errors down to about 1e-8 in float64."""
    import torch

    b_s, a_s = b_s.to(torch.float64), a_s.to(torch.float64)
    tt = _inner(b_t, a_t, b_t, a_t)
    ss = _inner(b_s, a_s, b_s, a_s)
    # Parts that cancel (a - a) leave a target that is rounding noise, not a scale to divide
    # by: judge both against ||B_t||^2 ||A_t||^2, an upper bound of what the parts add up to.
    noise = 1e-12 * float(b_t.square().sum()) * float(a_t.square().sum())
    if tt <= noise:
        return 0.0 if ss <= noise else math.inf
    return math.sqrt(max(tt - 2.0 * _inner(b_t, a_t, b_s, a_s) + ss, 0.0) / tt)


def _cat(parts: Sequence[_Part], dev: torch.device) -> _Composed:
    import torch

    a, b = _stack(parts, dev)
    a32, b32 = a.to(torch.float32), b.to(torch.float32)
    return _Composed(a32.cpu(), b32.cpu(), _rel_error(b, a, b32, a32), truncated=False)


def _svd(parts: Sequence[_Part], k: int, dev: torch.device) -> _Composed:
    """Best rank-``k`` factors of ``sum coef_i B_i A_i``: with ``B = Qb Rb`` and
    ``A^T = Qa Ra``, the delta is ``Qb (Rb Ra^T) Qa^T``, so the SVD of the small core
    gives the SVD of the delta."""
    import torch

    a, b = _stack(parts, dev)
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k = min(k, s.shape[0])
    root = s[:k].sqrt()
    b_new = (qb @ (u[:, :k] * root)).to(torch.float32)
    a_new = ((root[:, None] * vh[:k]) @ qa.T).to(torch.float32)
    # Dropped singular values at rounding level (parents sharing a subspace) lose nothing.
    truncated = bool(s[k:].square().sum() > 1e-18 * s.square().sum())
    return _Composed(a_new.cpu(), b_new.cpu(), _rel_error(b, a, b_new, a_new), truncated)


def _elementwise(
    method: str,
    module: str,
    parts: Sequence[_Part],
    density: float,
    majority_sign: str,
    seed: int,
    dev: torch.device,
) -> torch.Tensor:
    """The merged dense delta ``[out, in]`` (float32) of TIES, DARE or magnitude pruning.

    Parents are streamed twice for the sign election instead of held at once, so memory is
    a few ``[out, in]`` matrices whatever the number of parents."""
    import torch

    thresholds: dict[int, torch.Tensor] = {}

    def task_vector(p: _Part) -> torch.Tensor:
        v = p.B.to(dev, torch.float32) @ p.A.to(dev, torch.float32)
        return v.mul_(p.coef)

    def trimmed(p: _Part) -> torch.Tensor:
        v = task_vector(p)
        if p.index not in thresholds:
            thresholds[p.index] = _threshold(v, density)
        return v.masked_fill_(v.abs() < thresholds[p.index], 0.0)

    def dropped(p: _Part) -> torch.Tensor:
        v = task_vector(p)
        g = torch.Generator(device=dev).manual_seed(dare_seed(seed, module, p.index))
        keep = torch.rand(v.shape, generator=g, device=dev, dtype=torch.float32) < density
        return torch.where(keep, v / density, 0.0)

    prepare: Callable[[_Part], torch.Tensor] = (
        dropped if method in ("dare_linear", "dare_ties") else trimmed
    )
    if method not in _SIGN_ELECTION:
        total = prepare(parts[0])
        for p in parts[1:]:
            total += prepare(p)
        return total

    vote = torch.zeros(parts[0].B.shape[0], parts[0].A.shape[1], device=dev)
    for p in parts:
        v = prepare(p)
        vote += v if majority_sign == "total" else v.sign()
    positive = vote >= 0
    del vote
    acc = torch.zeros(positive.shape, device=dev)
    count = torch.zeros(positive.shape, device=dev)
    for p in parts:
        v = prepare(p)
        agree = torch.where(positive, v > 0, v < 0)
        acc += v.masked_fill_(~agree, 0.0)
        count += agree
    return acc.div_(count.clamp_(min=1.0))


def _threshold(v: torch.Tensor, density: float) -> torch.Tensor:
    """The ``k``-th largest magnitude, ``k = int(density * numel)``; elements at or above it
    are kept (ties at the threshold are all kept)."""
    import torch

    n = v.numel()
    k = int(density * n)
    if k >= n:
        return torch.zeros((), device=v.device)
    if k == 0:
        return torch.full((), math.inf, device=v.device)
    return torch.kthvalue(v.abs().flatten(), n - k + 1).values


def _refactor(target: torch.Tensor, k: int, seed: int) -> _Composed:
    """Rank-``k`` factors of a dense matrix, the singular values split evenly between them;
    the error is measured against the matrix itself."""
    import torch

    m, n = target.shape
    short = min(m, n)
    sketch = min(2 * k + 8, short)
    randomized = short >= _RANDOMIZED_MIN_DIM and 4 * sketch <= short
    if randomized:
        g = torch.Generator(device=target.device).manual_seed(seed)
        omega = torch.randn(n, sketch, generator=g, device=target.device, dtype=target.dtype)
        q = torch.linalg.qr(target @ omega).Q
        for _ in range(_POWER_ITERATIONS):
            q = torch.linalg.qr(target @ torch.linalg.qr(target.T @ q).Q).Q
        u, s, vh = torch.linalg.svd(q.T @ target, full_matrices=False)
        u = q @ u[:, :k]
    else:
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
        u = u[:, :k]
    root = s[:k].sqrt()
    b = (u * root).contiguous()
    a = (root[:, None] * vh[:k]).contiguous()
    norm = _frobenius(target)
    diff = _frobenius(torch.addmm(target, b, a, alpha=-1.0))
    rel = (0.0 if diff == 0.0 else math.inf) if norm == 0.0 else diff / norm
    return _Composed(a.cpu(), b.cpu(), rel, truncated=k < short, randomized=randomized)


def _frobenius(x: torch.Tensor, rows: int = 256) -> float:
    """Frobenius norm summed in float64 a block of rows at a time: a float32 reduction over
    tens of millions of squares drifts by up to 1e-3, more than the errors it reports."""
    import torch

    total = sum(float(block.to(torch.float64).square().sum()) for block in x.split(rows))
    return math.sqrt(total)


def _mix(seed: int, module: str, what: str) -> int:
    return xxhash.xxh64_intdigest(f"{seed}:{module}:{what}".encode())


def _bias(parts: Sequence[_Part]) -> torch.Tensor | None:
    import torch

    if all(p.bias is None for p in parts):
        return None
    total = torch.zeros(parts[0].B.shape[0], dtype=torch.float64)
    for p in parts:
        if p.bias is not None:
            total += p.bias.to(torch.float64) * p.coef
    return total.to(torch.float32)


def _check_lora_bias(modules: dict[str, tuple[str, tuple[int, ...], list[_Part]]]) -> None:
    if not any(p.bias is not None for _, _, parts in modules.values() for p in parts):
        return
    for name, (kind, _, _) in modules.items():
        if kind == EMBEDDING:
            raise ComposeError(
                f"the result would need lora_bias=True (a parent has lora_B biases) and it "
                f"adapts the embedding {name!r}, which PEFT cannot give a lora bias; "
                "compose the embedding separately from the biased adapter"
            )


def _fill_biases(modules: dict[str, LoraModule]) -> None:
    """With ``lora_bias`` every lora_B has a bias in PEFT: give zero ones where none was
    composed, so the exported adapter has no missing keys."""
    import torch

    for m in modules.values():
        if m.bias is None:
            m.bias = torch.zeros(m.out_features, dtype=torch.float32)


# --- config and saved tensors -----------------------------------------------------------


def _config(
    adapters: Sequence[LoraAdapter], modules: dict[str, LoraModule], settings: dict[str, Any]
) -> tuple[dict[str, Any], int]:
    """A fresh PEFT config: scaling 1 per module (``alpha == r``), patterns anchored on
    full module names where a rank differs from the most common one."""
    first = adapters[0].config
    counts = Counter(m.rank for m in modules.values())
    common = max(counts, key=lambda r: (counts[r], r))
    pattern = {"^" + re.escape(n): m.rank for n, m in modules.items() if m.rank != common}
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "base_model_name_or_path": first.get("base_model_name_or_path"),
        "revision": first.get("revision"),
        "task_type": first.get("task_type"),
        "fan_in_fan_out": adapters[0].fan_in_fan_out,
        "r": common,
        "lora_alpha": common,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules}),
        "modules_to_save": settings["modules_to_save"],
        "bias": settings["bias"],
        "lora_bias": any(m.bias is not None for m in modules.values()),
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return config, common


def _modules_to_save(config: dict[str, Any]) -> list[str] | None:
    value = config.get("modules_to_save")
    return sorted(value) if value else None


def _agreed(adapters: Sequence[LoraAdapter], key: str, get: Callable[[dict[str, Any]], Any]) -> Any:
    values = [get(a.config) for a in adapters]
    if any(v != values[0] for v in values[1:]):
        listed = "; ".join(f"#{i + 1}: {v!r}" for i, v in enumerate(values))
        raise ComposeError(
            f"the adapters disagree on {key} ({listed}); a composed adapter has one setting. "
            "Compose adapters trained with the same setting"
        )
    return values[0]


def _full_tensors(adapters: Sequence[LoraAdapter]) -> dict[str, torch.Tensor]:
    """Whole tensors (``modules_to_save``) kept only when every parent that has one agrees."""
    import torch

    out: dict[str, torch.Tensor] = {}
    owner: dict[str, int] = {}
    for i, a in enumerate(adapters):
        for key, t in a.full.items():
            if key not in out:
                out[key], owner[key] = t, i
            elif (
                t.dtype != out[key].dtype
                or t.shape != out[key].shape
                or not torch.equal(t, out[key])
            ):
                raise ComposeError(
                    f"adapters #{owner[key] + 1} and #{i + 1} carry different trained copies of "
                    f"{key!r} (modules_to_save); those replace the base tensor and cannot be "
                    "weighted without the base model. Merge them into a checkpoint instead"
                )
    return dict(sorted(out.items()))


def _device(device: str) -> torch.device:
    from .device import resolve_device
    from .errors import ComposeDeviceUnavailable, DeviceUnavailable, InvalidArgument

    try:
        return resolve_device(device)
    except DeviceUnavailable as exc:
        raise ComposeDeviceUnavailable(str(exc)) from None
    except InvalidArgument as exc:
        raise InvalidComposeArgument(str(exc)) from None
