"""What an ``adapter_config.json`` may hold: the values PEFT loads, checked without PEFT.

An adapter lorahub accepts is exported as a folder ``PeftModel.from_pretrained`` must load, and
there it must compute what lorahub's merge computes. So a config is refused when PEFT would
reject it (``r: 4.5``, ``task_type: "NOT_A_TASK"``, ``bias: null``), when PEFT would load it as
something else than plain LoRA (DoRA aside: VeLoRA, aLoRA, Arrow, MiCA, replicated layers), when
PEFT changes the base weights while loading it (an unconverted PiSSA, OLoRA, CorDA or LoftQ
save), or when its targeting rules leave out a module that has weights (PEFT would ignore them).

PEFT's patterns (``rank_pattern`` keys, a ``target_modules`` regex, ...) are regular
expressions that Python's backtracking ``re`` matches in exponential time at worst: a key like
``(.|.|.|.)*z`` would hang ``add`` and a ``pull`` from an untrusted repo. :class:`Matcher`
matches them under one time budget per adapter instead; patterns that are plain (escaped)
module names, which is what lorahub itself writes, never reach a regex engine.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import InvalidAdapter

MAX_CONFIG_DEPTH = 32
# The largest rank accepted: the catalog stores ranks as 64-bit integers, and no LoRA comes near.
MAX_RANK = 2**31 - 1
# The longest pattern accepted. A module path written out and escaped stays well under this.
MAX_PATTERN_CHARS = 4096
# Seconds the regex engine may spend on one adapter's patterns before they are refused.
# Real patterns take microseconds; a backtracking one overruns it (by up to about twice).
PATTERN_BUDGET_S = 1.0

# PEFT's TaskType values.
TASK_TYPES = frozenset(
    {"SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"}
)
BIASES = ("none", "all", "lora_only")
BOOLEANS = (
    "use_dora",
    "use_rslora",
    "fan_in_fan_out",
    "lora_bias",
    "inference_mode",
    "use_qalora",
    "ensure_weight_tying",
)
# Settings that make PEFT build another kind of layer or model than plain LoRA (or DoRA):
# merged as plain LoRA, the result would differ from what PEFT computes.
_OTHER_LAYERS = {
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
}
_EMPTY_OR_NULL = {
    "alora_invocation_tokens": "aLoRA",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "megatron_config": "Megatron layers",
}
_ALL_LINEAR = "all-linear"


def check(config: Mapping[str, Any]) -> None:
    """Refuse a config PEFT could not load, or would load as something lorahub does not merge.

    Checks values one by one and together (``layers_pattern`` needs ``layers_to_transform``);
    patterns only for syntax and size here (matching happens with the modules, see
    :func:`check_targets`).

    Raises:
        InvalidAdapter: every problem found, in one message.
    """
    problems = _scan(config)
    if problems[:1] == [_TOO_DEEP]:
        raise InvalidAdapter("adapter_config.json " + _TOO_DEEP)
    problems = _check_values(config) + problems
    # The rest only once each value has its type: those rules iterate, compare and convert.
    problems = problems or _check_pattern_syntax(config) + _check_together(config)
    if problems:
        raise InvalidAdapter("adapter_config.json: " + "; ".join(problems))


_TOO_DEEP = f"nests deeper than {MAX_CONFIG_DEPTH} levels; no LoRA config does"


def _scan(config: Mapping[str, Any]) -> list[str]:
    """What no JSON document should hold: nesting deeper than any LoRA config, text that is
    not Unicode (a lone surrogate ``"\\ud800"`` cannot be stored or hashed), NaN or infinity.
    Walked without recursion: a hostile file can nest deeper than Python's stack."""
    problems: list[str] = []
    stack: list[tuple[Any, str, int]] = [(config, "the top level", 0)]
    while stack and len(problems) < 3:
        item, where, level = stack.pop()
        if level > MAX_CONFIG_DEPTH:
            return [_TOO_DEEP]
        if isinstance(item, str) and not is_text(item):
            problems.append(
                f"{where} holds text that is not valid Unicode (a lone surrogate such as "
                "\\ud800); save the file as UTF-8"
            )
        elif isinstance(item, float) and not math.isfinite(item):
            problems.append(f"{where} is {item}, which JSON does not allow")
        elif isinstance(item, Mapping):
            for key, value in item.items():
                if isinstance(key, str) and not is_text(key):
                    stack.append((key, f"a key in {where}", level + 1))
                    continue
                stack.append((value, str(key)[:80] if level == 0 else f"{where}.{key}", level + 1))
        elif isinstance(item, (list, tuple)):
            stack.extend((v, f"{where}[{i}]", level + 1) for i, v in enumerate(item))
    return problems


def is_text(s: str) -> bool:
    """Whether ``s`` encodes as UTF-8 (a lone surrogate does not)."""
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _number(value: Any) -> bool:
    """A finite JSON number (not a bool), small enough to be a float."""
    if type(value) is int:
        # Whole floats are stored as ints (1e308 as a 309-digit int): as large as a float.
        return abs(value) <= sys.float_info.max
    return type(value) is float and math.isfinite(value)


def _rank(value: Any) -> bool:
    """A whole number from 1 to ``MAX_RANK``; ``8.0`` counts (it is stored as 8)."""
    return _number(value) and float(value).is_integer() and 1 <= value <= MAX_RANK


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _ints(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)


def _check_values(config: Mapping[str, Any]) -> list[str]:
    problems = []
    peft_type = config.get("peft_type", "LORA")
    if str(getattr(peft_type, "value", peft_type)) != "LORA":
        if str(peft_type).upper() == "LORA":
            problems.append(
                f'peft_type must be written "LORA", as PEFT writes it, not {peft_type!r}'
            )
        else:
            problems.append(f"peft_type is {peft_type!r}; lorahub handles LoRA adapters only")
    task = config.get("task_type")
    task = getattr(task, "value", task)
    if task is not None and not (isinstance(task, str) and task in TASK_TYPES):
        problems.append(
            f"task_type {_short(task)} is not one PEFT knows ({', '.join(sorted(TASK_TYPES))}, "
            "or null)"
        )
    if not _rank(config.get("r", 8)):
        problems.append(f"r must be a whole number of 1 or more (at most {MAX_RANK})")
    if "lora_alpha" in config and not _number(config["lora_alpha"]):
        problems.append("lora_alpha must be a finite number")
    dropout = config.get("lora_dropout", 0.0)
    if not (_number(dropout) and 0 <= dropout <= 1):
        problems.append("lora_dropout must be a number from 0 to 1")
    if config.get("bias", "none") not in BIASES:
        problems.append(f"bias must be one of {', '.join(map(repr, BIASES))}")
    for key in BOOLEANS:
        if config.get(key) is not None and config[key] not in (True, False):  # 0/1 too
            problems.append(f"{key} must be true or false")
    for key in ("target_modules", "exclude_modules", "layers_pattern"):
        value = config.get(key)
        if value is not None and not (isinstance(value, str) or _strings(value)):
            problems.append(f"{key} must be a string or a list of strings")
    if config.get("modules_to_save") is not None and not _strings(config["modules_to_save"]):
        problems.append("modules_to_save must be a list of strings")
    layers = config.get("layers_to_transform")
    if layers is not None and not (type(layers) is int or _ints(layers)):
        problems.append("layers_to_transform must be a whole number or a list of them")
    for key in ("base_model_name_or_path", "revision"):
        if config.get(key) is not None and not isinstance(config[key], str):
            problems.append(f"{key} must be a string")
    for key, ok, what in (("rank_pattern", _rank, "ranks"), ("alpha_pattern", _number, "numbers")):
        pattern = config.get(key)
        if pattern is not None and not (
            isinstance(pattern, Mapping) and all(ok(v) for v in pattern.values())
        ):
            problems.append(f"{key} must map module patterns to {what}")
    problems.extend(_check_init(config.get("init_lora_weights", True)))
    problems.extend(_check_unsupported(config))
    problems.extend(_check_subconfigs(config))
    return problems


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_init(init: Any) -> list[str]:
    """``init_lora_weights``: how PEFT initialises the factors, which it redoes while loading."""
    if init is True or init is False:
        return []
    if not isinstance(init, str):
        return ["init_lora_weights must be true, false or the name of a PEFT initialisation"]
    low = init.lower()
    if low == "gaussian" or init in ("eva", "orthogonal", "lora_ga"):
        return []
    if init.startswith(("pissa", "corda")) or low == "olora" or init == "loftq":
        return [
            f"init_lora_weights is {init!r}: PEFT changes the base model's weights while loading "
            "such an adapter, so merging it into the unchanged base would give another model. "
            "Convert it to a plain LoRA first (PEFT's save_pretrained with "
            "path_initial_model_for_weight_conversion)"
        ]
    if low == "mica":
        return ["init_lora_weights 'mica' makes PEFT build MiCA layers; lorahub handles plain LoRA"]
    return [f"init_lora_weights {_short(init)} is not an initialisation PEFT knows"]


def _check_unsupported(config: Mapping[str, Any]) -> list[str]:
    problems = []
    for key, what in _OTHER_LAYERS.items():
        if config.get(key) is not None:
            problems.append(
                f"{key} is set: {what} adapters are not plain LoRA; lorahub cannot merge them"
            )
    for key, what in _EMPTY_OR_NULL.items():
        value = config.get(key)
        if value is not None and not (isinstance(value, (list, dict)) and not value):
            problems.append(f"{key} is set: {what} is not plain LoRA; lorahub cannot merge it")
    if config.get("trainable_token_indices") is not None:
        problems.append("trainable_token_indices is set: lorahub does not handle trainable tokens")
    return problems


def _check_subconfigs(config: Mapping[str, Any]) -> list[str]:
    """Settings of initialisation methods PEFT rebuilds while loading, so they must be valid."""
    problems = []
    for key in ("eva_config", "corda_config", "lora_ga_config", "loftq_config"):
        value = config.get(key)
        if value is not None and not isinstance(value, Mapping):
            problems.append(f"{key} must be an object or null")
    eva = config.get("eva_config")
    if isinstance(eva, Mapping):
        rho, tau = eva.get("rho", 2.0), eva.get("tau", 0.99)
        if not (_number(rho) and rho >= 1):
            problems.append("eva_config.rho must be a number of 1 or more")
        if not (_number(tau) and 0 <= tau <= 1):
            problems.append("eva_config.tau must be a number from 0 to 1")
    return problems


def _check_together(config: Mapping[str, Any]) -> list[str]:
    """PEFT's rules between settings (``LoraConfig.__post_init__`` and the layers it builds)."""
    problems = []
    targets = config.get("target_modules")
    if isinstance(targets, str):
        for key in ("layers_to_transform", "layers_pattern"):
            if config.get(key) is not None:
                problems.append(f"{key} cannot be used when target_modules is a string (a regex)")
    if config.get("layers_pattern") and config.get("layers_to_transform") is None:
        problems.append("layers_pattern needs layers_to_transform")
    if config.get("lora_bias"):
        if config.get("init_lora_weights", True) not in (True, False):
            problems.append("lora_bias needs init_lora_weights true or false")
        if config.get("use_dora"):
            problems.append("lora_bias and use_dora cannot both be true")
    if config.get("init_lora_weights") == "orthogonal":
        ranks = [config.get("r", 8), *(config.get("rank_pattern") or {}).values()]
        if any(int(r) % 2 for r in ranks):
            problems.append("init_lora_weights 'orthogonal' needs even ranks (r and rank_pattern)")
    return problems


def _check_pattern_syntax(config: Mapping[str, Any]) -> list[str]:
    problems = []
    for where, raw, pattern, as_text in _patterns(config):
        if len(raw) > MAX_PATTERN_CHARS:
            problems.append(
                f"{where} is over {MAX_PATTERN_CHARS} characters; write a shorter pattern or "
                "list the module names"
            )
        elif not (as_text and _simple(raw) is not None):  # plain names never reach an engine
            try:
                _compile(where, pattern)
            except InvalidAdapter as exc:
                problems.append(str(exc))
    return problems


def _patterns(config: Mapping[str, Any]) -> Iterable[tuple[str, str, str, bool]]:
    """Every regular expression PEFT builds from the config: where, as written, as PEFT
    builds it around that, and whether a plain name there is compared as text."""
    for key in ("rank_pattern", "alpha_pattern"):
        for k in config.get(key) or {}:
            yield f"{key} key {_short(k)}", str(k), _pattern_key(str(k)), True
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets.lower() != _ALL_LINEAR:
        yield "target_modules", targets, targets, True
    excluded = config.get("exclude_modules")
    if isinstance(excluded, str):
        yield "exclude_modules", excluded, excluded, True
    for m in config.get("modules_to_save") or []:
        yield f"modules_to_save entry {_short(m)}", m, _saved_module(m), False
    layers = config.get("layers_pattern")
    if layers:
        for p in [layers] if isinstance(layers, str) else layers:
            yield f"layers_pattern {_short(p)}", p, _layer_index(p), False


def _pattern_key(key: str) -> str:
    return rf"(.*\.)?({key})$"


def _saved_module(name: str) -> str:
    return rf"(^|.*\.){name}($|\..*)"


def _layer_index(pattern: str) -> str:
    return rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."


_ANY_LAYER_INDEX = r".*?\.[^.]*\.(?P<idx>\d+)\."
_META = frozenset(".^$*+?{}[]\\|()")


def _simple(pattern: str) -> list[str | None] | None:
    """A pattern with no regex meaning but ``.`` (``q_proj``, ``layers\\.0\\.q_proj`` as
    ``re.escape`` writes it, a kohya module path with bare dots), as its characters with None
    for each bare ``.``; None for any other regex."""
    out: list[str | None] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            nxt = pattern[i + 1 : i + 2]
            if not nxt or nxt.isalnum() or not nxt.isascii():
                return None
            out.append(nxt)
            i += 2
            continue
        if c in _META:
            if c != ".":
                return None
            out.append(None)
        else:
            out.append(c)
        i += 1
    return out


def _fits(chars: list[str | None], text: str) -> bool:
    """``text`` matches the simple pattern whole (a bare ``.`` is any character but a newline)."""
    return len(text) == len(chars) and all(
        t != "\n" if c is None else t == c for c, t in zip(chars, text, strict=True)
    )


_compiled: dict[str, Any] = {}


def _compile(where: str, pattern: str) -> Any:
    """``pattern`` for the bounded engine, once it is known that PEFT's ``re`` accepts it.

    Raises:
        InvalidAdapter: ``re`` refuses it (PEFT would fail), or ``regex`` does.
    """
    found = _compiled.get(pattern)
    if found is not None:
        return found
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise InvalidAdapter(f"{where} is not a regular expression PEFT can use ({exc})") from None
    import regex

    try:
        found = regex.compile(pattern)
    except (regex.error, RecursionError, OverflowError) as exc:
        raise InvalidAdapter(
            f"{where} uses regex syntax lorahub cannot match safely ({exc}); use a simpler pattern"
        ) from None
    if len(_compiled) > 4096:
        _compiled.clear()
    _compiled[pattern] = found
    return found


class Matcher:
    """PEFT's pattern rules for one adapter, under one time budget.

    The budget is the time spent in the regex engine for the whole adapter; a pattern still
    running when it is spent is refused as too complex, as PEFT's own ``re`` might never
    finish it. Plain names are compared as text and cost nothing from it.
    """

    def __init__(self, budget_s: float | None = None) -> None:
        self.budget_s = PATTERN_BUDGET_S if budget_s is None else budget_s
        self._spent = 0.0

    def _run(self, where: str, pattern: str, text: str, full: bool) -> Any:
        try:
            compiled = _compile(where, pattern)
        except InvalidAdapter as exc:
            raise InvalidAdapter(f"adapter_config.json: {exc}") from None
        left = self.budget_s - self._spent
        start = time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            run = compiled.fullmatch if full else compiled.match
            return run(text, timeout=left)
        except TimeoutError:
            raise InvalidAdapter(
                f"adapter_config.json: {where} takes too long to match the module names (over "
                f"{self.budget_s:g} s in all); PEFT's matching could hang on it. Write the "
                "module names out (escaped) or use a simpler pattern"
            ) from None
        finally:
            self._spent += time.monotonic() - start

    def pattern_value(self, patterns: Mapping[str, Any], module: str, what: str) -> Any | None:
        """PEFT's rule for ``rank_pattern`` / ``alpha_pattern``: the value of the first key
        (dict order) matching ``module`` or a dot-aligned suffix of it."""
        for key, value in patterns.items():
            chars = _simple(key)
            if chars is not None and "\n" not in module:  # "$" may match before a final newline
                cut = len(module) - len(chars)
                head = module[:cut]
                if cut >= 0 and (not head or head.endswith(".")) and _fits(chars, module[cut:]):
                    return value
                continue
            if self._run(f"{what} key {_short(key)}", _pattern_key(key), module, False):
                return value
        return None

    def targeted(self, config: Mapping[str, Any], module: str, kind: str) -> bool:
        """Whether PEFT puts a LoRA layer on ``module`` (its ``check_target_module_exists``):
        not excluded, not a saved module, selected by ``target_modules`` and the layer rules.
        True when ``target_modules`` is unset: PEFT then picks by model type, unknown here."""
        excluded = config.get("exclude_modules")
        if excluded:
            if isinstance(excluded, str):
                if self._full(excluded, module, "exclude_modules"):
                    return False
            elif module in excluded or any(module.endswith(f".{e}") for e in excluded):
                return False
        for m in config.get("modules_to_save") or ():
            where = f"modules_to_save entry {_short(m)}"
            if self._run(where, _saved_module(m), module, False):
                return False
        targets = config.get("target_modules")
        if targets is None:
            return True
        if isinstance(targets, str):
            if targets.lower() == _ALL_LINEAR:  # every Linear but the output layer
                return kind == "linear" and module.rsplit(".", 1)[-1] != "lm_head"
            return bool(self._full(targets, module, "target_modules"))
        if module in targets:
            return True
        if not any(module.endswith(f".{t}") for t in targets):
            return False
        return self._in_layers(config, module)

    def _full(self, pattern: str, text: str, where: str) -> bool:
        chars = _simple(pattern)
        if chars is not None:
            return _fits(chars, text)
        return bool(self._run(where, pattern, text, True))

    def _in_layers(self, config: Mapping[str, Any], module: str) -> bool:
        indexes = config.get("layers_to_transform")
        if indexes is None or indexes == []:
            return True
        names = config.get("layers_pattern")
        found = None
        if not names:  # None, "" or []: any numbered path segment is the layer index
            found = self._run("the layer index", _ANY_LAYER_INDEX, module, False)
        else:
            for p in [names] if isinstance(names, str) else names:
                found = self._run(f"layers_pattern {_short(p)}", _layer_index(p), module, False)
                if found:
                    break
        if not found or found.group("idx") is None:
            return False
        index = int(found.group("idx"))
        return index == indexes if type(indexes) is int else index in indexes


def check_targets(
    config: Mapping[str, Any], modules: Mapping[str, str], matcher: Matcher | None = None
) -> None:
    """Refuse weights PEFT would not load: each module (name -> kind) must be one PEFT adapts
    under this config, else PEFT ignores its weights or finds no module to adapt at all."""
    matcher = matcher or Matcher()
    missed = [name for name, kind in modules.items() if not matcher.targeted(config, name, kind)]
    if missed:
        shown = ", ".join(repr(m) for m in missed[:3]) + (" ..." if len(missed) > 3 else "")
        raise InvalidAdapter(
            f"adapter_config.json does not select {len(missed)} module(s) that have LoRA weights "
            f"({shown}): target_modules, exclude_modules, modules_to_save and "
            "layers_to_transform must select every module in the weights, or PEFT ignores them. "
            "Fix target_modules (or remove those modules' weights)"
        )
