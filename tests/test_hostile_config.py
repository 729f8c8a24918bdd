"""Hostile ``adapter_config.json`` values and base headers: each is refused with a
``LorahubError`` (never a traceback or a hang), and what lorahub accepts, PEFT loads.

PEFT is the reference: its own matching functions and its own loader decide what the right
answer is, never lorahub's code.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import time
import tracemalloc
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from factories import cli_runner, tiny_llama, write_peft_adapter
from safetensors.torch import save_file

from lorahub import peft_config
from lorahub.adapter import pattern_value
from lorahub.base import open_base
from lorahub.errors import BaseModelError, InvalidAdapter
from lorahub.formats import peft as peft_format

BIG = "9" * 5000


def variant(peft_save: Path, dest: Path, text: str | None = None, **changes: Any) -> Path:
    """A copy of the PEFT save with its config changed (or replaced by ``text``)."""
    shutil.copytree(peft_save, dest)
    config = json.loads((peft_save / "adapter_config.json").read_text())
    config.update(changes)
    (dest / "adapter_config.json").write_text(text if text is not None else json.dumps(config))
    return dest


def peft_loads(folder: Path) -> bool:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            PeftModel.from_pretrained(tiny_llama(), str(folder))
        except Exception:
            return False
    return True


def count_rows(hub) -> int:
    return len(hub.list_adapters())


# --------------------------------------------------------------------------------------
# values no JSON reader should choke on


def test_an_integer_of_5000_digits_is_refused_not_a_traceback(hub, peft_save, tmp_path):
    text = (peft_save / "adapter_config.json").read_text().replace('"r": 4', f'"r": {BIG}')
    src = variant(peft_save, tmp_path / "a", text=text)
    with pytest.raises(InvalidAdapter, match="integer too long"):
        hub.add(src)
    assert count_rows(hub) == 0
    res = cli_runner(tmp_path / "cli")("add", src, code=1)
    assert "integer too long" in res.stderr and "Traceback" not in res.output


@pytest.mark.parametrize(
    "changes",
    [
        {"base_model_name_or_path": "model\ud800"},
        {"\ud800": 1},
        {"alpha_pattern": {"q_proj\udfff": 4}},
        {"some_future_key": {"nested": ["ok", "\ud800"]}},
    ],
    ids=["value", "key", "pattern-key", "nested"],
)
def test_lone_surrogates_are_refused(hub, peft_save, tmp_path, changes):
    src = variant(peft_save, tmp_path / "a", **changes)  # json.dumps writes them as \ud800 escapes
    assert "\\ud" in (src / "adapter_config.json").read_text()
    with pytest.raises(InvalidAdapter, match="not valid Unicode"):
        hub.add(src)
    assert count_rows(hub) == 0
    assert "not valid Unicode" in cli_runner(tmp_path / "cli")("add", src, code=1).stderr


def test_a_lone_surrogate_in_a_pickled_tensor_name_is_refused(hub, tmp_path):
    src = write_peft_adapter(tmp_path / "a", fmt="bin")
    sd = torch.load(src / "adapter_model.bin", weights_only=True)
    key = next(iter(sd))
    sd[key.replace("q_proj", "q_proj\ud800")] = sd.pop(key)
    torch.save(sd, src / "adapter_model.bin")
    with pytest.raises(InvalidAdapter, match="not valid Unicode"):
        hub.add(src)


def test_nan_outside_known_keys_is_refused(hub, peft_save, tmp_path):
    text = (peft_save / "adapter_config.json").read_text()[:-1] + ', "future": NaN}'
    with pytest.raises(InvalidAdapter, match="future is nan"):
        hub.add(variant(peft_save, tmp_path / "a", text=text))


# --------------------------------------------------------------------------------------
# size


def test_a_huge_config_is_refused_before_it_is_read(hub, peft_save, tmp_path):
    src = variant(peft_save, tmp_path / "a")
    with open(src / "adapter_config.json", "r+b") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB on paper, nothing on disk
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(InvalidAdapter, match="reads at most"):
            hub.add(src)
        took = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert took < 2 and peak < 32 << 20, (took, peak)


def test_the_size_cap_is_exact_and_holds_for_what_is_read(tmp_path, monkeypatch):
    (tmp_path / "adapter_config.json").write_text("{}" + " " * (peft_format.MAX_CONFIG_BYTES - 2))
    assert peft_format.read_config(tmp_path) == {}
    (tmp_path / "adapter_config.json").write_text("{}" + " " * (peft_format.MAX_CONFIG_BYTES - 1))
    with pytest.raises(InvalidAdapter, match="reads at most"):
        peft_format.read_config(tmp_path)
    # A file whose size is not known up front (a pipe, /proc) is still cut at the cap.
    with monkeypatch.context() as m:
        m.setattr(peft_format.os, "fstat", lambda fd: SimpleNamespace(st_size=0))
        with pytest.raises(InvalidAdapter, match="reads at most"):
            peft_format.read_config(tmp_path)


# --------------------------------------------------------------------------------------
# patterns: PEFT's semantics, in bounded time


# Each pattern with a module name that makes Python's re backtrack for ages (checked by hand:
# minutes to years), which PEFT-style matching met on every add.
BOMBS = [
    ("(.|.|.|.)*z", "a" * 40),
    ("(a+)+$", "a" * 40 + "!"),
    ("(x+x+)+y", "x" * 40),
    ("((a|aa)+)+b", "a" * 40),
]


@pytest.mark.parametrize(("bomb", "leaf"), BOMBS)
def test_backtracking_pattern_keys_do_not_hang_add(hub, tmp_path, bomb, leaf):
    mods = {f"model.layers.0.{leaf}": (8, 8), "model.layers.0.mlp.down_proj": (8, 8)}
    patterns = {"alpha_pattern": {bomb: 3}, "rank_pattern": {bomb: 4}}
    src = write_peft_adapter(tmp_path / "a", mods, extra_config=patterns)
    start = time.monotonic()
    try:
        hub.add(src)
    except InvalidAdapter as exc:
        assert "too long to match" in str(exc)
    assert time.monotonic() - start < 10


def test_a_pattern_still_too_slow_is_refused_within_the_budget(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(peft_config, "PATTERN_BUDGET_S", 0.5)
    # Slow for every backtracking engine: the "z" the pattern needs comes after a newline.
    name = "model." + "abcdefgh" * 6 + "\nz"
    src = write_peft_adapter(
        tmp_path / "a", {name: (8, 8)}, extra_config={"alpha_pattern": {"(.|.|.|.)*z": 3}}
    )
    start = time.monotonic()
    with pytest.raises(InvalidAdapter, match="too long to match"):
        hub.add(src)
    assert time.monotonic() - start < 8
    assert count_rows(hub) == 0


def test_many_spelled_out_patterns_stay_fast(hub, tmp_path):
    """kohya and lorahub write one pattern per module: 400 modules by 400 keys are compared
    as text, not run through a regex engine, so they cost nothing from the time budget."""
    mods = {f"unet.blocks.{i}.attn.to_q": (4, 4) for i in range(400)}
    alphas = {name: 1 + i % 7 for i, name in enumerate(mods)}  # bare dots, as kohya writes
    src = write_peft_adapter(tmp_path / "a", mods, r=2, extra_config={"alpha_pattern": alphas})
    start = time.monotonic()
    adapter = hub.load(hub.add(src).adapter.digest)
    assert time.monotonic() - start < 10
    assert {n: m.alpha for n, m in adapter.modules.items()} == alphas


def test_an_overlong_pattern_is_refused(hub, peft_save, tmp_path):
    src = variant(peft_save, tmp_path / "a", alpha_pattern={"x|" + "a" * 5000: 2})
    with pytest.raises(InvalidAdapter, match="over 4096 characters"):
        hub.add(src)


def test_pattern_value_agrees_with_peft(tmp_path):
    from peft.utils.other import get_pattern_key

    modules = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.10.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
        "q_proj",
        "encoder.block.0.layer.0.SelfAttention.q",
        "unet.down_blocks.0.attentions.0.proj_in",
    ]
    keys = [
        "q_proj", "self_attn.q_proj", "layers.1.mlp.down_proj",
        r"model\.layers\.0\.self_attn\.q_proj", "^model.layers.0.self_attn.q_proj",
        r"layers\.1\d\..*q_proj", ".*", "q", "proj", "0.self_attn.q_proj", "layers.0",
        r"down_blocks\.0\..*", "q_proj$", "(q|v)_proj", "x", "", "self_attn\\.q_proj",
    ]  # fmt: skip
    rng = random.Random(5)
    for _ in range(300):
        chosen = rng.sample(keys, rng.randint(1, 4))
        patterns = {k: i for i, k in enumerate(chosen)}
        for module in modules:
            key = get_pattern_key(list(patterns), module)
            want = patterns.get(key)
            assert pattern_value(patterns, module) == want, (patterns, module)


def test_targeting_agrees_with_peft():
    from peft.tuners.tuners_utils import check_target_module_exists

    modules = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1, 12) for p in ("q_proj", "v_proj")]
    modules += ["model.layers.0.mlp.down_proj", "lm_head", "model.h.3.attn.c_attn"]
    pools: dict[str, list[Any]] = {
        "target_modules": [
            ["q_proj"], ["q_proj", "v_proj"], ["self_attn.q_proj"], [], ["lm_head"],
            r".*\.q_proj", r"model\.layers\.\d+\.self_attn\.(q|v)_proj", "lm_head", ["c_attn"],
            ["model.layers.0.self_attn.q_proj"],
        ],
        "exclude_modules": [None, [], ["v_proj"], "model.layers.0.self_attn.q_proj", r".*\.1\..*"],
        "modules_to_save": [None, [], ["lm_head"], ["q_proj"], ["self_attn"], ["score"]],
        "layers_to_transform": [None, [], 0, 1, [0, 12], [3]],
        "layers_pattern": [None, "", [], "layers", ["h", "layers"], "zz"],
    }  # fmt: skip
    rng = random.Random(7)
    for _ in range(400):
        config = {k: rng.choice(v) for k, v in pools.items()}
        peft_cfg = SimpleNamespace(target_parameters=None, **config)
        for module in modules:
            want = bool(check_target_module_exists(peft_cfg, module))
            got = peft_config.Matcher().targeted(config, module, "linear")
            assert got == want, (config, module)


# --------------------------------------------------------------------------------------
# accepted == PEFT loads it


def test_task_types_are_peft_s():
    from peft.utils import TaskType

    assert {t.value for t in TaskType} == peft_config.TASK_TYPES


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"task_type": "NOT_A_TASK"}, "task_type 'NOT_A_TASK' is not one PEFT knows"),
        ({"peft_type": "lora"}, 'peft_type must be written "LORA"'),
        ({"bias": None}, "bias must be one of"),
        ({"bias": "some"}, "bias must be one of"),
        ({"lora_dropout": None}, "lora_dropout must be a number"),
        ({"lora_dropout": 1.5}, "lora_dropout must be a number"),
        ({"lora_alpha": "8"}, "lora_alpha must be a finite number"),
        ({"init_lora_weights": "orthogonal", "r": 3, "rank_pattern": {"q_proj": 4}}, "even"),
        ({"init_lora_weights": "bogus"}, "not an initialisation PEFT knows"),
        ({"rank_pattern": {"q_proj(": 4}}, "not a regular expression PEFT can use"),
        ({"init_lora_weights": "gaussian", "lora_bias": True}, "lora_bias needs init_lora"),
        ({"layers_pattern": "layers"}, "layers_pattern needs layers_to_transform"),
        ({"layers_to_transform": [0, 1], "layers_pattern": "zz"}, "does not select 4 module"),
        ({"target_modules": ["zzz"]}, "does not select 4 module"),
        ({"target_modules": []}, "does not select 4 module"),
        ({"modules_to_save": ["q_proj"]}, "does not select 2 module"),
        ({"trainable_token_indices": []}, "trainable tokens"),
        ({"eva_config": {"rho": 0.5}}, "eva_config.rho"),
        ({"layer_replication": "x"}, "layer replication"),
    ],
)
def test_configs_peft_cannot_load_are_refused(hub, peft_save, tmp_path, changes, message):
    src = variant(peft_save, tmp_path / "a", **changes)
    assert not peft_loads(src), "PEFT loads this config: the refusal has no ground"
    with pytest.raises(InvalidAdapter, match=message):
        hub.add(src)
    assert count_rows(hub) == 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"target_modules": ["q_proj"]}, "does not select 2 module"),
        ({"exclude_modules": ["v_proj"]}, "does not select 2 module"),
        ({"layers_to_transform": [0]}, "does not select 2 module"),
        ({"init_lora_weights": "pissa"}, "changes the base model's weights"),
        ({"init_lora_weights": "olora"}, "changes the base model's weights"),
        ({"init_lora_weights": "mica"}, "MiCA"),
        ({"velora_config": {}}, "VeLoRA"),
        ({"target_parameters": ["x"]}, "target_parameters"),
    ],
)
def test_configs_peft_loads_as_another_model_are_refused(
    hub, peft_save, tmp_path, changes, message
):
    """PEFT loads these, but ignores some weights or builds other layers or another base, so
    lorahub's merge would differ from what PEFT computes."""
    src = variant(peft_save, tmp_path / "a", **changes)
    assert peft_loads(src)
    with pytest.raises(InvalidAdapter, match=message):
        hub.add(src)


@pytest.mark.parametrize(
    "changes",
    [
        {"task_type": None},
        {"task_type": "SEQ_CLS"},
        {"peft_type": None},  # removed below: lorahub reads a missing peft_type as LoRA
        {"r": 4.0, "lora_dropout": 1},
        {"init_lora_weights": "Gaussian", "bias": "lora_only"},
        {"lora_bias": True, "use_rslora": True},
        {"init_lora_weights": "eva", "eva_config": {"rho": 2.0}},
        {"target_modules": r".*\.(q|v)_proj", "rank_pattern": {r"layers\.[01]\..*": 4}},
        {"target_modules": "all-linear", "alpha_pattern": {"v_proj": 2, "(.|.|.|.)*z": 3}},
        {"layers_to_transform": [0, 1], "layers_pattern": "layers", "rank_pattern": None},
        {"modules_to_save": ["score"], "exclude_modules": ["k_proj"]},
    ],
)
def test_accepted_configs_export_to_folders_peft_loads(hub, peft_save, tmp_path, changes):
    src = variant(peft_save, tmp_path / "a", **changes)
    if changes.get("peft_type", "LORA") is None:
        config = json.loads((src / "adapter_config.json").read_text())
        del config["peft_type"]
        (src / "adapter_config.json").write_text(json.dumps(config))
    info = hub.add(src).adapter
    out = hub.export(info.digest, tmp_path / "out")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert peft_loads(out)


def test_the_largest_finite_alpha_survives_storing_and_loading(hub, peft_save, tmp_path):
    # Stored as a whole number, 1e308 becomes a 309-digit integer; it must still load.
    src = variant(peft_save, tmp_path / "a", alpha_pattern={"q_proj": 1e308})
    info = hub.add(src).adapter
    adapter = hub.load(info.digest)
    assert adapter.modules["model.layers.0.self_attn.q_proj"].alpha == 1e308
    assert peft_loads(hub.export(info.digest, tmp_path / "out"))


def test_missing_r_and_alpha_mean_what_peft_assumes(hub, peft_save, tmp_path):
    """PEFT reads a missing lora_alpha as 8 and a missing r as 8: lorahub too, so an export
    scales each module in PEFT as lorahub's merge does, and rank-4 weights without r are
    refused (PEFT would build rank-8 layers for them)."""
    from peft import PeftModel

    no_alpha = variant(peft_save, tmp_path / "a")
    config = json.loads((no_alpha / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (no_alpha / "adapter_config.json").write_text(json.dumps(config))
    info = hub.add(no_alpha).adapter
    out = hub.export(info.digest, tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(tiny_llama(), str(out))
    adapter = hub.load(info.digest)
    for name, m in adapter.modules.items():
        assert model.base_model.model.get_submodule(name).scaling["default"] == m.scaling() == 2.0

    del config["r"]
    no_r = variant(peft_save, tmp_path / "b", text=json.dumps(config))
    assert not peft_loads(no_r)
    with pytest.raises(InvalidAdapter, match="config says r=8"):
        hub.add(no_r)


# --------------------------------------------------------------------------------------
# base models: safetensors headers


def _header_file(path: Path, header_text: str, body: bytes = b"") -> Path:
    raw = header_text.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return path


@pytest.mark.parametrize(
    "header",
    [
        '{"w": {"dtype": "F32", "shape": [' + BIG + '], "data_offsets": [0, 4]}}',
        '{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + BIG + "]}}",
        '{"__metadata__": {"n": ' + BIG + "}}",
        '{"w": {"dtype": "F32", "shape": [' + ", ".join(["18446744073709551615"] * 60) + "], "
        '"data_offsets": [0, 4]}}',
        '{"w": {"dtype": "F32", "shape": [18446744073709551616], "data_offsets": [0, 4]}}',
        '{"w\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
        '{"__metadata__": {"k": "\\udfff"}, "w": {"dtype": "F32", "shape": [1], '
        '"data_offsets": [0, 4]}}',
        '{"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}',
    ],
    ids=[
        "big-dim",
        "big-offset",
        "big-metadata",
        "dims-overflow",
        "dim-over-u64",
        "surrogate",
        "surrogate-meta",
        "list-dtype",
    ],
)
def test_hostile_base_headers_are_base_model_errors(hub, tmp_path, header):
    path = _header_file(tmp_path / "model.safetensors", header, b"\x00" * 4)
    with pytest.raises(BaseModelError, match="not a valid safetensors file"):
        open_base(path)
    with pytest.raises(BaseModelError):
        hub.add_base(path)
    res = cli_runner(tmp_path / "cli")("base", "add", path, code=1)
    assert "Traceback" not in res.output


def test_a_hub_base_with_a_huge_integer_in_its_header_is_a_base_model_error(hub_server):
    raw = ('{"w": {"dtype": "F32", "shape": [' + BIG + '], "data_offsets": [0, 4]}}').encode()
    hub_server.seed_repo(
        "org/hostile", {"model.safetensors": struct.pack("<Q", len(raw)) + raw + bytes(4)}
    )
    with pytest.raises(BaseModelError, match="invalid"):
        open_base("org/hostile")


def test_pulling_hostile_configs_is_refused_or_bounded(
    hub_server, hub, peft_save, tmp_path, monkeypatch
):
    """A repo anyone can write to: a 5,000-digit integer, a surrogate, a backtracking pattern,
    and a huge integer in the weights' header read before download."""
    from lorahub import remote

    weights = (peft_save / "adapter_model.safetensors").read_bytes()
    config = (peft_save / "adapter_config.json").read_text()
    bomb = json.loads(config) | {"alpha_pattern": {"(.|.|.|.)*z": 3}}
    hub_server.seed_repo(
        "eve/int",
        {
            "adapter_config.json": config.replace('"r": 4', f'"r": {BIG}').encode(),
            "adapter_model.safetensors": weights,
        },
    )
    hub_server.seed_repo(
        "eve/sur",
        {
            "adapter_config.json": config.replace('"none"', '"\\ud800"').encode(),
            "adapter_model.safetensors": weights,
        },
    )
    hub_server.seed_repo(
        "eve/bomb",
        {"adapter_config.json": json.dumps(bomb).encode(), "adapter_model.safetensors": weights},
    )
    with pytest.raises(InvalidAdapter, match="integer too long"):
        hub.pull("eve/int")
    with pytest.raises(InvalidAdapter, match="not valid Unicode"):
        hub.pull("eve/sur")
    start = time.monotonic()
    assert hub.pull("eve/bomb").config["alpha_pattern"] == {}  # matched nothing: spelled out
    assert time.monotonic() - start < 10

    (n,) = struct.unpack("<Q", weights[:8])
    header = weights[8 : 8 + n].decode().replace('"data_offsets":[', f'"data_offsets":[{BIG},', 1)
    assert BIG in header
    raw = header.encode()
    hub_server.seed_repo(
        "eve/head",
        {
            "adapter_config.json": config.encode(),
            "adapter_model.safetensors": struct.pack("<Q", len(raw)) + raw + weights[8 + n :],
        },
    )
    monkeypatch.setattr(remote.pull, "HEADER_CHECK_MIN_BYTES", 0)
    with pytest.raises(InvalidAdapter, match="eve/head"):
        hub.pull("eve/head")
    assert len(hub.list_adapters()) == 1


def test_valid_headers_still_open(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(2, 3)}, str(path))
    assert open_base(path).tensors["w"].shape == (2, 3)
