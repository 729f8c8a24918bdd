"""Does an adapter fit a base model? Shape validation with a report of every mismatch.

Works on a tensor table (``name -> TensorInfo``, from :func:`lorahub.base.open_base` or any
safetensors header), never on weights, so a check costs nothing but header reads.

An adapter module ``m`` applies to the base tensor ``m.weight``. Names are matched after the
one prefix rewrite (per adapter, not per module) that maps the most modules: identity, or
replacing one of the usual wrapper prefixes (``model.``, ``language_model.``,
``model.language_model.``, ``transformer.``, PEFT's ``base_model.model.``) by another or by
nothing, or adding one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .adapter import CONV2D, EMBEDDING
from .digest import Digest
from .dtypes import FLOAT_DTYPES
from .errors import IncompatibleAdapter

if TYPE_CHECKING:
    from .adapter import LoraAdapter, LoraModule
    from .base import TensorInfo

EXACT, COMPATIBLE, INCOMPATIBLE = "exact", "compatible", "incompatible"

MISSING = "missing"
SHAPE = "shape"
DTYPE = "dtype"
BIAS = "bias"
MAGNITUDE = "magnitude"

PREFIXES: tuple[str, ...] = (
    "model.",
    "language_model.",
    "model.language_model.",
    "transformer.",
    "base_model.model.",
)


@dataclass(frozen=True)
class Problem:
    """One reason an adapter does not fit: a module, the base tensor, shapes expected/found.

    ``expected`` is what the adapter needs; ``found`` is what the base has (None: absent).
    ``reason`` is one of ``missing``, ``shape``, ``dtype``, ``bias``, ``magnitude``.
    """

    module: str
    base_tensor: str | None
    expected: tuple[int, ...] | None
    found: tuple[int, ...] | None
    reason: str
    detail: str | None = None

    @property
    def text(self) -> str:
        """One line for a person."""
        target = f" -> {self.base_tensor}" if self.base_tensor else ""
        exp = _shape(self.expected)
        if self.reason == MISSING:
            msg = f"not in the base (needs {exp})"
        elif self.reason == SHAPE:
            msg = f"expects {exp}, base has {_shape(self.found)}"
        elif self.reason == BIAS:
            msg = (
                f"lora_B.bias {exp} needs a base bias, but the base has none"
                if self.found is None
                else f"lora_B.bias is {exp}, base bias is {_shape(self.found)}"
            )
        elif self.reason == MAGNITUDE:
            msg = f"DoRA magnitude is {exp}, but the base weight has {_shape(self.found)} rows"
        else:
            msg = self.reason
        if self.detail:
            msg = f"{msg}; {self.detail}"
        return f"{self.module}{target}: {msg}"

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: shapes as lists (None where absent), and the one-line text."""
        return {
            "module": self.module,
            "base_tensor": self.base_tensor,
            "expected": list(self.expected) if self.expected is not None else None,
            "found": list(self.found) if self.found is not None else None,
            "reason": self.reason,
            "detail": self.detail,
            "text": self.text,
        }


@dataclass(frozen=True)
class CompatReport:
    """How an adapter fits a base: status, every problem, and the name mapping to merge with.

    ``mapping`` maps each adapter module whose base weight exists to that weight's name;
    ``full_mapping`` maps each key of ``adapter.full`` present in the base to the base name.
    """

    status: str
    matched: int
    problems: tuple[Problem, ...]
    mapping: Mapping[str, str] = field(hash=False)
    full_mapping: Mapping[str, str] = field(hash=False)
    prefix_note: str | None
    total: int = 0
    base_model_name: str | None = None

    @property
    def ok(self) -> bool:
        return self.status != INCOMPATIBLE

    @property
    def missing(self) -> int:
        """Problems where the base lacks the tensor."""
        return sum(p.reason == MISSING for p in self.problems)

    @property
    def mismatched(self) -> int:
        """Problems where the tensor exists but does not fit (shape, dtype, bias, magnitude)."""
        return sum(p.reason != MISSING for p in self.problems)

    @property
    def summary(self) -> str:
        """Human text: the verdict, then one line per problem, then what to do."""
        of = f"{self.matched} of {self.total} modules" if self.total else f"{self.matched} modules"
        if self.status == EXACT:
            head = f"exact: {of} match and the base weights are the ones recorded"
        elif self.status == COMPATIBLE:
            head = f"compatible: {of} match"
        else:
            counts = []
            if self.missing:
                counts.append(f"{self.missing} missing")
            if self.mismatched:
                counts.append(f"{self.mismatched} mismatched")
            detail = f" ({', '.join(counts)})" if counts else ""
            head = f"incompatible: {of} match, {len(self.problems)} problems{detail}"
        lines = [head]
        if self.prefix_note:
            lines.append(f"note: {self.prefix_note}")
        lines.extend(f"  {p.text}" for p in self.problems)
        if self.status == INCOMPATIBLE:
            made_for = (
                f" (it says it was trained on {self.base_model_name!r})"
                if self.base_model_name
                else ""
            )
            lines.append(f"the adapter was made for another base model{made_for}; pass that base")
        return "\n".join(lines)

    def to_dict(self, mapping: bool = False) -> dict[str, Any]:
        """Plain data for JSON: the verdict, counts and every problem; with ``mapping`` also
        the module-to-base-tensor name mappings (one entry per module: large)."""
        d: dict[str, Any] = {
            "status": self.status,
            "ok": self.ok,
            "matched": self.matched,
            "total": self.total,
            "missing": self.missing,
            "mismatched": self.mismatched,
            "prefix_note": self.prefix_note,
            "base_model_name": self.base_model_name,
            "problems": [p.to_dict() for p in self.problems],
        }
        if mapping:
            d["mapping"] = dict(self.mapping)
            d["full_mapping"] = dict(self.full_mapping)
        return d


def check(
    adapter: LoraAdapter,
    tensors: Mapping[str, TensorInfo],
    *,
    content_hash: Digest | str | None = None,
    recorded_hash: Digest | str | None = None,
) -> CompatReport:
    """Check every module and saved tensor of ``adapter`` against a base tensor table.

    Args:
        adapter: the adapter.
        tensors: the base's tensors by name (``BaseModel.tensors``).
        content_hash: the base's content hash, when known.
        recorded_hash: the content hash recorded with the adapter, when known.

    Returns:
        A report: ``exact`` (fits and both hashes given and equal), ``compatible`` (fits),
        or ``incompatible`` (any problem, or no module matched).

    Example:
        >>> report = check(adapter, open_base("./llama").tensors)  # doctest: +SKIP
        >>> require(report, "adapter 'chat:latest'")  # doctest: +SKIP
    """
    strip, add = _best_rewrite(adapter, tensors)
    problems: list[Problem] = []
    mapping: dict[str, str] = {}
    matched = 0
    for name, module in sorted(adapter.modules.items()):
        target = _rewrite(name, strip, add)
        found = _module_problems(adapter, name, module, target, tensors)
        if f"{target}.weight" in tensors:
            mapping[name] = f"{target}.weight"
        if found:
            problems.extend(found)
        else:
            matched += 1
    full_mapping: dict[str, str] = {}
    for key, tensor in sorted(adapter.full.items()):
        target = _rewrite(key, strip, add)
        expected = tuple(int(d) for d in tensor.shape)
        info = tensors.get(target)
        if info is None:
            problems.append(Problem(key, _guess(target, tensors), expected, None, MISSING))
            continue
        full_mapping[key] = target
        if tuple(info.shape) != expected:
            problems.append(Problem(key, target, expected, tuple(info.shape), SHAPE))
    if problems or matched == 0:
        status = INCOMPATIBLE
    elif _same_digest(content_hash, recorded_hash):
        status = EXACT
    else:
        status = COMPATIBLE
    return CompatReport(
        status=status,
        matched=matched,
        problems=tuple(problems),
        mapping=MappingProxyType(mapping),
        full_mapping=MappingProxyType(full_mapping),
        prefix_note=_note(strip, add),
        total=len(adapter.modules),
        base_model_name=adapter.base_model_name,
    )


def require(report: CompatReport, what: str) -> None:
    """Raise ``IncompatibleAdapter`` naming every problem unless the report says it fits.

    ``what`` names the adapter in the message (``"adapter 'chat:v2'"``).
    """
    if report.status == INCOMPATIBLE:
        raise IncompatibleAdapter(f"{what} does not fit this base model: {report.summary}", report)


def _module_problems(
    adapter: LoraAdapter,
    name: str,
    module: LoraModule,
    target: str,
    tensors: Mapping[str, TensorInfo],
) -> list[Problem]:
    weight = f"{target}.weight"
    expected = tuple(int(d) for d in adapter.base_shape(name))
    info = tensors.get(weight)
    if info is None:
        return [Problem(name, _guess(weight, tensors), expected, None, MISSING)]
    found = tuple(info.shape)
    if found != expected:
        return [Problem(name, weight, expected, found, SHAPE)]
    out: list[Problem] = []
    if info.dtype not in FLOAT_DTYPES:
        out.append(
            Problem(
                name,
                weight,
                expected,
                found,
                DTYPE,
                f"base dtype {info.dtype} is not a plain float type (quantized?); "
                "use an unquantized base",
            )
        )
    if module.bias is not None:
        bias_shape = tuple(int(d) for d in module.bias.shape)
        bias = tensors.get(f"{target}.bias")
        if bias is None or tuple(bias.shape) != bias_shape:
            out.append(
                Problem(
                    name,
                    f"{target}.bias",
                    bias_shape,
                    None if bias is None else tuple(bias.shape),
                    BIAS,
                )
            )
    if module.magnitude is not None:
        rows = _magnitude_rows(module.kind, adapter.fan_in_fan_out, found)
        mag = tuple(int(d) for d in module.magnitude.shape)
        if module.magnitude.numel() != rows:
            out.append(Problem(name, weight, mag, (rows,), MAGNITUDE))
    return out


def _magnitude_rows(kind: str, fan_in_fan_out: bool, shape: tuple[int, ...]) -> int:
    # DoRA keeps one norm per output feature: rows of a Linear/conv weight, columns of an
    # embedding table or of a GPT-2 Conv1D ([in, out]) weight.
    if kind == CONV2D:
        return shape[0]
    if kind == EMBEDDING or fan_in_fan_out:
        return shape[1]
    return shape[0]


def _rewrite(name: str, strip: str, add: str) -> str:
    if strip and not name.startswith(strip):
        return name
    return add + name[len(strip) :]


def _rewrites() -> list[tuple[str, str]]:
    opts = ["", *PREFIXES]
    return [("", "")] + [(s, a) for s in opts for a in opts if s != a]


def _best_rewrite(adapter: LoraAdapter, tensors: Mapping[str, TensorInfo]) -> tuple[str, str]:
    """The (strip, add) prefix pair that maps the most names; identity wins ties."""
    names = [(m, ".weight") for m in adapter.modules] + [(k, "") for k in adapter.full]
    best, best_score = ("", ""), -1
    for strip, add in _rewrites():
        if strip and not any(n.startswith(strip) for n, _ in names):
            continue
        score = sum(_rewrite(n, strip, add) + suffix in tensors for n, suffix in names)
        if score > best_score:
            best, best_score = (strip, add), score
    return best if best_score > 0 else ("", "")


def _note(strip: str, add: str) -> str | None:
    if not strip and not add:
        return None
    if not strip:
        return f"adapter names lack the base's {add!r} prefix; added it"
    if not add:
        return f"adapter names carry a {strip!r} prefix the base lacks; removed it"
    return f"adapter names use the prefix {strip!r} where the base has {add!r}; replaced it"


def _guess(name: str, tensors: Mapping[str, TensorInfo]) -> str:
    """The base tensor a missing name most likely meant: the unique one sharing the longest
    dot-aligned suffix that still holds every layer index (so layer 1 never points at layer
    0), else the name itself."""
    parts = name.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    shortest = max(2, len(parts) - digits[0] + 1) if digits else 2
    for k in range(len(parts) - 1, shortest - 1, -1):
        suffix = "." + ".".join(parts[-k:])
        hits = [t for t in tensors if t.endswith(suffix) or t == suffix[1:]]
        if len(hits) == 1:
            return hits[0]
        if hits:
            break
    return name


def _same_digest(a: Digest | str | None, b: Digest | str | None) -> bool:
    if a is None or b is None:
        return False
    return _norm(a) == _norm(b)


def _norm(d: Digest | str) -> str:
    if isinstance(d, Digest):
        return d.hex
    try:
        return Digest.parse(d).hex
    except ValueError:
        return d.strip().lower()


def _shape(shape: tuple[int, ...] | None) -> str:
    return "nothing" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"
