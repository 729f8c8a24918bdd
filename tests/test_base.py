"""Base models: tensor tables from headers, signature, sharding-independent content hash."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import xxhash
from factories import fake_hf_cache, tiny_llama
from safetensors.torch import load_file, save_file

import lorahub.base as base_mod
from lorahub.base import BaseModel, TensorInfo, content_hash, open_base, read_header
from lorahub.digest import Digest
from lorahub.errors import BaseModelError, LorahubError


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """The same tiny Llama saved unsharded and in 20 KB shards."""
    root = tmp_path_factory.mktemp("llama")
    model = tiny_llama()
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    return root / "single", root / "sharded"


def _reference_hash(path: Path) -> str:
    """Each tensor's raw bytes hashed with xxh3-128, then name + NUL + digest in name order,
    from safetensors' own loader."""
    h = xxhash.xxh3_128()
    for name, t in sorted(load_file(str(path)).items()):
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        h.update(name.encode() + b"\0" + xxhash.xxh3_128_digest(raw))
    return f"xxh128:{h.hexdigest()}"


def _raw_header(path: Path) -> tuple[dict, int]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), n


def _write_raw(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


# --------------------------------------------------------------------------------------
# opening


def test_sharded_and_single_give_same_table_and_signature(llama_dirs):
    single, sharded = llama_dirs
    a, b = open_base(single), open_base(sharded)
    assert a.files == ("model.safetensors",)
    assert len(b.files) > 2 and b.files == tuple(sorted(b.files))
    assert a.root == single.resolve()
    assert set(a.tensors) == set(b.tensors) == set(load_file(str(single / "model.safetensors")))
    assert a.signature == b.signature
    assert isinstance(a.signature, Digest)
    q = a.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert (q.dtype, q.shape, q.file) == ("F32", (32, 32), "model.safetensors")
    assert (
        a.total_bytes
        == b.total_bytes
        == sum(t.numel() * 4 for t in load_file(str(single / "model.safetensors")).values())
    )
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert {n: t.file for n, t in b.tensors.items()} == index


def test_signature_is_digest_of_sorted_name_dtype_shape(llama_dirs):
    base = open_base(llama_dirs[0])
    rows = sorted([n, t.dtype, list(t.shape)] for n, t in base.tensors.items())
    expected = xxhash.xxh3_128_hexdigest(
        json.dumps(rows, separators=(",", ":"), sort_keys=True).encode()
    )
    assert base.signature.hex == expected
    other = open_base_from_model(tiny_llama(hidden_size=48), llama_dirs[0].parent / "wide")
    assert other.signature != base.signature


def open_base_from_model(model, path: Path) -> BaseModel:
    if not path.exists():
        model.save_pretrained(path)
    return open_base(path)


def test_single_file_source(llama_dirs):
    f = llama_dirs[0] / "model.safetensors"
    base = open_base(f)
    assert base.root == f.parent.resolve()
    assert base.files == ("model.safetensors",)
    assert base.signature == open_base(llama_dirs[0]).signature


def test_any_safetensors_in_dir_without_index(tmp_path):
    unet = tmp_path / "unet"
    unet.mkdir()
    save_file(
        {"conv_in.weight": torch.zeros(8, 4, 3, 3)},
        str(unet / "diffusion_pytorch_model.safetensors"),
    )
    base = open_base(unet)
    assert base.files == ("diffusion_pytorch_model.safetensors",)
    assert base.tensors["conv_in.weight"].shape == (8, 4, 3, 3)


def test_duplicate_tensor_across_unindexed_files_is_an_error(tmp_path):
    save_file({"w.weight": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    save_file({"w.weight": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(BaseModelError, match=r"w\.weight.*a\.safetensors.*b\.safetensors"):
        open_base(tmp_path)


def test_signature_reads_headers_only(tmp_path, monkeypatch):
    """Tensor bytes are garbage; only the header is read, and nothing is memory-mapped."""
    src = tmp_path / "good.safetensors"
    save_file({"a.weight": torch.randn(64, 64), "b.weight": torch.randn(128)}, str(src))
    header, n = _raw_header(src)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    data_len = src.stat().st_size - 8 - n
    raw = src.read_bytes()
    (garbage / "model.safetensors").write_bytes(raw[: 8 + n] + os.urandom(data_len))

    read_bytes = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self._f = f

        def read(self, size=-1):
            out = self._f.read(size)
            read_bytes.append(len(out))
            return out

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    monkeypatch.setattr(
        base_mod, "open", lambda *a, **k: Counting(real_open(*a, **k)), raising=False
    )
    monkeypatch.setattr(base_mod.mmap, "mmap", None)  # any mapping attempt would fail
    base = open_base(garbage)
    assert sum(read_bytes) == 8 + n
    assert base.signature == open_base(src).signature
    assert base.tensors["a.weight"].offsets == tuple(header["a.weight"]["data_offsets"])


@pytest.mark.parametrize(
    "case",
    ["past_end", "size_mismatch", "overlap", "truncated", "header_too_long", "not_json", "dtype"],
)
def test_lying_headers_are_refused(tmp_path, case):
    path = tmp_path / "model.safetensors"
    a = np.arange(16, dtype=np.float32).tobytes()
    header = {
        "a.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
        "b.weight": {"dtype": "F32", "shape": [4], "data_offsets": [64, 80]},
    }
    data = a + a[:16]
    if case == "past_end":
        header["b.weight"]["data_offsets"] = [64, 96]
        header["b.weight"]["shape"] = [8]
    elif case == "size_mismatch":
        header["a.weight"]["shape"] = [4, 5]
    elif case == "overlap":
        header["b.weight"]["data_offsets"] = [60, 76]
    elif case == "dtype":
        header["a.weight"]["dtype"] = "F31"
    _write_raw(path, header, data)
    if case == "truncated":
        path.write_bytes(path.read_bytes()[:-10])
    elif case == "header_too_long":
        path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    elif case == "not_json":
        path.write_bytes(struct.pack("<Q", 4) + b"\xff{]x" + data)
    with pytest.raises(BaseModelError, match="not a valid safetensors file"):
        open_base(path)


def test_valid_handmade_header_is_accepted(tmp_path):
    path = tmp_path / "model.safetensors"
    header = {
        "__metadata__": {"format": "pt"},
        "a.weight": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
        "empty": {"dtype": "F32", "shape": [0], "data_offsets": [12, 12]},
    }
    _write_raw(path, header, bytes(12))
    tensors, meta, start = read_header(path)
    assert meta == {"format": "pt"}
    assert tensors["a.weight"] == TensorInfo("a.weight", "BF16", (2, 3), path.name, (0, 12))
    assert start == path.stat().st_size - 12


@pytest.mark.parametrize("code", ["F8_E4M3FNUZ", "F8_E5M2FNUZ"])
def test_a_base_with_an_fnuz_float8_tensor_is_accepted(tmp_path, code):
    path = tmp_path / "model.safetensors"
    header = {
        "a.weight": {"dtype": code, "shape": [2, 3], "data_offsets": [0, 6]},
        "b.weight": {"dtype": "BF16", "shape": [3], "data_offsets": [6, 12]},
    }
    _write_raw(path, header, bytes(12))
    base = open_base(path)
    assert base.tensors["a.weight"] == TensorInfo("a.weight", code, (2, 3), path.name, (0, 6))
    assert base.tensors["a.weight"].nbytes == 6 and base.total_bytes == 12


def test_index_naming_a_missing_shard(llama_dirs, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(llama_dirs[1], d)
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(BaseModelError, match=victim.name):
        open_base(d)


def test_index_lists_a_tensor_the_shard_lacks(llama_dirs, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(llama_dirs[1], d)
    idx = d / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    shard = next(iter(data["weight_map"].values()))
    data["weight_map"]["model.layers.9.ghost.weight"] = shard
    idx.write_text(json.dumps(data))
    with pytest.raises(BaseModelError, match=r"model\.layers\.9\.ghost\.weight"):
        open_base(d)


def test_index_shard_outside_the_directory(tmp_path):
    save_file({"w.weight": torch.zeros(2)}, str(tmp_path / "outside.safetensors"))
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w.weight": "../outside.safetensors"}})
    )
    with pytest.raises(BaseModelError, match="outside"):
        open_base(d)


def test_bin_only_dir_is_refused_with_conversion_hint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(BaseModelError, match=r"\.bin bases are not supported") as e:
        open_base(tmp_path)
    assert "save_pretrained" in str(e.value)
    with pytest.raises(BaseModelError, match="pickle"):
        open_base(tmp_path / "pytorch_model.bin")


def test_missing_paths_are_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BaseModelError, match="not found"):
        open_base(tmp_path / "nope")
    with pytest.raises(BaseModelError, match="not found"):
        open_base(str(tmp_path / "nope"))
    with pytest.raises(BaseModelError, match="not a local path"):
        open_base("someorg/not-cached")


def test_adapter_dir_is_not_a_base(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    save_file({"x.lora_A.weight": torch.zeros(2, 2)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(BaseModelError, match="adapter"):
        open_base(tmp_path)


def test_errors_are_lorahub_errors():
    assert issubclass(BaseModelError, LorahubError)


# --------------------------------------------------------------------------------------
# Hub sources


def test_hub_repo_from_local_cache_offline(llama_dirs, tmp_path, monkeypatch):
    hf_home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sha = "a" * 40
    snap = fake_hf_cache(hf_home, "tiny/llama", llama_dirs[1], sha)
    base = open_base("tiny/llama")
    assert (base.repo_id, base.revision, base.root.resolve()) == ("tiny/llama", sha, snap.resolve())
    assert base.signature == open_base(llama_dirs[0]).signature
    assert open_base(snap).signature == base.signature  # the snapshot folder as a path
    single = fake_hf_cache(hf_home, "tiny/single", llama_dirs[0], sha)
    assert open_base(single / "model.safetensors").signature == base.signature
    assert open_base("tiny/llama", revision=sha).revision == sha
    with pytest.raises(BaseModelError, match=r"not in the local Hugging Face cache.*hf download"):
        open_base("tiny/llama", revision="b" * 40)
    with pytest.raises(BaseModelError, match="not in the local"):
        open_base("tiny/llama", revision="v2")


def test_hub_repo_read_remotely_without_downloading(llama_dirs, monkeypatch):
    """Not cached and the Hub reachable: the table comes from the Hub's headers alone."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils._safetensors import (
        SafetensorsFileMetadata,
        SafetensorsRepoMetadata,
    )
    from huggingface_hub.utils._safetensors import TensorInfo as HfTensorInfo

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    sharded = llama_dirs[1]
    files = {}
    weight_map = {}
    for f in sorted(sharded.glob("*.safetensors")):
        header, _ = _raw_header(f)
        header.pop("__metadata__", None)
        files[f.name] = SafetensorsFileMetadata(
            metadata={},
            tensors={
                n: HfTensorInfo(e["dtype"], e["shape"], tuple(e["data_offsets"]))
                for n, e in header.items()
            },
        )
        weight_map.update(dict.fromkeys(header, f.name))
    meta = SafetensorsRepoMetadata(
        metadata=None, sharded=True, weight_map=weight_map, files_metadata=files
    )
    calls = []
    sha = "c" * 40
    monkeypatch.setattr(
        HfApi, "model_info", lambda self, repo, revision=None, **k: SimpleNamespace(sha=sha)
    )

    def fake_meta(self, repo, revision=None, **k):
        calls.append((repo, revision))
        return meta

    monkeypatch.setattr(HfApi, "get_safetensors_metadata", fake_meta)
    base = open_base("tiny/remote", revision="main")
    assert calls == [("tiny/remote", sha)]
    assert base.root is None and base.revision == sha and base.repo_id == "tiny/remote"
    assert base.signature == open_base(llama_dirs[0]).signature
    assert all(t.file is None for t in base.tensors.values())
    with pytest.raises(BaseModelError, match="hf download tiny/remote"):
        content_hash(base)


def test_hub_unreachable_and_not_cached(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # conftest points HF_ENDPOINT at a closed port
    with pytest.raises(BaseModelError, match=r"could not be reached|not in the local"):
        open_base("tiny/unreachable")


# --------------------------------------------------------------------------------------
# content hash


def test_content_hash_is_independent_of_sharding(llama_dirs):
    single, sharded = llama_dirs
    h1, h2 = content_hash(open_base(single)), content_hash(open_base(sharded))
    assert h1 == h2
    assert str(h1) == _reference_hash(single / "model.safetensors")


def test_content_hash_changes_with_one_element(llama_dirs, tmp_path):
    sd = load_file(str(llama_dirs[0] / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"][3, 7] += 1e-3
    d = tmp_path / "changed"
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"))
    changed = open_base(d)
    assert changed.signature == open_base(llama_dirs[0]).signature
    assert content_hash(changed) != content_hash(open_base(llama_dirs[0]))
    assert str(content_hash(changed)) == _reference_hash(d / "model.safetensors")


def test_content_hash_of_bf16_and_multi_chunk_tensor(tmp_path, monkeypatch):
    monkeypatch.setattr(base_mod, "HASH_CHUNK", 1000)  # force many slices per tensor
    g = torch.Generator().manual_seed(1)
    sd = {
        "z.weight": torch.randn(70, 33, generator=g).to(torch.bfloat16),
        "a.bias": torch.randn(5, generator=g),
        "m.empty": torch.zeros(0),
    }
    save_file(sd, str(tmp_path / "model.safetensors"))
    seen = []
    digest = content_hash(open_base(tmp_path), progress=lambda d, t: seen.append((d, t)))
    assert str(digest) == _reference_hash(tmp_path / "model.safetensors")
    assert seen[-1] == (70 * 33 * 2 + 20, 70 * 33 * 2 + 20)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) > 3


def test_content_hash_cache_hit_and_invalidation(llama_dirs, tmp_path, monkeypatch):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(llama_dirs[1], d)
    cache = tmp_path / "cache"
    computed = []
    real = base_mod._hash_tensors

    def counting(base, progress):
        computed.append(base.source)
        return real(base, progress)

    monkeypatch.setattr(base_mod, "_hash_tensors", counting)
    first = content_hash(open_base(d), cache_dir=cache)
    assert len(computed) == 1 and (cache / "base-hashes.json").is_file()
    seen = []
    again = content_hash(open_base(d), cache_dir=cache, progress=lambda a, b: seen.append((a, b)))
    assert again == first and len(computed) == 1
    assert seen and seen[-1][0] == seen[-1][1]
    # Touching one shard (new mtime, same bytes) invalidates the entry.
    shard = sorted(d.glob("model-*.safetensors"))[2]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert content_hash(open_base(d), cache_dir=cache) == first
    assert len(computed) == 2
    # No cache dir: always computed.
    content_hash(open_base(d))
    assert len(computed) == 3


def test_cache_survives_a_corrupt_cache_file(llama_dirs, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "base-hashes.json").write_text("{not json")
    base = open_base(llama_dirs[0])
    assert content_hash(base, cache_dir=cache) == content_hash(base)
    data = json.loads((cache / "base-hashes.json").read_text())
    assert len(data["entries"]) == 1


def test_the_hash_cache_is_readable_by_its_owner_only(llama_dirs, tmp_path):
    # It lists the paths of the user's models, like the mkstemp-made file it replaces.
    cache = tmp_path / "cache"
    old = os.umask(0o022)
    try:
        content_hash(open_base(llama_dirs[0]), cache_dir=cache)
    finally:
        os.umask(old)
    assert (cache / "base-hashes.json").stat().st_mode & 0o777 == 0o600


def test_write_atomic_makes_the_file_with_its_mode_less_the_umask(tmp_path):
    from lorahub.fsutil import write_atomic

    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "shared", b"a")
        write_atomic(tmp_path / "private", b"b", mode=0o600)
    finally:
        os.umask(old)
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "private").read_bytes() == b"b"


def test_progress_callback_can_abort(tmp_path, monkeypatch):
    monkeypatch.setattr(base_mod, "HASH_CHUNK", 100)
    save_file({"a": torch.zeros(1000), "b": torch.ones(1000)}, str(tmp_path / "model.safetensors"))

    def stop(done, total):
        if done > 300:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        content_hash(open_base(tmp_path), progress=stop)


def test_local_only_never_contacts_the_hub(monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def boom(*a, **k):
        raise AssertionError("the Hub was contacted")

    monkeypatch.setattr(HfApi, "model_info", boom)
    monkeypatch.setattr(HfApi, "get_safetensors_metadata", boom)
    with pytest.raises(BaseModelError, match="hf download org/model"):
        open_base("org/model", local_only=True)


def test_shard_changed_after_open_is_detected(tmp_path):
    save_file({"w.weight": torch.zeros(4)}, str(tmp_path / "model.safetensors"))
    base = open_base(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(BaseModelError, match="gone"):
        content_hash(base)


def test_state_dict_hash_matches_checkpoint(llama_dirs):
    sd = load_file(str(llama_dirs[0] / "model.safetensors"))
    assert base_mod.state_dict_hash(sd) == content_hash(open_base(llama_dirs[0]))
