"""kohya and diffusers LoRA files -> LoraAdapter, checked against the plain formula in
float64 and against PEFT loading the converted adapter."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from factories import tensor_table, tiny_clip
from safetensors.torch import save_file

from lorahub.base import TensorInfo, open_base
from lorahub.compat import COMPATIBLE, check
from lorahub.errors import InvalidAdapter
from lorahub.formats.kohya import is_diffusers, is_kohya, read_diffusers_lora, read_kohya

# module (dotted, as in the base) -> (rank, alpha written to the file; None = no .alpha key)
TE_MODULES = {
    "encoder.layers.0.self_attn.q_proj": (4, 2.0),
    "encoder.layers.0.self_attn.v_proj": (4, 2.0),
    "encoder.layers.0.mlp.fc1": (4, None),  # missing alpha -> alpha = rank
    "encoder.layers.1.self_attn.q_proj": (4, 0.0),  # alpha 0 -> alpha = rank
    "encoder.layers.1.self_attn.v_proj": (4, 16.0),
    "encoder.layers.1.mlp.fc1": (8, 2.0),
}


@pytest.fixture(scope="module")
def clip_state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny_clip().state_dict().items()}


def _kohya_keys(modules, state, prefix="lora_te", kohya_root="text_model_", seed=0):
    """kohya tensors for ``modules``, written the way sd-scripts names them."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, (r, alpha) in modules.items():
        w = state[f"{name}.weight"]
        key = f"{prefix}_{kohya_root}{name.replace('.', '_')}"
        out[f"{key}.lora_down.weight"] = torch.randn(r, w.shape[1], generator=g)
        out[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], r, generator=g)
        if alpha is not None:
            out[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    return out


def _expected_delta(tensors, key, r, alpha):
    down = tensors[f"{key}.lora_down.weight"].double()
    up = tensors[f"{key}.lora_up.weight"].double()
    scale = (alpha if alpha else r) / r
    return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * scale


@pytest.fixture
def te_file(tmp_path, clip_state) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = _kohya_keys(TE_MODULES, clip_state)
    g = torch.Generator().manual_seed(5)
    # A UNet module the text-encoder base cannot map.
    tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] = torch.randn(
        4, 8, generator=g
    )
    tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"] = torch.randn(
        8, 4, generator=g
    )
    tensors["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"] = torch.tensor(4.0)
    path = tmp_path / "te.safetensors"
    save_file(
        tensors,
        str(path),
        metadata={
            "ss_network_dim": "4",
            "ss_network_alpha": "2",
            "ss_output_name": "t",
            "junk": "x",
        },
    )
    return path, tensors


def test_kohya_maps_back_to_dotted_names_with_exact_deltas(te_file, clip_state):
    path, tensors = te_file
    adapter, unmapped = read_kohya(path, tensor_table(clip_state))
    assert set(adapter.modules) == set(TE_MODULES)
    assert unmapped == sorted(k for k in tensors if k.startswith("lora_unet_"))
    for name, (r, alpha) in TE_MODULES.items():
        key = "lora_te_text_model_" + name.replace(".", "_")
        got = adapter.delta(name, dtype=torch.float64)
        want = _expected_delta(tensors, key, r, alpha)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert adapter.modules[name].kind == "linear"
    c = adapter.config
    assert c["peft_type"] == "LORA" and c["r"] == 4 and c["lora_alpha"] == 2
    assert c["rank_pattern"] == {"encoder.layers.1.mlp.fc1": 8}
    assert c["alpha_pattern"] == {
        "encoder.layers.0.mlp.fc1": 4,
        "encoder.layers.1.self_attn.q_proj": 4,
        "encoder.layers.1.self_attn.v_proj": 16,
    }
    assert c["target_modules"] == ["fc1", "q_proj", "v_proj"]
    assert adapter.metadata == {
        "ss_network_dim": "4",
        "ss_network_alpha": "2",
        "ss_output_name": "t",
    }
    assert check(adapter, tensor_table(clip_state)).status == COMPATIBLE


def test_converted_adapter_loads_in_peft_with_the_same_merge(te_file, clip_state, tmp_path):
    """The PEFT config we build (r, rank/alpha patterns, leaf targets) means the same to PEFT."""
    from peft import PeftModel

    path, tensors = te_file
    adapter, _ = read_kohya(path, tensor_table(clip_state))
    out = tmp_path / "peft"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps(adapter.config))
    save_file(adapter.state_dict(), str(out / "adapter_model.safetensors"))
    merged = PeftModel.from_pretrained(tiny_clip(), out).merge_and_unload().state_dict()
    for name, (r, alpha) in TE_MODULES.items():
        key = "lora_te_text_model_" + name.replace(".", "_")
        want = clip_state[f"{name}.weight"].double() + _expected_delta(tensors, key, r, alpha)
        torch.testing.assert_close(merged[f"{name}.weight"].double(), want, rtol=1e-5, atol=1e-5)


def test_kohya_against_a_table_that_keeps_text_model(te_file, clip_state):
    path, _ = te_file
    # How SD text encoders are stored on the Hub:
    table = tensor_table(clip_state, prefix="text_model.")
    adapter, _ = read_kohya(path, table)
    assert set(adapter.modules) == {f"text_model.{m}" for m in TE_MODULES}


def test_kohya_conv_and_pipeline_table(tmp_path, clip_state):
    unet = {
        "conv_in.weight": torch.zeros(32, 4, 3, 3),
        "down_blocks.0.attentions.0.proj_in.weight": torch.zeros(32, 32, 1, 1),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": torch.zeros(32, 32),
    }
    g = torch.Generator().manual_seed(3)
    tensors = {
        "lora_unet_conv_in.lora_down.weight": torch.randn(2, 4, 3, 3, generator=g),
        "lora_unet_conv_in.lora_up.weight": torch.randn(32, 2, 1, 1, generator=g),
        "lora_unet_conv_in.alpha": torch.tensor(1.0),
    }
    proj = "lora_unet_down_blocks_0_attentions_0_proj_in"
    tensors[f"{proj}.lora_down.weight"] = torch.randn(2, 32, 1, 1, generator=g)
    tensors[f"{proj}.lora_up.weight"] = torch.randn(32, 2, 1, 1, generator=g)
    to_q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors[f"{to_q}.lora_down.weight"] = torch.randn(2, 32, generator=g)
    tensors[f"{to_q}.lora_up.weight"] = torch.randn(32, 2, generator=g)
    tensors.update(_kohya_keys({"encoder.layers.0.self_attn.q_proj": (2, 1.0)}, clip_state))
    path = tmp_path / "sd.safetensors"
    save_file(tensors, str(path))

    adapter, unmapped = read_kohya(path, tensor_table(unet))
    assert adapter.modules["conv_in"].kind == "conv2d"
    assert adapter.modules["down_blocks.0.attentions.0.proj_in"].kind == "conv2d"
    down = tensors["lora_unet_conv_in.lora_down.weight"].double()
    up = tensors["lora_unet_conv_in.lora_up.weight"].double()[:, :, 0, 0]
    want = torch.einsum("or,rihw->oihw", up, down) * (1.0 / 2)
    torch.testing.assert_close(adapter.delta("conv_in", dtype=torch.float64), want)
    assert unmapped and all(k.startswith("lora_te_") for k in unmapped)
    assert check(adapter, tensor_table(unet)).status == COMPATIBLE

    # A whole pipeline in one table: component folders prefix the names.
    pipeline = {
        **tensor_table(unet, "unet."),
        **tensor_table(clip_state, "text_encoder.text_model."),
    }
    adapter, unmapped = read_kohya(path, pipeline)
    assert unmapped == []
    assert "unet.conv_in" in adapter.modules
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in adapter.modules


def test_ambiguous_underscores_stay_unmapped(tmp_path):
    table = {
        "a.b_c.weight": TensorInfo("a.b_c.weight", "F32", (4, 4)),
        "a_b.c.weight": TensorInfo("a_b.c.weight", "F32", (4, 4)),
        "x.y.weight": TensorInfo("x.y.weight", "F32", (4, 4)),
    }
    tensors = {}
    for flat in ("a_b_c", "x_y"):
        tensors[f"lora_unet_{flat}.lora_down.weight"] = torch.ones(1, 4)
        tensors[f"lora_unet_{flat}.lora_up.weight"] = torch.ones(4, 1)
    tensors["lora_unet_x_y.alpha"] = torch.tensor(3)  # an integer alpha is accepted
    save_file(tensors, str(tmp_path / "l.safetensors"))
    adapter, unmapped = read_kohya(tmp_path / "l.safetensors", table)
    assert set(adapter.modules) == {"x.y"}
    assert adapter.modules["x.y"].alpha == 3.0 and adapter.config["lora_alpha"] == 3
    assert unmapped == ["lora_unet_a_b_c.lora_down.weight", "lora_unet_a_b_c.lora_up.weight"]


def test_nothing_maps_is_refused(te_file):
    path, _ = te_file
    table = {"foo.weight": TensorInfo("foo.weight", "F32", (2, 2))}
    with pytest.raises(InvalidAdapter, match="no kohya LoRA module maps"):
        read_kohya(path, table)


def test_sdxl_te1_te2_need_one_text_encoder(tmp_path, clip_state):
    mods = {"encoder.layers.0.self_attn.q_proj": (2, 1.0)}
    tensors = {
        **_kohya_keys(mods, clip_state, prefix="lora_te1"),
        **_kohya_keys(mods, clip_state, prefix="lora_te2", seed=1),
    }
    save_file(tensors, str(tmp_path / "xl.safetensors"))
    with pytest.raises(InvalidAdapter, match="both map"):
        read_kohya(tmp_path / "xl.safetensors", tensor_table(clip_state))
    adapter, unmapped = read_kohya(
        tmp_path / "xl.safetensors", tensor_table(clip_state), prefixes=["lora_te2"]
    )
    assert list(adapter.modules) == ["encoder.layers.0.self_attn.q_proj"]
    assert all(k.startswith("lora_te1_") for k in unmapped) and len(unmapped) == 3
    key = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    torch.testing.assert_close(
        adapter.delta("encoder.layers.0.self_attn.q_proj", dtype=torch.float64),
        _expected_delta(tensors, key, 2, 1.0),
    )


def test_unsupported_and_incomplete_networks(tmp_path, clip_state):
    base = tensor_table(clip_state)
    save_file(
        {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.hada_w1_a": torch.ones(2, 2)},
        str(tmp_path / "loha.safetensors"),
    )
    with pytest.raises(InvalidAdapter, match="LoHa"):
        read_kohya(tmp_path / "loha.safetensors", base)
    tensors = _kohya_keys({"encoder.layers.0.self_attn.q_proj": (2, 1.0)}, clip_state)
    del tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"]
    save_file(tensors, str(tmp_path / "half.safetensors"))
    with pytest.raises(InvalidAdapter, match="lora_up"):
        read_kohya(tmp_path / "half.safetensors", base)


def test_broken_files_are_invalid_adapters(te_file, tmp_path, clip_state):
    path, _ = te_file
    raw = path.read_bytes()
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(raw[:-100])
    with pytest.raises(InvalidAdapter, match="corrupt or truncated"):
        read_kohya(truncated, tensor_table(clip_state))
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"] = [0, 10**9]
    lying = tmp_path / "lie.safetensors"
    h = json.dumps(header).encode()
    lying.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n :])
    with pytest.raises(InvalidAdapter):
        read_kohya(lying, tensor_table(clip_state))
    with pytest.raises(InvalidAdapter, match="does not exist"):
        read_kohya(tmp_path / "nope.safetensors", tensor_table(clip_state))


def test_format_sniffing(te_file):
    _, tensors = te_file
    assert is_kohya(tensors)
    assert not is_kohya(["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])
    assert not is_diffusers(tensors, {})
    assert is_diffusers(["unet.down_blocks.0.attentions.0.proj_in.lora.down.weight"], None)
    assert is_diffusers(["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"], {})
    assert is_diffusers(["x.lora_A.weight"], {"lora_adapter_metadata": "{}"})
    assert not is_diffusers(["base_model.model.model.layers.0.q_proj.lora_A.weight"], {})


# --------------------------------------------------------------------------------------
# diffusers


def test_diffusers_pipeline_file_with_metadata(tmp_path, clip_state):
    g = torch.Generator().manual_seed(7)
    te = "text_encoder.encoder.layers.0.self_attn.q_proj"
    tensors = {
        f"{te}.lora_A.weight": torch.randn(4, 32, generator=g),
        f"{te}.lora_B.weight": torch.randn(32, 4, generator=g),
        "unet.conv_in.lora_A.weight": torch.randn(4, 4, 3, 3, generator=g),
        "unet.conv_in.lora_B.weight": torch.randn(32, 4, 1, 1, generator=g),
    }
    meta = {
        "text_encoder.r": 4,
        "text_encoder.lora_alpha": 8,
        "text_encoder.target_modules": ["q_proj"],
        "unet.r": 4,
        "unet.lora_alpha": 4,
        "unet.target_modules": ["conv_in"],
    }
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(
        tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)}
    )
    assert is_diffusers(tensors, {"lora_adapter_metadata": "{}"})

    adapter = read_diffusers_lora(path, tensor_table(clip_state))
    name = "encoder.layers.0.self_attn.q_proj"
    assert list(adapter.modules) == [name]
    assert adapter.config["lora_alpha"] == 8 and adapter.config["target_modules"] == ["q_proj"]
    want = tensors[f"{te}.lora_B.weight"].double() @ tensors[f"{te}.lora_A.weight"].double() * 2
    torch.testing.assert_close(adapter.delta(name, dtype=torch.float64), want)
    assert check(adapter, tensor_table(clip_state)).status == COMPATIBLE

    unet = read_diffusers_lora(path, None, component="unet")
    assert unet.modules["conv_in"].kind == "conv2d" and unet.alpha == 4
    both = read_diffusers_lora(path, None)
    assert set(both.modules) == {te, "unet.conv_in"}
    with pytest.raises(InvalidAdapter, match="no 'transformer' LoRA"):
        read_diffusers_lora(path, None, component="transformer")


def test_diffusers_old_style_keys_without_metadata(tmp_path):
    g = torch.Generator().manual_seed(8)
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    tensors = {
        f"{q}.lora.down.weight": torch.randn(4, 32, generator=g),
        f"{q}.lora.up.weight": torch.randn(32, 4, generator=g),
    }
    path = tmp_path / "old.safetensors"
    save_file(tensors, str(path))
    table = {
        q[5:] + ".weight": TensorInfo(q[5:] + ".weight", "F32", (32, 32)),
    }
    adapter = read_diffusers_lora(path, table)
    name = q[len("unet.") :]
    assert adapter.config["r"] == 4 and adapter.config["lora_alpha"] == 4
    want = tensors[f"{q}.lora.up.weight"].double() @ tensors[f"{q}.lora.down.weight"].double()
    torch.testing.assert_close(adapter.delta(name, dtype=torch.float64), want)


def test_diffusers_model_level_save_with_bare_metadata(tmp_path):
    g = torch.Generator().manual_seed(9)
    m = "transformer_blocks.0.attn.to_q"
    tensors = {
        f"{m}.lora_A.weight": torch.randn(2, 16, generator=g),
        f"{m}.lora_B.weight": torch.randn(16, 2, generator=g),
    }
    cfg = {"r": 2, "lora_alpha": 1, "target_modules": ["to_q"], "peft_type": "LORA"}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(cfg)})
    adapter = read_diffusers_lora(path, None)
    assert adapter.modules[m].alpha == 1
    want = tensors[f"{m}.lora_B.weight"].double() @ tensors[f"{m}.lora_A.weight"].double() / 2
    torch.testing.assert_close(adapter.delta(m, dtype=torch.float64), want)


def test_diffusers_against_a_real_base_dir(tmp_path, clip_state):
    d = tmp_path / "te"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in clip_state.items()}, str(d / "model.safetensors"))
    g = torch.Generator().manual_seed(10)
    te = "text_encoder.encoder.layers.1.mlp.fc1"
    tensors = {
        f"{te}.lora_linear_layer.down.weight": torch.randn(4, 32, generator=g),
        f"{te}.lora_linear_layer.up.weight": torch.randn(64, 4, generator=g),
        f"{te}.alpha": torch.tensor(2.0),
        "unet.conv_in.lora_A.weight": torch.randn(4, 4, 3, 3, generator=g),
        "unet.conv_in.lora_B.weight": torch.randn(32, 4, 1, 1, generator=g),
    }
    save_file(tensors, str(tmp_path / "l.safetensors"))
    adapter = read_diffusers_lora(tmp_path / "l.safetensors", open_base(d).tensors)
    assert list(adapter.modules) == ["encoder.layers.1.mlp.fc1"]
    assert adapter.modules["encoder.layers.1.mlp.fc1"].alpha == 2.0
    with pytest.raises(InvalidAdapter, match="none of its components"):
        read_diffusers_lora(
            tmp_path / "l.safetensors", {"zz.weight": TensorInfo("zz.weight", "F32", (1, 1))}
        )


def test_kohya_import_exported_and_added_again_keeps_its_digest(hub, te_file, clip_state, tmp_path):
    """Header metadata (ss_*) is kept with the import but is not identity: the exported PEFT
    folder (whose weights file cannot carry it) comes back as the same adapter."""
    path, _ = te_file
    base = tmp_path / "clip"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in clip_state.items()}, str(base / "model.safetensors"))
    first = hub.add(path, name="style", base=base).adapter
    assert first.origin["metadata"]["ss_network_dim"] == "4"
    out = hub.export("style", tmp_path / "out")
    again = hub.add(out, base=base).adapter
    assert again.digest == first.digest
