"""What a merged checkpoint folder holds besides its weights: every non-weight file of the base
folder (configs, tokenizer assets of any name, ``*.py`` for ``trust_remote_code``), none of the
base's weights in other formats, and weight files named as the base's (a diffusers folder keeps
``diffusion_pytorch_model*.safetensors``), all through the real CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from factories import load_model, write_peft_adapter
from safetensors.torch import load_file, save_file

# Files a base folder may hold that a loader needs next to the weights, under names no fixed
# list knows: the merge must keep each, byte for byte.
KEPT = {
    "tokenizer.tiktoken": b"IQ== 0\nIg== 1\n",
    "modeling_x.py": b"from transformers import PreTrainedModel\n\nclass XModel(PreTrainedModel):\n"
    b"    pass\n",
    "configuration_x.py": b"from transformers import PretrainedConfig\n",
    "chat_template.jinja": b"{% for m in messages %}{{ m.content }}{% endfor %}",
    "my_vocab.txt": b"[PAD]\n[UNK]\nhello\n",
}
# Weights in other formats, their indexes, hidden files, a subfolder: never copied.
LEFT_OUT = {
    "pytorch_model.bin": b"\0" * 64,
    "pytorch_model.bin.index.json": b'{"weight_map": {}}',
    "model.pt": b"\0" * 16,
    "flax_model.msgpack": b"\0" * 16,
    "tf_model.h5": b"\0" * 16,
    "model.ckpt": b"\0" * 16,
    ".gitattributes": b"*.bin filter=lfs\n",
}


@pytest.fixture
def base_folder(world: Path, tmp_path: Path) -> Path:
    """The tiny Llama with a custom tokenizer file, remote code, a card and other formats."""
    base = tmp_path / "base"
    shutil.copytree(world / "llama", base)
    for name, data in {**KEPT, **LEFT_OUT}.items():
        (base / name).write_bytes(data)
    (base / "README.md").write_text("---\nlicense: mit\n---\n\n# The base\n")
    (base / "original").mkdir()  # a repo's subfolder: another format (params.json, .pth)
    (base / "original" / "params.json").write_text("{}")
    (base / ".cache").mkdir()
    (base / ".cache" / "x.lock").write_text("")
    return base


def test_every_non_weight_file_of_the_base_is_kept(base_folder, world, tmp_path, run):
    out = tmp_path / "merged"
    run("merge", base_folder, world / "a", "-o", out, "--device", "cpu")

    names = {p.name for p in out.iterdir()}
    assert set(KEPT) <= names
    for name, data in KEPT.items():
        assert (out / name).read_bytes() == data, name
    for name in ("config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (base_folder / name).read_bytes()
    assert not names & set(LEFT_OUT), names & set(LEFT_OUT)
    assert not any(p.is_dir() for p in out.iterdir()), "subfolders are not copied"
    assert "# The base" not in (out / "README.md").read_text()  # the merge writes its own card
    # lorahub.json lists exactly what the merge wrote, so --force knows the folder is its own.
    doc = json.loads((out / "lorahub.json").read_text())
    assert doc["files"] == sorted(names)
    run("merge", base_folder, world / "a", "-o", out, "--device", "cpu", "--force")
    (out / "notes.txt").write_text("mine")
    refused = run(
        "merge", base_folder, world / "a", "-o", out, "--device", "cpu", "--force", code=None
    )
    assert refused.exit_code != 0 and "notes.txt" in refused.output + refused.stderr
    (out / "notes.txt").unlink()

    model = load_model(out)  # transformers loads the folder the merge wrote
    assert model.config.hidden_size == 32


def test_a_base_given_as_one_file_brings_only_known_files(base_folder, world, tmp_path, run):
    out = tmp_path / "merged"
    run("merge", base_folder / "model.safetensors", world / "a", "-o", out, "--device", "cpu")
    names = {p.name for p in out.iterdir()}
    # Its folder may hold anything: the config and tokenizer files a loader needs, no more.
    assert {"model.safetensors", "config.json", "generation_config.json"} <= names
    assert "chat_template.jinja" in names  # a tokenizer file of the known list
    assert not names & ({*KEPT, *LEFT_OUT} - {"chat_template.jinja"})
    assert json.loads((out / "lorahub.json").read_text())["files"] == sorted(names)


def _unet(folder: Path, *, shards: int = 1) -> dict[str, torch.Tensor]:
    """A diffusers-style component folder: config.json with ``_class_name`` and
    ``diffusion_pytorch_model.safetensors`` (or its shards and index)."""
    g = torch.Generator().manual_seed(3)
    tensors = {
        "down.weight": torch.randn(16, 8, generator=g),
        "up.weight": torch.randn(8, 16, generator=g),
        "norm.weight": torch.ones(8),
    }
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps({"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.30.0"})
    )
    if shards == 1:
        save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
        return tensors
    names = list(tensors)
    weight_map = {}
    for k in range(shards):
        shard = f"diffusion_pytorch_model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::shards]}
        save_file(part, str(folder / shard))
        weight_map |= dict.fromkeys(part, shard)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return tensors


def _expected(base: dict[str, torch.Tensor], adapter: Path) -> dict[str, torch.Tensor]:
    """The base with ``down`` changed by ``alpha / r * B @ A``, in float64 (not lorahub's code)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    a = sd["base_model.model.down.lora_A.weight"].double()
    b = sd["base_model.model.down.lora_B.weight"].double()
    out = {k: v.clone() for k, v in base.items()}
    out["down.weight"] = (base["down.weight"].double() + cfg["lora_alpha"] / cfg["r"] * b @ a).to(
        base["down.weight"].dtype
    )
    return out


def _loaded(out: Path, stem: str) -> dict[str, torch.Tensor]:
    """The folder's tensors read the way a loader does: the single file, else via the index."""
    single = out / f"{stem}.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = json.loads((out / f"{stem}.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors |= load_file(str(out / shard))
    assert set(tensors) == set(index["weight_map"])
    return tensors


@pytest.mark.parametrize("base_shards", [1, 2])
def test_a_diffusers_base_keeps_its_weight_names(tmp_path, run, base_shards):
    unet = tmp_path / "unet"
    base = _unet(unet, shards=base_shards)
    adapter = write_peft_adapter(
        tmp_path / "lora",
        {"down": (8, 16)},
        r=2,
        alpha=4,
        extra_config={"task_type": None, "base_model_name_or_path": None},
    )
    out = tmp_path / "merged-unet"
    run("merge", unet, adapter, "-o", out, "--device", "cpu")

    names = {p.name for p in out.iterdir()}
    assert names == {
        "diffusion_pytorch_model.safetensors",
        "config.json",
        "README.md",
        "lorahub.json",
    }
    got = _loaded(out, "diffusion_pytorch_model")
    want = _expected(base, adapter)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
    card = (out / "README.md").read_text()
    assert (
        "library_name: diffusers" in card and "from diffusers import UNet2DConditionModel" in card
    )

    # Split in shards, it keeps the naming too, with the index diffusers looks for.
    sharded = tmp_path / "merged-sharded"
    run("merge", unet, adapter, "-o", sharded, "--device", "cpu", "--max-shard-size", "600B")
    names = {p.name for p in sharded.iterdir()}
    assert "diffusion_pytorch_model.safetensors.index.json" in names
    assert {n for n in names if n.endswith(".safetensors")} == {
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
    }
    assert not any(n.startswith("model") for n in names)
    assert json.loads((sharded / "lorahub.json").read_text())["files"] == sorted(names)
    got = _loaded(sharded, "diffusion_pytorch_model")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)


CANARY = "lorahub-canary-7f3e91: a private file outside the base folder"


def _holds_canary(out: Path) -> list[str]:
    return [p.name for p in out.rglob("*") if p.is_file() and CANARY.encode() in p.read_bytes()]


def test_a_link_out_of_the_base_folder_is_not_copied(base_folder, world, tmp_path, run):
    secret = tmp_path / "home" / "secret"
    secret.parent.mkdir()
    secret.write_text(CANARY)
    (base_folder / "notes.txt").symlink_to(secret)
    (base_folder / "vocab_alias.txt").symlink_to("my_vocab.txt")  # a link inside: followed
    out = tmp_path / "merged"
    run("merge", base_folder, world / "a", "-o", out, "--device", "cpu")
    names = {p.name for p in out.iterdir()}
    assert "notes.txt" not in names and not _holds_canary(out)
    assert (out / "vocab_alias.txt").read_bytes() == KEPT["my_vocab.txt"]
    assert json.loads((out / "lorahub.json").read_text())["files"] == sorted(names)

    # Given as one file, the base's folder brings only known names: a known name that links
    # out of the folder is left out too.
    (base_folder / "tokenizer.json").symlink_to(secret)
    one = tmp_path / "merged-one"
    run("merge", base_folder / "model.safetensors", world / "a", "-o", one, "--device", "cpu")
    assert "tokenizer.json" not in {p.name for p in one.iterdir()} and not _holds_canary(one)
    assert (one / "config.json").is_file()


def test_a_base_in_the_hugging_face_cache_keeps_its_linked_files(world, tmp_path, run):
    """snapshots/<rev>/x -> ../../blobs/<sha>, as huggingface_hub lays a download out."""
    repo = tmp_path / "hf" / "hub" / "models--tiny-org--llama"
    snap = repo / "snapshots" / ("d" * 40)
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    files = {f.name: f.read_bytes() for f in (world / "llama").iterdir()} | KEPT
    for i, (name, data) in enumerate(sorted(files.items())):
        (repo / "blobs" / f"{i:064x}").write_bytes(data)
        (snap / name).symlink_to(Path("..", "..", "blobs", f"{i:064x}"))
    out = tmp_path / "merged"
    run("merge", snap, world / "a", "-o", out, "--device", "cpu")
    for name, data in KEPT.items():
        assert (out / name).read_bytes() == data, name
    assert (out / "config.json").read_bytes() == files["config.json"]
    assert not (out / "config.json").is_symlink()
    assert load_model(out).config.hidden_size == 32


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_a_one_file_base_of_any_name_gives_model_safetensors(world, tmp_path, run, shard):
    single = tmp_path / "single"
    single.mkdir()
    shutil.copyfile(world / "llama" / "model.safetensors", single / "my-finetune.safetensors")
    shutil.copyfile(world / "llama" / "config.json", single / "config.json")
    out = tmp_path / "merged"
    extra = ["--max-shard-size", shard] if shard else []
    run("merge", single / "my-finetune.safetensors", world / "a", "-o", out, "--device", "cpu",
        *extra)  # fmt: skip
    names = {p.name for p in out.iterdir()}
    assert not any(n.startswith("my-finetune") for n in names), names
    if shard is None:
        assert "model.safetensors" in names
    else:
        assert "model.safetensors.index.json" in names
        assert len([n for n in names if n.startswith("model-0")]) > 1
    assert json.loads((out / "lorahub.json").read_text())["files"] == sorted(names)
    merged = load_model(out)  # transformers' from_pretrained finds the weights
    base = load_model(world / "llama")
    assert merged.config.hidden_size == 32
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], base.state_dict()[q])  # the adapter is in it


def test_a_large_stray_file_is_copied_without_holding_it_in_memory(
    base_folder, world, tmp_path, run
):
    import tracemalloc

    size = 96 << 20
    with open(base_folder / "stray.dat", "wb") as f:  # sparse: nothing written to the disk
        f.truncate(size)
    out = tmp_path / "merged"
    tracemalloc.start()
    try:
        run("merge", base_folder, world / "a", "-o", out, "--device", "cpu")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (out / "stray.dat").stat().st_size == size
    assert peak < size // 2, f"peak Python allocation {peak} bytes for a {size}-byte file"
