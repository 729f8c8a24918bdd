"""Adapter-vs-base validation against tiny transformers models and PEFT-saved adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from factories import peft_adapter, read_adapter, tensor_table, tiny_gpt2, tiny_llama

from lorahub.adapter import LoraAdapter
from lorahub.base import TensorInfo, open_base
from lorahub.compat import COMPATIBLE, EXACT, INCOMPATIBLE, CompatReport, check, require
from lorahub.errors import IncompatibleAdapter

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_adapter(model, tmp: Path, **lora_kw) -> LoraAdapter:
    """Save a PEFT LoRA of ``model`` as PEFT initialises one and read it back as lorahub does."""
    peft_adapter(model, tmp, init_lora_weights=True, **lora_kw)
    return read_adapter(tmp)


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory) -> LoraAdapter:
    return _peft_adapter(
        tiny_llama(), tmp_path_factory.mktemp("a"), r=4, lora_alpha=8, target_modules=LLAMA_TARGETS
    )


@pytest.fixture(scope="module")
def llama_table() -> dict[str, TensorInfo]:
    return tensor_table(tiny_llama().state_dict())


def test_llama_adapter_fits_its_base(llama_adapter, llama_table):
    report = check(llama_adapter, llama_table)
    assert report.status == COMPATIBLE
    assert report.matched == len(llama_adapter.modules) == 14
    assert report.problems == () and report.missing == 0 and report.mismatched == 0
    assert report.prefix_note is None
    assert dict(report.mapping) == {m: f"{m}.weight" for m in llama_adapter.modules}
    assert "compatible: 14 of 14 modules match" in report.summary
    require(report, "adapter 'x'")  # does not raise


def test_base_read_from_disk(llama_adapter, tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    report = check(llama_adapter, open_base(tmp_path / "base").tensors)
    assert report.status == COMPATIBLE and report.matched == 14


def test_exact_needs_both_hashes_equal(llama_adapter, llama_table):
    h = "xxh128:" + "ab" * 16
    assert check(llama_adapter, llama_table, content_hash=h, recorded_hash=h).status == EXACT
    assert (
        check(llama_adapter, llama_table, content_hash=h, recorded_hash=h.upper()[7:]).status
        == EXACT
    )
    other = "xxh128:" + "cd" * 16
    assert (
        check(llama_adapter, llama_table, content_hash=h, recorded_hash=other).status == COMPATIBLE
    )
    assert check(llama_adapter, llama_table, content_hash=h).status == COMPATIBLE
    assert check(llama_adapter, llama_table, recorded_hash=h).status == COMPATIBLE


def test_other_hidden_size_lists_every_module(llama_adapter):
    wide = tensor_table(tiny_llama(hidden_size=48).state_dict())
    report = check(llama_adapter, wide)
    assert report.status == INCOMPATIBLE
    assert report.matched == 0
    assert {p.module for p in report.problems} == set(llama_adapter.modules)
    assert all(p.reason == "shape" for p in report.problems)
    by = {p.module: p for p in report.problems}
    q = by["model.layers.0.self_attn.q_proj"]
    assert q.base_tensor == "model.layers.0.self_attn.q_proj.weight"
    assert (q.expected, q.found) == ((32, 32), (48, 48))
    k = by["model.layers.1.self_attn.k_proj"]  # 2 kv heads of dim 8 (32/4) vs 12 (48/4)
    assert (k.expected, k.found) == ((16, 32), (24, 48))
    down = by["model.layers.1.mlp.down_proj"]
    assert (down.expected, down.found) == ((32, 64), (48, 64))
    text = report.summary
    for m in llama_adapter.modules:
        assert m in text
    assert "expects [32, 32], base has [48, 48]" in text
    with pytest.raises(IncompatibleAdapter) as e:
        require(report, "adapter 'chat:v1'")
    assert e.value.report is report
    assert "adapter 'chat:v1'" in str(e.value) and "model.layers.1.mlp.down_proj" in str(e.value)


def test_missing_layers_are_reported_with_found_none(llama_adapter):
    report = check(llama_adapter, tensor_table(tiny_llama(layers=1).state_dict()))
    assert report.status == INCOMPATIBLE
    assert report.matched == 7 and report.missing == 7 and report.mismatched == 0
    for p in report.problems:
        assert p.module.startswith("model.layers.1.")
        assert p.found is None and p.reason == "missing"
        assert p.base_tensor == p.module + ".weight"
    assert "not in the base" in report.summary


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    model = tiny_gpt2()
    table = tensor_table(model.state_dict())
    adapter = _peft_adapter(
        model,
        tmp_path,
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
    )
    assert adapter.fan_in_fan_out
    report = check(adapter, table)
    assert report.status == COMPATIBLE, report.summary
    assert (
        report.matched == len(adapter.modules) == 8
    )  # 2 x (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)
    # Conv1D stores [in, out]: c_attn is [32, 96], not [96, 32].
    assert table["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    # The same factors read as a plain Linear would not fit.
    adapter.config["fan_in_fan_out"] = False
    assert check(adapter, table).status == INCOMPATIBLE


def test_embedding_modules_to_save_and_dora(tmp_path):
    model = tiny_llama()
    table = tensor_table(model.state_dict())
    adapter = _peft_adapter(
        model,
        tmp_path,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
        use_dora=True,
    )
    assert adapter.modules["model.embed_tokens"].kind == "embedding"
    assert adapter.modules["model.layers.0.self_attn.q_proj"].magnitude is not None
    assert "lm_head.weight" in adapter.full
    report = check(adapter, table)
    assert report.status == COMPATIBLE, report.summary
    assert report.matched == 5
    # PEFT also saves the embedding table it adapts (save_embedding_layers="auto").
    assert dict(report.full_mapping) == {
        "lm_head.weight": "lm_head.weight",
        "model.embed_tokens.weight": "model.embed_tokens.weight",
    }

    bigger_vocab = tensor_table(tiny_llama(vocab=160).state_dict())
    report = check(adapter, bigger_vocab)
    assert report.status == INCOMPATIBLE
    by = {p.module: p for p in report.problems}
    assert (by["model.embed_tokens"].expected, by["model.embed_tokens"].found) == (
        (128, 32),
        (160, 32),
    )
    assert (by["lm_head.weight"].expected, by["lm_head.weight"].found) == ((128, 32), (160, 32))
    saved = by["model.embed_tokens.weight"]
    assert (saved.expected, saved.found, saved.reason) == ((128, 32), (160, 32), "shape")
    assert set(by) == {"model.embed_tokens", "lm_head.weight", "model.embed_tokens.weight"}


def test_saved_embedding_base_layer_with_other_vocab(llama_adapter, llama_table):
    adapter = LoraAdapter(
        config=dict(llama_adapter.config),
        modules=dict(llama_adapter.modules),
        full={"model.embed_tokens.weight": torch.zeros(130, 32)},
    )
    report = check(adapter, llama_table)
    assert report.status == INCOMPATIBLE
    (p,) = report.problems
    assert (p.module, p.base_tensor, p.expected, p.found, p.reason) == (
        "model.embed_tokens.weight",
        "model.embed_tokens.weight",
        (130, 32),
        (128, 32),
        "shape",
    )


def test_dora_magnitude_of_wrong_length(llama_adapter, llama_table):
    modules = dict(llama_adapter.modules)
    name = "model.layers.0.self_attn.q_proj"
    m = modules[name]
    from dataclasses import replace

    modules[name] = replace(m, magnitude=torch.ones(31))
    adapter = LoraAdapter(config=dict(llama_adapter.config), modules=modules)
    report = check(adapter, llama_table)
    (p,) = report.problems
    assert (p.module, p.reason, p.expected, p.found) == (name, "magnitude", (31,), (32,))
    assert "DoRA magnitude" in report.summary


def test_lora_bias_needs_a_base_bias(tmp_path):
    no_bias = tiny_llama()
    adapter = _peft_adapter(
        no_bias,
        tmp_path / "a",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        lora_bias=True,
    )
    assert all(m.bias is not None for m in adapter.modules.values())
    report = check(adapter, tensor_table(tiny_llama().state_dict()))
    assert report.status == INCOMPATIBLE
    assert {p.reason for p in report.problems} == {"bias"}
    assert {p.base_tensor for p in report.problems} == {f"{m}.bias" for m in adapter.modules}
    assert "needs a base bias" in report.summary
    with_bias = tensor_table(tiny_llama(attention_bias=True).state_dict())
    assert check(adapter, with_bias).status == COMPATIBLE


def test_rank_and_alpha_patterns(tmp_path):
    adapter = _peft_adapter(
        tiny_llama(),
        tmp_path,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"q_proj": 8},
        alpha_pattern={"v_proj": 16},
    )
    assert adapter.modules["model.layers.1.self_attn.q_proj"].rank == 8
    assert adapter.modules["model.layers.1.self_attn.v_proj"].alpha == 16
    report = check(adapter, tensor_table(tiny_llama().state_dict()))
    assert report.status == COMPATIBLE and report.matched == 6
    bad = check(adapter, tensor_table(tiny_llama(hidden_size=48).state_dict()))
    q = next(p for p in bad.problems if p.module == "model.layers.1.self_attn.q_proj")
    assert (q.expected, q.found) == ((32, 32), (48, 48))


def test_prefix_stripped_for_a_bare_model(llama_adapter):
    bare = tensor_table(tiny_llama(bare=True).state_dict())
    assert "layers.0.self_attn.q_proj.weight" in bare
    report = check(llama_adapter, bare)
    assert report.status == COMPATIBLE, report.summary
    assert report.matched == 14
    assert report.prefix_note and "'model.'" in report.prefix_note
    assert report.mapping["model.layers.0.self_attn.q_proj"] == "layers.0.self_attn.q_proj.weight"
    assert "note:" in report.summary


def test_prefix_added_for_an_adapter_made_on_a_bare_model(tmp_path, llama_table):
    adapter = _peft_adapter(
        tiny_llama(bare=True), tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
    )
    assert "layers.0.self_attn.q_proj" in adapter.modules
    report = check(adapter, llama_table)
    assert report.status == COMPATIBLE
    assert report.prefix_note == "adapter names lack the base's 'model.' prefix; added it"
    assert report.mapping["layers.1.self_attn.v_proj"] == "model.layers.1.self_attn.v_proj.weight"


def test_prefix_is_chosen_per_adapter_not_per_module(llama_adapter):
    """A base with both layouts for different layers: one rewrite for all, the rest missing."""
    table = tensor_table(tiny_llama().state_dict())
    mixed = {}
    for name, info in table.items():
        key = name[len("model.") :] if name.startswith("model.layers.0.") else name
        mixed[key] = TensorInfo(key, info.dtype, info.shape)
    report = check(llama_adapter, mixed)
    assert report.prefix_note is None  # identity maps layer 1 (7) vs stripping maps layer 0 (7)
    assert report.matched == 7 and report.missing == 7


def test_leftover_peft_prefix(llama_adapter, llama_table):
    from dataclasses import replace

    modules = {
        f"base_model.model.{n}": replace(m, name=f"base_model.model.{n}")
        for n, m in llama_adapter.modules.items()
    }
    adapter = LoraAdapter(config=dict(llama_adapter.config), modules=modules)
    report = check(adapter, llama_table)
    assert report.status == COMPATIBLE
    assert "'base_model.model.'" in report.prefix_note


def test_zero_matches_is_incompatible(llama_table, tmp_path):
    gpt_adapter = _peft_adapter(
        tiny_gpt2(), tmp_path, r=4, target_modules=["c_attn"], fan_in_fan_out=True
    )
    report = check(gpt_adapter, llama_table)
    assert report.status == INCOMPATIBLE and report.matched == 0
    assert report.missing == len(gpt_adapter.modules)
    assert check(gpt_adapter, {}).status == INCOMPATIBLE


def test_quantized_base_dtype_is_a_problem(llama_adapter, llama_table):
    table = dict(llama_table)
    name = "model.layers.0.self_attn.q_proj.weight"
    table[name] = TensorInfo(name, "I8", (32, 32))
    report = check(llama_adapter, table)
    (p,) = report.problems
    assert p.reason == "dtype" and "I8" in report.summary


def test_report_is_a_frozen_value(llama_adapter, llama_table):
    report = check(llama_adapter, llama_table)
    assert isinstance(report, CompatReport)
    with pytest.raises(AttributeError):
        report.status = EXACT  # type: ignore[misc]
    with pytest.raises(TypeError):
        report.mapping["x"] = "y"  # type: ignore[index]
