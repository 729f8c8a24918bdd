"""Fuzzing ``add`` with hostile ``adapter_config.json`` files and damaged safetensors files.

Each trial mutates a real PEFT save of a tiny Llama adapter and adds it. Allowed outcomes: the
adapter is stored, or a ``LorahubError`` refuses it; anything else (a traceback) is a violation.
A sample of the accepted configs is exported and loaded with ``PeftModel.from_pretrained``: it
must load, hold every exported tensor unchanged, and scale each module as lorahub does.

Seeded and small by default so CI runs it (200 configs, 200 safetensors files). For the large
run give ``LORAHUB_FUZZ_N`` (configs; safetensors trials are 1.6 times that) and run the
``slow`` tests with ``-s`` to see the figures (``LORAHUB_FUZZ_SEED`` draws other inputs)::

    LORAHUB_FUZZ_N=1500 .venv/bin/python -m pytest -s -m slow tests/test_fuzz.py
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import struct
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import tiny_llama

import lorahub
from lorahub.errors import LorahubError

SEED = int(os.environ.get("LORAHUB_FUZZ_SEED", "20261207"))
DEFAULT_CONFIGS = 200
DEFAULT_FILES = 200
LARGE = int(os.environ.get("LORAHUB_FUZZ_N", "0") or 0)
SLOW_TRIAL_S = 10.0  # a trial this slow counts as a hang

BIG_INT = "9" * 5000  # json refuses to parse it with ValueError, not JSONDecodeError
BOMBS = ["(.|.|.|.)*z", "(a+)+$", "(x+x+)+y", "((a|aa)+)+b", "(.*)*\\.z"]
MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]

GENERIC: list[Any] = [
    None, True, False, 0, 1, -1, 2, 4, 8, 3.5, 4.0, 1e308, -0.0, 10**30, 2**63, "", "x", "LORA",
    "none", "q_proj", "\ud800", "A" * 5000, [], {}, ["q_proj"], [0], [1, 2], {"q_proj": 4},
    {"a": {"b": [1]}}, [None], ["\ud800"], {"\ud800": 1}, float("nan"), float("inf"), *BOMBS,
]  # fmt: skip
FLAGS: list[Any] = [True, False, None, 0, 1, "true", "yes"]
SUBCONFIG: list[Any] = [None, {}, {"x": 1}, 5, []]

POOLS: dict[str, list[Any]] = {
    "r": [1, 2, 4, 8, 16, 4.0, 0, -4, 4.5, "4", True, None, 10**12, 2**31, 2**63],
    "lora_alpha": [8, 16, 0.5, 0, -8, 8.0, "8", None, True, 1e308, 10**400],
    "target_modules": [
        ["q_proj", "v_proj"], ["q_proj"], ["v_proj", "q_proj", "k_proj"], "q_proj", ".*proj",
        r".*\.(q|v)_proj", "all-linear", "ALL-LINEAR", [], ["zzz"], None, 5, ["q_proj", 5], "(",
        r"model\.layers\.\d+\.self_attn\.(q|v)_proj", ["self_attn.q_proj", "self_attn.v_proj"],
        MODULES, *BOMBS,
    ],
    "lora_dropout": [0.0, 0.05, 0.5, 1.0, 1, 0, -0.1, 1.5, "0.1", None, True],
    "bias": ["none", "all", "lora_only", "None", None, 5, ""],
    "task_type": [
        None, "CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS",
        "FEATURE_EXTRACTION", "NOT_A_TASK", "causal_lm", 5, "", ["CAUSAL_LM"],
    ],
    "layers_to_transform": [
        None, 0, 1, [0], [1], [0, 1], [], [0, 5], -1, [True], "0", [0.0], 2**70,
    ],
    "layers_pattern": [
        None, "layers", ["layers"], "h", "", [], ["zz", "layers"], "(", "lay.rs", 5, [5],
    ],
    "rank_pattern": [
        {}, None, {"q_proj": 4}, {"q_proj": 8}, {"v_proj": 4, "q_proj": 4},
        {"^model.layers.0.self_attn.q_proj": 4}, {r"model\.layers\.0\.self_attn\.q_proj": 4},
        {"(": 4}, {"q_proj": 4.0}, {"q_proj": "4"}, {"q_proj": 0}, {"q_proj": None},
        {"layers.1.self_attn.v_proj": 2}, {"layers.1.self_attn.v_proj": 4}, [], "q_proj",
        *({b: 4} for b in BOMBS), *({b: 8} for b in BOMBS),
    ],
    "alpha_pattern": [
        {}, None, {"q_proj": 16}, {"v_proj": 0.5}, {"q_proj": "x"}, {".*": 2}, {"q_proj": 1e308},
        {r"layers\.1\..*": 3}, {"(": 2}, [], *({b: 3} for b in BOMBS),
    ],
    "modules_to_save": [
        None, [], ["score"], ["classifier", "score"], ["q_proj"], ["zzz"], "lm_head", [5], ["("],
        ["self_attn"], *([b] for b in BOMBS),
    ],
    "init_lora_weights": [
        True, False, "gaussian", "Gaussian", "eva", "orthogonal", "lora_ga", "pissa",
        "pissa_niter_4", "olora", "corda", "loftq", "mica", "bogus", None, 0, 1, "",
    ],
    "exclude_modules": [None, [], ["q_proj"], ["k_proj"], "q_proj", ".*v_proj", "(", ["zzz"], 5],
    "base_model_name_or_path": [None, "tiny/llama", "", 5, ["x"], "\ud800"],
    "revision": [None, "main", "", 5, {}],
    "peft_type": ["LORA", "lora", "ADALORA", "LOHA", None, 5, "", "Lora"],
    "eva_config": [None, {}, {"rho": 2.0}, {"rho": 0.5}, {"tau": 2}, {"rho": "x"}, 5, [], {"u": 1}],
    "loftq_config": [{}, None, {"loftq_bits": 4}, 5, []],
    "megatron_config": [None, {}, {"a": 1}, []],
    "layer_replication": [None, [], [[0, 1]], "x"],
    "target_parameters": [None, [], ["x"], "x"],
    "trainable_token_indices": [None, [], [1, 2], {"embed_tokens": [1]}],
    "alora_invocation_tokens": [None, [], [1, 2], "x"],
    "auto_mapping": [None, {}, 5, {"base_model_class": "X"}],
    **{k: FLAGS for k in (
        "fan_in_fan_out", "use_rslora", "use_dora", "lora_bias", "inference_mode", "use_qalora",
        "ensure_weight_tying",
    )},
    **{k: SUBCONFIG for k in (
        "velora_config", "arrow_config", "kasa_config", "use_bdlora", "monteclora_config",
        "corda_config", "lora_ga_config",
    )},
    **{k: [None, 5, "x", {}] for k in (
        "peft_version", "runtime_config", "megatron_core", "qalora_group_size",
    )},
}  # fmt: skip


@dataclass
class Tally:
    """Counts and the violations of one fuzz run, printed as one summary line."""

    name: str
    trials: int = 0
    refused: int = 0
    accepted: int = 0
    peft_checked: int = 0
    violations: list[str] = field(default_factory=list)
    slowest: float = 0.0

    def summary(self) -> str:
        return (
            f"fuzz {self.name}: trials={self.trials} refused={self.refused} "
            f"accepted={self.accepted} peft_loaded={self.peft_checked} "
            f"violations={len(self.violations)} slowest_add={self.slowest:.2f}s"
        )

    def verdict(self) -> None:
        print("\n" + self.summary())
        shown = "\n".join(self.violations[:15])
        assert not self.violations, f"{self.summary()}\n{shown}"


# --------------------------------------------------------------------------------------
# configs


def mutate_config(rng: random.Random, base: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """A mutated config, and sometimes a raw-text damage to apply after encoding."""
    config = copy.deepcopy(base)
    for _ in range(rng.choice((1, 1, 2, 3))):
        roll = rng.random()
        if roll < 0.75:
            key = rng.choice(sorted(POOLS))
            config[key] = copy.deepcopy(rng.choice(POOLS[key]))
        elif roll < 0.88:
            key = rng.choice(sorted(POOLS))
            config[key] = copy.deepcopy(rng.choice(GENERIC))
        elif roll < 0.94:
            config.pop(rng.choice(sorted(config)), None)
        else:
            config[rng.choice(["zz_new", "", "\ud800", "a" * 300])] = rng.choice(GENERIC)
    raw = rng.choice(["big_int", "truncate", "bom", "bad_utf8", "deep", "nan", "array", "dup"])
    return config, raw if rng.random() < 0.1 else None


def encode_config(rng: random.Random, config: dict[str, Any], raw: str | None) -> bytes:
    text = json.dumps(config)
    if raw == "big_int":
        text = text.replace('"r": ', f'"r": {BIG_INT}, "was_r": ', 1)
        if "was_r" not in text:
            text = text[:-1] + f', "x": {BIG_INT}}}'
    elif raw == "truncate":
        text = text[: rng.randrange(len(text))]
    elif raw == "bom":
        return b"\xef\xbb\xbf" + text.encode()
    elif raw == "bad_utf8":
        return text.encode()[:-1] + b'\xff"'
    elif raw == "deep":
        text = text[:-1] + ', "d": ' + "[" * 5000 + "]" * 5000 + "}"
    elif raw == "nan":
        text = text[:-1] + ', "lora_alpha": NaN}'
    elif raw == "array":
        text = f"[{text}]"
    elif raw == "dup":
        text = text[:-1] + ', "r": "dup"}'
    return text.encode()


def add_one(hub: lorahub.Hub, folder: Path, tally: Tally, label: str) -> Any | None:
    """Add ``folder``; the stored adapter, or None when refused. Anything but a LorahubError
    is a violation, as is a trial slower than ``SLOW_TRIAL_S``."""
    tally.trials += 1
    start = time.monotonic()
    try:
        result = hub.add(folder)
    except LorahubError:
        tally.refused += 1
        return None
    except Exception as exc:
        tally.violations.append(f"{label}: traceback {type(exc).__name__}: {str(exc)[:300]}")
        return None
    finally:
        took = time.monotonic() - start
        tally.slowest = max(tally.slowest, took)
        if took > SLOW_TRIAL_S:
            tally.violations.append(f"{label}: add took {took:.1f}s")
    tally.accepted += 1
    return result.adapter


def check_in_peft(hub: lorahub.Hub, info: Any, out: Path, tally: Tally, label: str) -> None:
    """Export and load with PEFT: every exported tensor arrives unchanged, and each module's
    scaling (rank and alpha patterns, rsLoRA) is the one lorahub computes."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    tally.peft_checked += 1
    shutil.rmtree(out, ignore_errors=True)
    try:
        hub.export(info.digest, out)
        config = json.loads((out / "adapter_config.json").read_text())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(tiny_llama(), str(out))
    except Exception as exc:
        tally.violations.append(
            f"{label}: accepted but PEFT cannot load the export: {type(exc).__name__}: "
            f"{str(exc)[:300]}\n    config: {json.dumps(info.config)[:600]}"
        )
        return
    # LoRA tensors by PEFT's adapter keys; whole saved modules by the model's own.
    state = {**model.state_dict(), **get_peft_model_state_dict(model)}
    saved = load_file(str(out / "adapter_model.safetensors"))
    lost = [k for k, v in saved.items() if k not in state or not torch.equal(state[k], v)]
    if lost:
        tally.violations.append(f"{label}: PEFT ignored or changed {lost[:3]} (config {config})")
    adapter = hub.load(info.digest)
    inner = model.base_model.model
    for name, m in adapter.modules.items():
        got = inner.get_submodule(name).scaling.get("default")
        want = m.scaling(adapter.use_rslora)
        if got is None or not math.isclose(got, want, rel_tol=1e-9):
            tally.violations.append(f"{label}: {name} scaling {got} in PEFT, {want} in lorahub")


def run_configs(source: Path, work: Path, n: int, peft_samples: int, cli_every: int) -> Tally:
    from click.testing import CliRunner

    from lorahub.cli import cli

    rng = random.Random(SEED)
    base = json.loads((source / "adapter_config.json").read_text())
    hub = lorahub.Hub(home=work / "store")
    tally = Tally("configs")
    folder = work / "trial"
    accepted: list[tuple[int, Any]] = []
    runner = CliRunner()
    for i in range(n):
        config, raw = mutate_config(rng, base)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        shutil.copy(source / "adapter_model.safetensors", folder)
        (folder / "adapter_config.json").write_bytes(encode_config(rng, config, raw))
        label = f"config trial {i} ({raw or 'json'}: {json.dumps(config)[:400]})"
        if cli_every and i % cli_every == 0:
            cli_trial(runner, cli, work / "cli-store", folder, tally, label)
            continue
        info = add_one(hub, folder, tally, label)
        if info is not None:
            accepted.append((i, info))
    sample = random.Random(SEED + 1).sample(accepted, min(peft_samples, len(accepted)))
    for i, info in sample:
        check_in_peft(hub, info, work / "export", tally, f"config trial {i}")
    return tally


def cli_trial(runner: Any, cli: Any, home: Path, folder: Path, tally: Tally, label: str) -> None:
    """``lorahub add``: exit 0, or 1 with the reason; never a traceback or a "lorahub bug"."""
    tally.trials += 1
    res = runner.invoke(cli, ["--home", str(home), "add", str(folder)])
    if res.exit_code == 0:
        tally.accepted += 1
    elif res.exit_code == 1 and "Traceback" not in res.output and "lorahub bug" not in res.output:
        tally.refused += 1
    else:
        exc = res.exception if not isinstance(res.exception, SystemExit) else None
        tally.violations.append(
            f"{label}: CLI exit {res.exit_code}, {type(exc).__name__ if exc else ''} "
            f"{res.stderr[:300]!r}"
        )


def test_fuzzed_configs_are_stored_or_refused_and_accepted_ones_load_in_peft(peft_save, tmp_path):
    run_configs(peft_save, tmp_path, DEFAULT_CONFIGS, peft_samples=20, cli_every=10).verdict()


@pytest.mark.slow
@pytest.mark.skipif(not LARGE, reason="set LORAHUB_FUZZ_N for the large fuzz run")
def test_fuzzed_configs_large(peft_save, tmp_path):
    tally = run_configs(peft_save, tmp_path, LARGE, peft_samples=max(60, LARGE // 25), cli_every=25)
    tally.verdict()


# --------------------------------------------------------------------------------------
# safetensors files


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict[str, Any] | str, body: bytes) -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode("utf-8", "replace")
    return struct.pack("<Q", len(raw)) + raw + body


def _mutate_header(rng: random.Random, header: dict[str, Any], body: bytes) -> bytes:
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    op = rng.choice([
        "dtype", "shape", "offsets", "drop", "rename", "metadata", "big_int", "surrogate",
        "entry", "swap", "rank", "nested", "extra",
    ])  # fmt: skip
    if op == "dtype":
        entry["dtype"] = rng.choice(["F16", "BF16", "I32", "BOOL", "F64", "X", 5, None, "F8_E4M3"])
    elif op == "shape":
        entry["shape"] = rng.choice(
            [[], [0], [4], [4, 32, 1], [-1, 32], [2**64, 1], [4.0, 32], "x", [4, 16], [8, 16]]
        )
    elif op == "offsets":
        a, b = entry["data_offsets"]
        entry["data_offsets"] = rng.choice(
            [[b, a], [a, b + 4], [0, b - a], [-4, b], [a, 2**70], [a], "x", [a + 1, b + 1]]
        )
    elif op == "drop":
        del header[name]
    elif op == "rename":
        header[rng.choice([
            name.replace("lora_A", "lora_B"), name.replace("q_proj", "k_proj"),
            name.replace(".weight", ""), name + ".x", "\ud800" + name,
            name.replace("base_model.model.", ""), name.replace("q_proj", "q_projX"), "",
            name.replace("lora_A.weight", "lora_magnitude_vector"),
        ])] = header.pop(name)  # fmt: skip
    elif op == "metadata":
        header["__metadata__"] = rng.choice(
            [{"format": "pt"}, {"a": 5}, "x", {"\ud800": "x"}, {"ss_x": "y" * 1000}, None, []]
        )
    elif op == "big_int":
        text = json.dumps(header).replace('"data_offsets": [', f'"data_offsets": [{BIG_INT}, ', 1)
        return _join(text, body)
    elif op == "surrogate":
        header[name + "\ud800"] = header.pop(name)
    elif op == "entry":
        header[name] = rng.choice([None, 5, "x", [], {}, {"dtype": "F32"}])
    elif op == "swap":
        other = header[rng.choice(names)]
        entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
    elif op == "rank":  # a consistent tensor of another rank: the config disagrees
        size = 2 * 32 * 4
        entry.update(dtype="F32", shape=[2, 32], data_offsets=[len(body), len(body) + size])
        return _join(header, body + bytes(size))
    elif op == "nested":
        return _join('{"a":' + "[" * 3000 + "]" * 3000 + "}", body)
    elif op == "extra":  # a whole saved module, shaped as the tiny Llama's (fit is compat's job)
        size = 128 * 32 * 4
        header["base_model.model.lm_head.weight"] = {
            "dtype": "F32",
            "shape": [128, 32],
            "data_offsets": [len(body), len(body) + size],
        }
        return _join(header, body + bytes(size))
    return _join(header, body)


def mutate_file(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    op = rng.choice(
        ["flip_header", "flip_data", "header", "header", "length", "truncate", "append"]
    )
    if op == "flip_header":
        (n,) = struct.unpack("<Q", data[:8])
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(0, 8 + n)] ^= 1 << rng.randrange(8)
        return bytes(out), op
    if op == "flip_data":
        (n,) = struct.unpack("<Q", data[:8])
        out = bytearray(data)
        for _ in range(rng.randint(1, 16)):
            out[rng.randrange(8 + n, len(out))] ^= 1 << rng.randrange(8)
        return bytes(out), op
    if op == "header":
        header, body = _split(data)
        return _mutate_header(rng, header, body), op
    if op == "length":
        n = rng.choice([0, 1, 7, len(data), len(data) - 7, 2**63, 2**64 - 1, 100 << 20])
        return struct.pack("<Q", n) + data[8:], op
    if op == "truncate":
        return data[: rng.randrange(len(data))], op
    return data + bytes(rng.randrange(1, 64)), op


def run_files(source: Path, work: Path, n: int, peft_samples: int) -> Tally:
    rng = random.Random(SEED + 2)
    data = (source / "adapter_model.safetensors").read_bytes()
    hub = lorahub.Hub(home=work / "store")
    tally = Tally("safetensors")
    folder = work / "trial"
    accepted: list[tuple[int, Any]] = []
    for i in range(n):
        damaged, op = mutate_file(rng, data)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        shutil.copy(source / "adapter_config.json", folder)
        (folder / "adapter_model.safetensors").write_bytes(damaged)
        info = add_one(hub, folder, tally, f"file trial {i} ({op})")
        if info is not None:
            accepted.append((i, info))
    sample = random.Random(SEED + 3).sample(accepted, min(peft_samples, len(accepted)))
    for i, info in sample:
        check_in_peft(hub, info, work / "export", tally, f"file trial {i}")
    return tally


def test_fuzzed_safetensors_are_stored_or_refused(peft_save, tmp_path):
    run_files(peft_save, tmp_path, DEFAULT_FILES, peft_samples=5).verdict()


@pytest.mark.slow
@pytest.mark.skipif(not LARGE, reason="set LORAHUB_FUZZ_N for the large fuzz run")
def test_fuzzed_safetensors_large(peft_save, tmp_path):
    run_files(peft_save, tmp_path, int(LARGE * 1.6), peft_samples=max(20, LARGE // 50)).verdict()
