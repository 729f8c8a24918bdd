"""The streaming merge, checked against PEFT's own merge and the float64 formula.

Every reference here is independent of lorahub.merge: PEFT's ``merge_and_unload`` (what users
compare with), PEFT's unmerged forward pass, or ``W + sum w_i s_i B_i A_i`` in float64.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections import namedtuple
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from factories import load_model, random_peft_adapter, read_adapter, tiny_gpt2, tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file

from lorahub.adapter import LoraAdapter
from lorahub.base import open_base
from lorahub.errors import IncompatibleAdapter, MergeError
from lorahub.merge import iter_merged, merge_to_dir, parse_size, plan_merge, resolve_device

pytest.importorskip("peft")
pytest.importorskip("transformers")

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_ALL = ["c_attn", "c_proj", "c_fc"]


# ---------------------------------------------------------------------------------------------
# Fixtures: tiny bases on disk, PEFT adapters, PEFT references


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    out = {
        "llama-bf16": tiny_llama(seed=0, dtype=torch.bfloat16),
        "llama-f32": tiny_llama(seed=0, dtype=torch.float32),
        "gpt2-bf16": tiny_gpt2(seed=0).to(torch.bfloat16),
    }
    paths = {}
    for name, model in out.items():
        model.generation_config.bos_token_id = model.generation_config.eos_token_id = 0
        model.config.bos_token_id = model.config.eos_token_id = 0
        model.save_pretrained(root / name)
        paths[name] = root / name
    (paths["llama-bf16"] / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (paths["llama-bf16"] / "tokenizer_config.json").write_text("{}")
    return paths


def peft_model(base: Path, adapters: Sequence[Path], weights: Sequence[float] | None = None):
    """A PeftModel with all the adapters active, each scaled by its weight."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    names = [f"a{i}" for i in range(len(adapters))]
    pm = PeftModel.from_pretrained(load_model(base), adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:], strict=True):
        pm.load_adapter(path, adapter_name=name)
    pm.base_model.set_adapter(names)
    for module in pm.modules():
        if isinstance(module, LoraLayer):
            for name, w in zip(names, weights or [1.0] * len(names), strict=True):
                module.set_scale(name, w)
    return pm.eval()


def peft_merged(base: Path, adapters: Sequence[Path], weights=None) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload: adapters merged one after another, in order."""
    return peft_model(base, adapters, weights).merge_and_unload().state_dict()


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    _, exp = torch.frexp(x.float())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), exp.double() - 8).clamp_min(2**-133)


def assert_within_ulp(ours: torch.Tensor, ref: torch.Tensor, name: str, ulps: float = 1.0) -> None:
    """Within ``ulps`` bf16 ulps of the reference (rounded to bf16), elementwise."""
    assert ours.shape == ref.shape, name
    diff = (ours.double() - ref.double()).abs()
    over = diff > ulps * bf16_ulp(ref.to(torch.bfloat16))
    assert not over.any(), f"{name}: {int(over.sum())} values off by more than {ulps} bf16 ulp"


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def check_against_peft(
    base: Path, out: Path, ref: dict[str, torch.Tensor], ulps: dict[str, float] | None = None
) -> set[str]:
    """Every output tensor: within 1 ulp (or ``ulps[name]``) of PEFT's if PEFT changed it,
    else the base's bytes. Returns the names PEFT changed."""
    base_sd = load_file(base / "model.safetensors")
    ours = load_file(out / "model.safetensors")
    assert set(ours) == set(base_sd)
    changed = set()
    for name, t in ours.items():
        assert t.dtype == base_sd[name].dtype, name
        if torch.equal(ref[name], base_sd[name]):
            assert raw(t) == raw(base_sd[name]), f"{name} should be the base's bytes"
        else:
            changed.add(name)
            assert_within_ulp(t, ref[name], name, (ulps or {}).get(name, 1.0))
    return changed


def float64_merge(base: Path, adapters: Sequence[Path], weights: Sequence[float]) -> dict:
    """The formula in float64, straight from the PEFT files: full tensors replace, then each
    adapter in turn adds ``w s B A`` (transposed for embeddings and fan_in_fan_out), DoRA
    rescales each output feature by ``m / ||W0 + w s B A||`` with ``W0`` the weight before any
    adapter, and a LoRA bias adds ``w s b``."""
    tensors = {k: v.double() for k, v in load_file(base / "model.safetensors").items()}
    for path in adapters:
        for key, t in load_file(path / "adapter_model.safetensors").items():
            name = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
            if name in tensors:
                tensors[name] = t.double()
    w0 = dict(tensors)
    for path, w in zip(adapters, weights, strict=True):
        cfg = json.loads((path / "adapter_config.json").read_text())
        sd = {k.removeprefix("base_model.model."): v.double() for k, v in load_file(
            path / "adapter_model.safetensors").items()}  # fmt: skip
        for key in sd:
            for a_suffix, b_suffix in (("lora_A.weight", "lora_B.weight"),
                                       ("lora_embedding_A", "lora_embedding_B")):  # fmt: skip
                if not key.endswith("." + a_suffix):
                    continue
                module = key[: -len(a_suffix) - 1]
                s = w * cfg["lora_alpha"] / cfg["r"]
                delta = s * sd[f"{module}.{b_suffix}"] @ sd[key]
                columns = a_suffix.startswith("lora_embedding") or cfg["fan_in_fan_out"]
                delta = delta.T if columns else delta
                name = module + ".weight"
                mag = sd.get(f"{module}.lora_magnitude_vector")
                if mag is None:
                    tensors[name] = tensors[name] + delta
                elif columns:
                    norm = (w0[name] + delta).norm(dim=0)
                    tensors[name] = (mag / norm)[None, :] * (tensors[name] + delta)
                else:
                    norm = (w0[name] + delta).norm(dim=1)
                    tensors[name] = (mag / norm)[:, None] * (tensors[name] + delta)
                if f"{module}.lora_B.bias" in sd:
                    tensors[module + ".bias"] = (
                        tensors[module + ".bias"] + s * sd[f"{module}.lora_B.bias"]
                    )
    return tensors


def merge(base: Path, adapters: Sequence[Path], out: Path, weights=None, **kwargs):
    return merge_to_dir(
        open_base(base), [read_adapter(a) for a in adapters], weights, out=out, **kwargs
    )


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


# ---------------------------------------------------------------------------------------------
# Numbers: equal to PEFT


def test_llama_all_projections_match_peft(bases, tmp_path):
    base = bases["llama-bf16"]
    ad = random_peft_adapter(
        base,
        tmp_path / "ad",
        r=8,
        lora_alpha=12,
        use_rslora=True,
        target_modules=LLAMA_ALL,
        rank_pattern={"down_proj": 4},
        alpha_pattern={"layers.1.self_attn.q_proj": 40},
    )
    result = merge(base, [ad], tmp_path / "out", device="cpu")
    changed = check_against_peft(base, tmp_path / "out", peft_merged(base, [ad]))
    assert len(changed) == 14 and result.merged == 14
    assert all(n.rsplit(".", 2)[-2] in LLAMA_ALL for n in changed)
    assert (result.tensors, result.device, result.dtype) == (
        len(load_file(base / "model.safetensors")),
        "cpu",
        "BF16",
    )


def test_gpt2_conv1d_with_lora_bias_matches_peft(bases, tmp_path):
    base = bases["gpt2-bf16"]
    ad = random_peft_adapter(
        base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=GPT2_ALL, fan_in_fan_out=True,
        lora_bias=True,
    )  # fmt: skip
    merge(base, [ad], tmp_path / "out", device="cpu")
    changed = check_against_peft(base, tmp_path / "out", peft_merged(base, [ad]))
    # 4 Conv1D weights and their 4 biases per layer
    assert len(changed) == 16 and "transformer.h.1.mlp.c_fc.bias" in changed


def test_embedding_adapter_matches_peft(bases, tmp_path):
    base = bases["llama-bf16"]
    targets = ["embed_tokens", "q_proj"]
    ad = random_peft_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=targets)
    assert "model.embed_tokens.weight" in read_adapter(ad).full  # PEFT saved the base layer too
    merge(base, [ad], tmp_path / "out", device="cpu")
    # PEFT rounds an embedding's delta to bf16 before adding it (measured: up to 2.25 ulps
    # from the exact sum), so it gets 3 ulps; the float64 formula holds us to 1.
    ulps = {"model.embed_tokens.weight": 3.0}
    changed = check_against_peft(base, tmp_path / "out", peft_merged(base, [ad]), ulps)
    assert "model.embed_tokens.weight" in changed and len(changed) == 3
    exact = float64_merge(base, [ad], [1.0])
    ours = load_file(tmp_path / "out" / "model.safetensors")
    for name in changed:
        assert_within_ulp(ours[name], exact[name], name)


@pytest.mark.parametrize(
    ("kind", "targets"),
    [
        ("llama-bf16", ["q_proj", "v_proj", "down_proj", "embed_tokens"]),
        ("gpt2-bf16", ["c_attn", "c_fc"]),
    ],
)
def test_dora_matches_peft(bases, tmp_path, kind, targets):
    base = bases[kind]
    fif = kind.startswith("gpt2")  # Conv1D: the norm runs over columns of the stored weight
    ad = random_peft_adapter(
        base, tmp_path / "ad", r=4, lora_alpha=8, use_dora=True, target_modules=targets,
        fan_in_fan_out=fif,
    )  # fmt: skip
    merge(base, [ad], tmp_path / "out", device="cpu")
    changed = check_against_peft(base, tmp_path / "out", peft_merged(base, [ad]))
    assert len(changed) == (7 if kind.startswith("llama") else 4)


@pytest.mark.parametrize("dora", [False, True])
def test_conv2d_matches_peft(tmp_path, dora):
    """Conv layers (1x1 and 3x3 kernels): B is a 1x1 conv, so the delta is B @ A reshaped;
    DoRA's magnitude ([1, out, 1, 1]) scales each output channel's norm."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    (tmp_path / "base").mkdir()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        tmp_path / "base" / "model.safetensors",
    )
    pm = get_peft_model(
        model,
        LoraConfig(
            r=2, lora_alpha=3, target_modules=["0", "2"], init_lora_weights=False, use_dora=dora
        ),
    )
    if dora:  # a fresh magnitude is the norm itself; make it differ so it is exercised
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(torch.linspace(0.5, 1.5, p.numel()).view_as(p))
    pm.save_pretrained(tmp_path / "ad")
    ref = {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}
    merge(tmp_path / "base", [tmp_path / "ad"], tmp_path / "out", device="cpu")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    base_sd = load_file(tmp_path / "base" / "model.safetensors")
    for name in ("0.weight", "2.weight"):
        assert not torch.allclose(ref[name], base_sd[name], atol=1e-3)
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-6, atol=1e-6)
    for name in ("0.bias", "2.bias"):
        assert raw(ours[name]) == raw(base_sd[name])


def test_modules_to_save_matches_peft(bases, tmp_path):
    base = bases["llama-bf16"]
    ad = random_peft_adapter(
        base, tmp_path / "ad", r=4, target_modules=["v_proj"], modules_to_save=["lm_head"]
    )
    merge(base, [ad], tmp_path / "out", device="cpu")
    changed = check_against_peft(base, tmp_path / "out", peft_merged(base, [ad]))
    assert changed == {
        "lm_head.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
    }
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert raw(out["lm_head.weight"]) == raw(read_adapter(ad).full["lm_head.weight"])


def logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_model_logits_match_peft_with_adapter_active(bases, tmp_path):
    base = bases["llama-f32"]
    ad = random_peft_adapter(base, tmp_path / "ad", r=8, lora_alpha=16, target_modules=LLAMA_ALL)
    merge(base, [ad], tmp_path / "out", device="cpu")
    expected = logits(peft_model(base, [ad]))
    assert not torch.allclose(expected, logits(load_model(base)), atol=1e-3)
    torch.testing.assert_close(logits(load_model(tmp_path / "out")), expected, atol=2e-4, rtol=1e-4)


def test_stacked_adapters_match_float64_formula(bases, tmp_path):
    base = bases["llama-bf16"]
    plain = random_peft_adapter(
        base, tmp_path / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
    )
    dora = random_peft_adapter(
        base, tmp_path / "b", seed=2, r=2, lora_alpha=5, target_modules=["v_proj", "o_proj"],
        use_dora=True,
    )  # fmt: skip
    weights = [1.0, 0.5]
    merge(base, [plain, dora], tmp_path / "out", weights, device="cpu")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    base_sd = load_file(base / "model.safetensors")
    exact = float64_merge(base, [plain, dora], weights)
    changed = {n for n in ours if not torch.equal(exact[n], base_sd[n].double())}
    assert len(changed) == 6
    for name, t in ours.items():
        if name in changed:
            assert_within_ulp(t, exact[name], name)
        else:
            assert raw(t) == raw(base_sd[name]), name


def test_stacked_logits_match_peft_with_both_active(bases, tmp_path):
    base = bases["llama-f32"]
    a = random_peft_adapter(base, tmp_path / "a", seed=1, r=4, target_modules=["q_proj", "up_proj"])
    b = random_peft_adapter(
        base, tmp_path / "b", seed=2, r=4, target_modules=["q_proj", "o_proj"], use_dora=True
    )
    merge(base, [a, b], tmp_path / "out", [1.0, 0.5], device="cpu")
    expected = logits(peft_model(base, [a, b], [1.0, 0.5]))
    assert not torch.allclose(expected, logits(peft_model(base, [a, b], [1.0, 1.0])), atol=1e-3)
    torch.testing.assert_close(logits(load_model(tmp_path / "out")), expected, atol=2e-4, rtol=1e-4)
    # In float32, PEFT's sequential merge_and_unload (which unmerges and re-merges around
    # each DoRA adapter) lands on the same weights.
    ref = peft_merged(base, [a, b], [1.0, 0.5])
    for name, t in load_file(tmp_path / "out" / "model.safetensors").items():
        torch.testing.assert_close(t, ref[name], atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------
# The output directory


def test_output_has_config_tokenizer_and_metadata(bases, tmp_path):
    base = bases["llama-bf16"]
    ad = random_peft_adapter(base, tmp_path / "ad", r=4, target_modules=["q_proj"])
    extra = {
        "base_content_hash": "xxh128:" + "0" * 32,
        "adapters": [{"digest": "xxh128:" + "1" * 32, "weight": 1.0}],
    }
    result = merge(base, [ad], tmp_path / "out", device="cpu", extra_metadata=extra)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "model.safetensors",
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "lorahub.json",
            "README.md",  # the merged checkpoint's card
        ]
    )
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    meta = json.loads((out / "lorahub.json").read_text())
    assert meta["base"]["signature"] == str(open_base(base).signature)
    assert meta["base_content_hash"] == extra["base_content_hash"]
    assert (
        meta["adapters"] == extra["adapters"]
        and meta["dtype"] == "BF16"
        and meta["device"] == "cpu"
    )
    assert meta["lorahub_version"]
    assert result.bytes_written == sum(p.stat().st_size for p in out.iterdir())
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert leftovers(tmp_path) == []


def test_output_dtype_converts_every_float_tensor(bases, tmp_path):
    base = bases["llama-bf16"]
    ad = random_peft_adapter(base, tmp_path / "ad", r=4, target_modules=["q_proj"])
    ref = peft_merged(base, [ad])
    result = merge(base, [ad], tmp_path / "out", device="cpu", dtype="float32")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    base_sd = load_file(base / "model.safetensors")
    assert result.dtype == "F32" and {t.dtype for t in ours.values()} == {torch.float32}
    for name, t in ours.items():
        if "q_proj" in name:  # merged in fp32, not rounded through bf16: within PEFT's bf16 ulp
            assert_within_ulp(t, ref[name], name)
        else:
            assert torch.equal(t, base_sd[name].float()), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float32"


def test_out_exists_is_an_error_and_force_replaces_it(bases, tmp_path):
    base = bases["llama-bf16"]
    a = random_peft_adapter(base, tmp_path / "a", seed=1, r=4, target_modules=["q_proj"])
    b = random_peft_adapter(base, tmp_path / "b", seed=2, r=4, target_modules=["q_proj"])
    out = tmp_path / "out"
    merge(base, [a], out, device="cpu")
    first = (out / "model.safetensors").read_bytes()
    with pytest.raises(MergeError, match="already exists"):
        merge(base, [b], out, device="cpu")
    assert (out / "model.safetensors").read_bytes() == first
    merge(base, [b], out, device="cpu", force=True)
    assert (out / "model.safetensors").read_bytes() != first
    check_against_peft(base, out, peft_merged(base, [b]))
    assert leftovers(tmp_path) == []


KILL_SCRIPT = """
import json, sys, time
from pathlib import Path
from safetensors.torch import load_file
from lorahub.adapter import LoraAdapter
from lorahub.base import open_base
from lorahub.merge import merge_to_dir

base, ad, out = map(Path, sys.argv[1:4])
config = json.loads((ad / "adapter_config.json").read_text())
adapter = LoraAdapter.from_state_dict(config, load_file(ad / "adapter_model.safetensors"))

def progress(done, total):
    print("writing", flush=True)
    time.sleep(120)

merge_to_dir(open_base(base), [adapter], out=out, device="cpu", progress=progress)
"""


def test_sigkill_mid_merge_leaves_no_output(bases, tmp_path):
    base = bases["llama-bf16"]
    ad = random_peft_adapter(base, tmp_path / "ad", r=4, target_modules=["q_proj"])
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILL_SCRIPT), str(base), str(ad), str(out)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert leftovers(tmp_path)  # it really was in the middle of writing
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    merge(base, [ad], out, device="cpu")  # and the next merge cleans up after the dead one
    assert leftovers(tmp_path) == []
    check_against_peft(base, out, peft_merged(base, [ad]))


def test_truncated_base_shard_fails_without_output(bases, tmp_path):
    base_dir = tmp_path / "base"
    shutil.copytree(bases["llama-bf16"], base_dir)
    base = open_base(base_dir)
    adapter = read_adapter(
        random_peft_adapter(base_dir, tmp_path / "ad", r=4, target_modules=["q_proj"])
    )
    shard = base_dir / "model.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(MergeError, match="truncated"):
        merge_to_dir(base, [adapter], out=tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_disk_space_is_checked_before_writing(bases, tmp_path, monkeypatch):
    base = bases["llama-bf16"]
    ad = random_peft_adapter(base, tmp_path / "ad", r=4, target_modules=["q_proj"])
    before = sorted(os.listdir(tmp_path))
    size = plan_merge(open_base(base), [read_adapter(ad)]).output_bytes
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12, size))
    with pytest.raises(MergeError, match="not enough free space"):
        merge(base, [ad], tmp_path / "out", device="cpu")
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("weights", [[float("nan")], [float("inf")], ["heavy"]])
def test_weights_must_be_finite_numbers(bases, tmp_path, weights):
    ad = random_peft_adapter(bases["llama-bf16"], tmp_path / "ad", r=4, target_modules=["q_proj"])
    with pytest.raises(MergeError, match="weights must be"):
        merge(bases["llama-bf16"], [ad], tmp_path / "out", weights, device="cpu")
    assert not (tmp_path / "out").exists()


def test_write_failures_are_merge_errors_and_leave_nothing(bases, tmp_path, monkeypatch):
    import errno

    base = bases["llama-bf16"]
    ad = random_peft_adapter(base, tmp_path / "ad", r=4, target_modules=["q_proj"])
    (tmp_path / "afile").write_text("in the way")
    with pytest.raises(MergeError, match="cannot merge to"):
        merge(base, [ad], tmp_path / "afile" / "out", device="cpu")

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(MergeError, match="filled up"):
        merge(base, [ad], tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_write_refused_even_without_direct_io_fails_instead_of_spinning(tmp_path, monkeypatch):
    import errno

    import lorahub.merge.writer as engine

    calls = []

    def refuse(fd, data, offset):
        calls.append(offset)
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "pwrite", refuse)
    with engine._ShardFile(tmp_path / "x", 8192) as f:
        f.direct = True  # as if O_DIRECT had been accepted at open
        f.write(b"a" * 100)
        with pytest.raises(OSError, match="Invalid argument"):
            f.finish(100)
    assert len(calls) == 2  # once direct, once buffered, then the error


def test_empty_tensors_survive_a_dtype_change(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "base").mkdir()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 8, generator=g)
    save_file(
        {"w.weight": w, "empty": torch.zeros(4, 0), "tail": torch.zeros(0)},
        str(tmp_path / "base" / "model.safetensors"),
    )
    a, b = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)
    ad = LoraAdapter.from_state_dict(
        {"r": 2, "lora_alpha": 2},
        {"base_model.model.w.lora_A.weight": a, "base_model.model.w.lora_B.weight": b},
    )
    base = open_base(tmp_path / "base")
    merge_to_dir(base, [ad], out=tmp_path / "out", device="cpu", dtype="bf16")
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert got["empty"].shape == (4, 0) and got["empty"].dtype == torch.bfloat16
    assert got["tail"].shape == (0,) and got["tail"].dtype == torch.bfloat16
    expected = (w.double() + b.double() @ a.double()).to(torch.bfloat16)
    assert torch.equal(got["w.weight"], expected)
    streamed = dict(iter_merged(base, [ad], device="cpu", dtype="bf16"))
    assert streamed["tail"].shape == (0,) and torch.equal(streamed["w.weight"], expected)


def test_iter_merged_leaves_the_callers_thread_count_alone(bases, tmp_path):
    base = bases["llama-bf16"]
    ad = random_peft_adapter(base, tmp_path / "ad", r=4, target_modules=["q_proj"])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        items = iter_merged(open_base(base), [read_adapter(ad)], device="cpu")
        for _ in range(5):  # past the first merged tensor
            next(items)
            assert torch.get_num_threads() == 2
        torch.set_num_threads(1)  # the consumer changes its mind between items
        for _ in items:
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_incompatible_adapter_fails_before_writing(bases, tmp_path):
    ad = random_peft_adapter(
        bases["gpt2-bf16"], tmp_path / "ad", r=4, target_modules=["c_attn"], fan_in_fan_out=True
    )
    with pytest.raises(IncompatibleAdapter):
        merge(bases["llama-bf16"], [ad], tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_iter_merged_yields_the_written_checkpoint(bases, tmp_path):
    base = bases["gpt2-bf16"]
    ad = read_adapter(
        random_peft_adapter(
            base, tmp_path / "ad", r=4, target_modules=GPT2_ALL, fan_in_fan_out=True
        )
    )
    merge_to_dir(open_base(base), [ad], out=tmp_path / "out", device="cpu")
    written = load_file(tmp_path / "out" / "model.safetensors")
    seen = []
    for name, t in iter_merged(open_base(base), [ad], device="cpu"):
        assert t.device.type == "cpu" and raw(t) == raw(written[name]), name
        seen.append(name)
    assert sorted(seen) == sorted(written)


@pytest.mark.parametrize("io", ["direct", "buffered", "direct-refused-on-write"])
def test_staging_buffers_wrap_and_buffered_fallback(bases, tmp_path, monkeypatch, io):
    """Staging buffers far smaller than the model (every tensor crosses a buffer switch),
    with direct I/O, without it, and with a filesystem that refuses the first direct write."""
    import errno

    import lorahub.merge.writer as m

    monkeypatch.setattr(m, "STAGING", 8192)
    if io == "buffered":
        monkeypatch.setattr(m, "_set_direct", lambda fd, on: False)
    elif io == "direct-refused-on-write":
        real, calls = os.pwrite, []

        def pwrite(fd, data, offset):
            calls.append(offset)
            if len(calls) == 1:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", pwrite)
    base = bases["llama-bf16"]
    ad = random_peft_adapter(base, tmp_path / "ad", r=4, target_modules=LLAMA_ALL)
    merge(base, [ad], tmp_path / "out", device="cpu")
    assert len(check_against_peft(base, tmp_path / "out", peft_merged(base, [ad]))) == 14


def test_small_shards_give_an_index_transformers_loads(bases, tmp_path):
    base = bases["llama-f32"]
    ad = random_peft_adapter(base, tmp_path / "ad", r=4, target_modules=LLAMA_ALL)
    one = merge(base, [ad], tmp_path / "one", device="cpu")
    limit = 10_000  # smaller than the embedding table: that one gets a shard of its own
    many = merge(base, [ad], tmp_path / "many", device="cpu", max_shard_size=limit)
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 5 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    total = 0
    for shard in shards:
        with safe_open(tmp_path / "many" / shard, "pt") as f:
            sizes = [f.get_tensor(k).numel() * 4 for k in f.keys()]  # noqa: SIM118
            assert all(index["weight_map"][k] == shard for k in f.keys())  # noqa: SIM118
        assert sum(sizes) <= limit or len(sizes) == 1
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(load_file(tmp_path / "one" / "model.safetensors"))
    assert many.merged == one.merged == 14
    torch.testing.assert_close(
        logits(load_model(tmp_path / "many")), logits(load_model(tmp_path / "one"))
    )
    torch.testing.assert_close(
        logits(load_model(tmp_path / "many")), logits(peft_model(base, [ad])), atol=2e-4, rtol=1e-4
    )


# ---------------------------------------------------------------------------------------------
# Small helpers


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("1.5 kb", 1500),
        ("4096", 4096),
        (123, 123),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "5 parsecs", "-1GB", "0", "GB"])
def test_parse_size_rejects_nonsense(text):
    with pytest.raises(MergeError):
        parse_size(text)


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(MergeError):
        resolve_device("warp-drive")
    if not torch.cuda.is_available():
        with pytest.raises(MergeError, match="no CUDA"):
            resolve_device("cuda")
