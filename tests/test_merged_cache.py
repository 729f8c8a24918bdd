"""Merging through the Hub: the CLI, resolving adapters for the base, the on-demand cache."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lorahub
import lorahub.merge
from lorahub.errors import AdapterNotFound, IncompatibleAdapter, MergeError


@pytest.fixture
def hub(hub, world):
    """The shared empty store, holding the world's adapters ``a`` and ``b`` by those names."""
    hub.add(world / "a", name="a")
    hub.add(world / "b", name="b")
    return hub


def test_merge_writes_the_weighted_sum(hub, world, tmp_path):
    res = hub.merge(world / "llama", ["a", "b"], [1.0, 0.5], out=tmp_path / "m", device="cpu")
    assert res.merged == 4 and (tmp_path / "m" / "config.json").is_file()
    base = load_file(world / "llama" / "model.safetensors")
    merged = load_file(tmp_path / "m" / "model.safetensors")
    ad = load_file(world / "a" / "adapter_model.safetensors")
    key = "model.layers.0.self_attn.q_proj"
    a = ad[f"base_model.model.{key}.lora_A.weight"].double()
    b = ad[f"base_model.model.{key}.lora_B.weight"].double()
    expected = base[f"{key}.weight"].double() + (8 / 4) * (b @ a)
    torch.testing.assert_close(merged[f"{key}.weight"].double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"])
    meta = json.loads((tmp_path / "m" / "lorahub.json").read_text())
    assert [x["digest"] for x in meta["adapters"]] == [hub.get("a").digest, hub.get("b").digest]
    assert meta["base_content_hash"] == hub.bases()[0].content_hash
    with pytest.raises(MergeError, match="already exists"):
        hub.merge(world / "llama", "a", out=tmp_path / "m")


def test_merge_refuses_an_adapter_that_does_not_fit(hub, world, tmp_path):
    with pytest.raises(IncompatibleAdapter, match=r"expects \[32, 32\], base has \[48, 48\]"):
        hub.merge(world / "wide", "a", out=tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_merged_is_made_once_then_served_from_the_store(hub, world, monkeypatch):
    calls = []
    real = lorahub.merge.merge_to_dir

    def counting(*args, **kwargs):
        calls.append(kwargs["out"])
        return real(*args, **kwargs)

    monkeypatch.setattr(lorahub.merge, "merge_to_dir", counting)
    first = hub.merged(world / "llama", ["a"], device="cpu")
    again = hub.merged(world / "llama", ["a"], device="cpu")
    assert first == again and len(calls) == 1
    assert first.parent == hub.home / "merged"
    other = hub.merged(world / "llama", ["a"], [0.5], device="cpu")
    assert other != first and len(calls) == 2
    (entry, *_) = hub.merged_list()
    assert entry.path == str(other) and entry.adapters == ((hub.get("a").digest, 0.5),)


def test_merged_cache_evicts_least_recently_used(tmp_path, world, monkeypatch):
    one = (world / "llama" / "model.safetensors").stat().st_size
    monkeypatch.setenv("LORAHUB_MERGED_MAX_BYTES", str(int(one * 2.5)))
    hub = lorahub.open(tmp_path / "s")
    hub.add(world / "a", name="a")
    p1 = hub.merged(world / "llama", ["a"], [1.0], device="cpu")
    p2 = hub.merged(world / "llama", ["a"], [0.5], device="cpu")
    assert hub.merged(world / "llama", ["a"], [1.0], device="cpu") == p1  # p1 now most recent
    p3 = hub.merged(world / "llama", ["a"], [0.25], device="cpu")
    assert p1.is_dir() and p3.is_dir() and not p2.exists()
    assert {m.path for m in hub.merged_list()} == {str(p1), str(p3)}


def test_merge_cli(run, tmp_path, world):
    run("add", world / "a", "-n", "a")
    run("add", world / "b", "-n", "b")
    out = tmp_path / "merged"
    res = run("merge", world / "llama", "a", "b", "--weights", "1,0.5", "-o", out, "--json")
    assert json.loads(res.stdout)["merged"] == 4
    assert "already exists" in run("merge", world / "llama", "a", "-o", out, code=1).stderr
    run("merge", world / "llama", "a", "-o", out, "--force", "--dtype", "bfloat16")
    assert load_file(out / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16
    bad = run("merge", world / "llama", "a", "b", "--weights", "1", "-o", tmp_path / "x", code=2)
    assert "give one each" in bad.stderr
    path = run("merged", "get", world / "llama", "a").stdout.strip()
    assert run("merged", "get", world / "llama", "a").stdout.strip() == path
    (entry,) = json.loads(run("merged", "ls", "--json").stdout)
    assert entry["path"] == path
    run("merged", "rm", entry["key"][7:19], "-y")
    assert json.loads(run("merged", "ls", "--json").stdout) == []


def test_an_adapter_path_is_added_then_merged(tmp_path, world, monkeypatch):
    monkeypatch.chdir(world)
    hub = lorahub.open(tmp_path / "s")
    res = hub.merge("llama", ["./a"], out=tmp_path / "m", device="cpu")
    (stored,) = hub.list_adapters()
    assert res.merged == 2 and stored.origin["path"] == str(world / "a")
    meta = json.loads((tmp_path / "m" / "lorahub.json").read_text())
    assert [x["digest"] for x in meta["adapters"]] == [stored.digest]
    # The same folder again is the same adapter: nothing new is stored.
    assert hub.check(str(world / "a"), base="llama").status == "compatible"
    assert [i.digest for i in hub.list_adapters()] == [stored.digest]
    with pytest.raises(AdapterNotFound, match=r"\./nope does not exist"):
        hub.merge("llama", "./nope", out=tmp_path / "x")
    assert not (tmp_path / "x").exists() and len(hub.list_adapters()) == 1


def test_a_name_wins_over_a_folder_of_the_same_name(tmp_path, world, monkeypatch):
    monkeypatch.chdir(world)
    hub = lorahub.open(tmp_path / "s")
    hub.add(world / "b", name="a")  # the name "a" means b, though ./a exists here
    assert hub.resolve("a", base="llama").digest == hub.get("a").digest
    assert hub.resolve("./a", base="llama").digest != hub.get("a").digest


def test_compose_takes_paths_and_other_commands_say_to_add_them(tmp_path, world, monkeypatch):
    monkeypatch.chdir(world)
    hub = lorahub.open(tmp_path / "s")
    res = hub.compose(["./a", "./b"], name="ab")
    parents = res.adapter.provenance["parents"]
    assert len(parents) == 2 and {i.digest for i in hub.list_adapters()} >= set(parents)
    with pytest.raises(lorahub.InvalidReference, match=r"is a path.*lorahub add \./a"):
        hub.get("./a")


def test_merged_rm_wants_eight_hex_and_takes_a_key_once(hub, world):
    path = hub.merged(world / "llama", ["a"], device="cpu")
    (entry,) = hub.merged_list()
    with pytest.raises(lorahub.InvalidReference, match="too short"):
        hub.merged_remove([entry.key[7:11]])
    key = entry.key[7:19]
    assert hub.merged_remove([key, key]) == [entry.key] and not path.exists()


def test_merge_cli_names_a_bad_shard_size(run, tmp_path, world):
    res = run(
        "merge", world / "llama", "./a", "-o", tmp_path / "m", "--max-shard-size", "0", code=2
    )
    assert "--max-shard-size" in res.stderr and "positive" in res.stderr
    assert not (tmp_path / "m").exists()
