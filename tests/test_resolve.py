"""Bases in the store: add --base, check, resolve between variants, ls --base."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from factories import peft_adapter, tiny_llama

import lorahub
from lorahub.errors import IncompatibleAdapter

# Each test runs on the SQLite and the PostgreSQL catalog (conftest.py's ``catalog``).
pytestmark = pytest.mark.usefixtures("catalog")


def test_add_with_base_records_fingerprints(hub, world):
    info = hub.add(world / "a", name="sql", base=world / "llama").adapter
    (base,) = hub.bases()
    assert info.base.signature == base.signature and info.base.content_hash == base.content_hash
    assert info.base.verified and base.tensor_count == 21
    assert hub.check("sql", base=world / "llama").status == "exact"
    assert hub.check("sql", base=world / "llama-instruct").status == "compatible"


def test_add_refuses_incompatible_base_unless_forced(hub, world):
    with pytest.raises(IncompatibleAdapter) as err:
        hub.add(world / "a", name="sql", base=world / "wide")
    msg = str(err.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "[32, 32]" in msg and "[48, 48]" in msg
    assert hub.list_adapters() == []
    forced = hub.add(world / "a", name="sql", base=world / "wide", force=True)
    assert forced.status == "added"


def test_resolve_picks_the_variant_for_the_base(hub, world):
    small = hub.add(world / "a", name="sql:v1", base=world / "llama").adapter
    wide = hub.add(world / "wide-ad", name="sql:v1", base=world / "wide").adapter
    assert small.digest != wide.digest
    got = hub.resolve("sql:v1", base=world / "wide")
    assert (got.digest, got.match) == (wide.digest, "exact")
    got = hub.resolve("sql:v1", base=world / "llama")
    assert (got.digest, got.match) == (small.digest, "exact")
    got = hub.resolve("sql:v1", base=world / "llama-instruct")
    assert (got.digest, got.match) == (small.digest, "compatible")
    # Without a base the name is ambiguous and says how to choose.
    with pytest.raises(lorahub.AmbiguousReference, match="--base"):
        hub.get("sql:v1")


def test_base_picks_the_variant_to_show_export_and_remove(run, store_home, tmp_path, world):
    run("add", world / "a", "-n", "sql:v1", "--base", world / "llama")
    run("add", world / "wide-ad", "-n", "sql:v1", "--base", world / "wide")
    assert "--base" in run("show", "sql:v1", code=1).stderr
    shown = json.loads(run("show", "sql:v1", "--base", world / "wide", "--json").stdout)
    assert shown["base"]["signature"] == lorahub.open(store_home).bases()[0].signature
    run("export", "sql:v1", tmp_path / "out", "--base", world / "wide")
    a = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert a["r"] == 4 and (tmp_path / "out" / "lorahub.json").is_file()
    exported = json.loads((tmp_path / "out" / "lorahub.json").read_text())["digest"]
    assert exported == shown["digest"]
    # Removing the wide variant's name leaves the other variant under the name.
    run("rm", "sql:v1", "--base", world / "wide", "-y")
    with lorahub.open(store_home) as h:
        left = h.get("sql:v1")
        assert left.digest != shown["digest"] and left.base.name == "llama"


def test_a_new_version_replaces_the_old_whichever_was_recorded_with_a_base(hub, world):
    old = hub.add(world / "a", name="sql", base=world / "llama").adapter
    new = hub.add(world / "wide-ad", name="sql").adapter  # no --base: a plain tag move
    assert hub.get("sql").digest == new.digest
    assert "sql:latest" not in hub.get("@" + old.digest).refs
    newer = hub.add(world / "a", name="sql", base=world / "llama-instruct").adapter
    assert hub.get("sql").digest == newer.digest  # replaced the unverified one
    with pytest.raises(IncompatibleAdapter):
        hub.resolve("sql", base=world / "wide")  # the wide one is no longer under the name


def test_resolve_error_lists_every_variant(hub, world, tmp_path):
    hub.add(world / "a", name="sql", base=world / "llama")
    with pytest.raises(IncompatibleAdapter) as err:
        hub.resolve("sql", base=world / "wide")
    msg = str(err.value)
    assert "no variant of 'sql' fits" in msg and "expects [32, 32], base has [48, 48]" in msg


def test_ls_base_filters_to_adapters_that_fit(hub, world):
    hub.add(world / "a", name="small")
    hub.add(world / "wide-ad", name="wide")
    assert [i.refs for i in hub.list_adapters(base=world / "llama")] == [("small:latest",)]
    assert [i.refs for i in hub.list_adapters(base=world / "wide")] == [("wide:latest",)]


def test_checks_need_no_base_files_once_recorded(hub, world, tmp_path):
    copy = tmp_path / "my-llama"
    shutil.copytree(world / "llama", copy)
    hub.add_base(copy, name="my-llama")
    hub.add(world / "a", name="sql")
    shutil.rmtree(copy)
    assert hub.check("sql", base="my-llama").status == "compatible"
    assert [i.refs for i in hub.list_adapters(base="my-llama")] == [("sql:latest",)]


def test_base_commands(run, tmp_path, world):
    out = json.loads(run("base", "add", world / "llama", "--json").stdout)
    assert out["name"] == "llama" and out["content_hash"].startswith("xxh128:")
    assert json.loads(run("base", "ls", "--json").stdout)[0]["signature"] == out["signature"]
    assert "llama" in run("base", "ls").stdout
    run("add", world / "a", "-n", "sql", "--base", world / "llama")
    assert run("check", "sql", "--base", "llama").stdout.startswith("exact")
    bad = run("check", "sql", "--base", world / "wide", code=3)  # checked: incompatible
    assert "incompatible" in bad.stdout and "[48, 48]" in bad.stdout
    report = json.loads(run("check", "sql", "--base", world / "wide", "--json", code=3).stdout)
    assert report["status"] == "incompatible" and report["mismatched"] == 2
    assert report["problems"][0]["expected"] == [32, 32]
    got = json.loads(run("resolve", "sql", "--base", world / "llama-instruct", "--json").stdout)
    assert got["match"] == "compatible"
    res = run("add", world / "a", "-n", "x", "--base", world / "wide", code=1)
    assert "does not fit" in res.stderr
    res = run("base", "add", tmp_path / "nope", code=1)
    assert res.stderr.startswith("Error:") and "Traceback" not in res.stderr
    assert len(json.loads(run("ls", "--json", "--base", world / "llama").stdout)) == 1


def test_kohya_file_imports_against_its_base(hub, world, tmp_path):
    from safetensors.torch import load_file, save_file

    base = load_file(world / "llama" / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(2):
        w = base[f"model.layers.{i}.self_attn.q_proj.weight"]
        key = f"lora_te_model_layers_{i}_self_attn_q_proj"
        sd[f"{key}.lora_down.weight"] = torch.randn(2, w.shape[1], generator=g)
        sd[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], 2, generator=g)
        sd[f"{key}.alpha"] = torch.tensor(1.0)
    sd["lora_te_no_such_module.lora_down.weight"] = torch.randn(2, 8, generator=g)
    sd["lora_te_no_such_module.lora_up.weight"] = torch.randn(8, 2, generator=g)
    save_file(sd, str(tmp_path / "style.safetensors"), metadata={"ss_network_dim": "2"})
    with pytest.raises(lorahub.InvalidAdapter, match="pass --base"):
        hub.add(tmp_path / "style.safetensors")
    res = hub.add(tmp_path / "style.safetensors", name="style", base=world / "llama")
    info = res.adapter
    assert sorted(info.modules) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert info.origin["format"] == "kohya"
    assert info.origin["unmapped_keys"] == [
        "lora_te_no_such_module.lora_down.weight",
        "lora_te_no_such_module.lora_up.weight",
    ]
    assert info.origin["metadata"]["ss_network_dim"] == "2"
    m = hub.load("style").modules["model.layers.0.self_attn.q_proj"]
    assert m.alpha == 1.0 and m.scaling() == 0.5


def test_recording_a_base_by_path_keeps_the_name_given(hub, world):
    hub.add_base(world / "llama", name="tiny1")
    hub.add(world / "a", name="sql", base=world / "llama")
    assert [b.name for b in hub.bases()] == ["tiny1"]
    assert hub.check("sql", base="tiny1").status == "exact"


@pytest.mark.parametrize("name", ["", "bad name/../x", "x" * 300, "a b"])
def test_base_names_follow_the_name_rules(hub, world, name):
    with pytest.raises(lorahub.InvalidReference, match="invalid name"):
        hub.add_base(world / "llama", name=name)
    assert hub.bases() == []


def test_base_rm_forgets_the_record_and_keeps_the_adapters(run, world):
    run("base", "add", world / "llama", "-n", "tiny")
    run("add", world / "a", "-n", "sql", "--base", "tiny")
    assert "no recorded base matches" in run("base", "rm", "nope", code=1).stderr
    assert "removed base tiny" in run("base", "rm", "tiny").stdout
    assert json.loads(run("base", "ls", "--json").stdout) == []
    shown = json.loads(run("show", "sql", "--json").stdout)
    assert shown["base"]["content_hash"].startswith("xxh128:")  # the adapter kept its record
    assert run("check", "sql", "--base", world / "llama").stdout.startswith("exact")


def test_rm_with_a_base_removes_only_the_variant_made_for_it(hub, world):
    made = hub.add(world / "a", name="n", base=world / "llama").adapter
    with pytest.raises(lorahub.AdapterNotFound, match="no variant recorded for"):
        hub.remove("n", base=world / "llama-instruct")  # fits, but was made for llama
    assert hub.get("n").digest == made.digest
    assert hub.remove("n", base=world / "llama") == ["n:latest"]


def test_a_path_with_base_is_not_added_by_show_or_rm(hub, world):
    for call in (hub.get, hub.remove):
        with pytest.raises(lorahub.InvalidReference, match="is a path"):
            call(str(world / "a"), base=world / "llama")
    assert hub.list_adapters() == []


def _fitting_adapter(path, seed):
    """A q_proj adapter for the tiny Llama (made without the base: its record is unverified)."""
    return peft_adapter(tiny_llama(), path, seed=seed, r=2, lora_alpha=4, target_modules=["q_proj"])


def test_a_composition_under_a_used_name_replaces_it(run, tmp_path, world):
    _fitting_adapter(tmp_path / "x", seed=3)
    run("add", world / "a", "-n", "rs:v1", "--base", world / "llama")
    run("add", tmp_path / "x", "-n", "x:v1")  # no --base: recorded unverified
    composed = json.loads(run("compose", "rs:v1", "x:v1", "-n", "rs:v1", "--json").stdout)
    digest = composed["adapter"]["digest"]
    # Every command that takes the name finds the one composition, not an ambiguous pair.
    assert json.loads(run("show", "rs:v1", "--json").stdout)["digest"] == digest
    again = json.loads(run("compose", "rs:v1", "x:v1", "--json").stdout)
    assert again["adapter"]["provenance"]["parents"][0] == digest
    assert run("resolve", "rs:v1", "--base", world / "llama").stdout.startswith(digest)
    listed = json.loads(run("ls", "--json", "-f", "name=rs").stdout)
    assert [a["digest"] for a in listed] == [digest]
    run("rm", "rs:v1", "-y")
    assert "no adapter matches" in run("show", "rs:v1", code=1).stderr


def test_variants_for_bases_of_one_architecture(hub, world, tmp_path):
    """Llama and its Instruct model share a signature: verified adapters for each stay two
    variants; one known only by that signature stands for both and takes both places."""
    for_llama = hub.add(world / "a", name="sql", base=world / "llama").adapter
    for_instruct = hub.add(world / "a", name="sql", base=world / "llama-instruct").adapter
    assert for_llama.base.signature == for_instruct.base.signature
    assert for_llama.digest != for_instruct.digest
    with pytest.raises(lorahub.AmbiguousReference):
        hub.get("sql")
    assert hub.resolve("sql", base=world / "llama").digest == for_llama.digest
    assert hub.resolve("sql", base=world / "llama-instruct").digest == for_instruct.digest
    # Adding the same adapter for llama again moves nothing.
    hub.add(world / "a", name="sql", base=world / "llama")
    assert hub.resolve("sql", base=world / "llama-instruct").match == "exact"

    # A composition of the two is for the architecture, not for either model: it replaces both.
    both = hub.compose(["@" + for_llama.digest, "@" + for_instruct.digest], name="sql").adapter
    assert both.base.signature == for_llama.base.signature and both.base.content_hash is None
    assert hub.get("sql").digest == both.digest
    # And a variant for one of them replaces it in turn, never leaving two for one base.
    again = hub.add(world / "a", name="sql", base=world / "llama").adapter
    assert hub.get("sql").digest == again.digest == for_llama.digest


def test_tag_slots_by_base_fingerprint(hub, world):
    """The rules of set_ref, base by base: same content, or a signature-only record of the
    same architecture, is one slot; other content or another architecture is another."""
    from lorahub.manifest import BaseRef

    adapter = hub.load_info(hub.add(world / "a").adapter)
    sig, other_sig = "xxh128:" + "1" * 32, "xxh128:" + "2" * 32
    h1, h2, h3 = ("xxh128:" + c * 32 for c in "abc")

    def put(base: BaseRef) -> str:
        info, _ = hub.store(adapter, name="n", origin_kind="import", origin={}, base=base)
        return info.digest

    def held() -> set[str]:
        return {i.digest for i in hub.list_adapters(["name=n"])}

    one = put(BaseRef("llama", None, sig, h1))
    two = put(BaseRef("instruct", None, sig, h2))
    assert held() == {one, two}  # same architecture, different content: two variants
    wide = put(BaseRef("wide", None, other_sig, h3))
    assert held() == {one, two, wide}  # another architecture: a third
    generic = put(BaseRef(None, None, sig))
    assert held() == {generic, wide}  # signature only: takes the place of both of its kind
    back = put(BaseRef("llama", None, sig, h1))
    assert held() == {back, wide}  # and gives it back to a content-verified one
    plain = put(BaseRef("tiny/llama"))
    assert held() == {plain}  # unverified: a plain tag move over every variant
