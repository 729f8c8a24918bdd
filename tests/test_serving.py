"""``export --layout vllm``: the folder vLLM's filesystem LoRA resolver and LoRAX read, kept in
step with the store; and ``show``'s serving hints."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from factories import peft_adapter, tiny_llama

from lorahub.digest import Digest

SERVED = "my-org/tiny-llama"
FILES = {"adapter_config.json", "adapter_model.safetensors", ".lorahub-serving.json"}


def vllm_resolves(cache_dir: Path, base_model_name: str, lora_name: str) -> Path | None:
    """The folder vLLM's filesystem resolver would hand to its LoRA loader, or None.

    Re-implemented from vllm-project/vllm ``vllm/plugins/lora_resolvers/filesystem_resolver.py``
    (``FilesystemResolver._resolve_lora_path`` and ``_get_lora_req_from_path``): the name is
    not absolute; ``realpath(cache_dir/name)`` stays under ``realpath(cache_dir)``; the folder
    exists and holds ``adapter_config.json``; its ``peft_type`` is ``"LORA"`` and its
    ``base_model_name_or_path`` equals the model vLLM serves (``model_config.model``, the
    ``--model`` it was started with).
    """
    if os.path.isabs(lora_name):
        return None
    root = os.path.realpath(cache_dir)
    path = os.path.realpath(os.path.join(root, lora_name))
    if os.path.commonpath([root, path]) != root or not os.path.exists(path):
        return None
    config_path = os.path.join(path, "adapter_config.json")
    if not os.path.exists(config_path):
        return None
    with open(config_path) as f:
        config = json.load(f)
    if config["peft_type"] == "LORA" and config["base_model_name_or_path"] == base_model_name:
        return Path(path)
    return None


def _snapshot(out: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every folder and file below ``out``, links not followed."""
    found = {".": (os.lstat(out).st_ino, os.lstat(out).st_mtime_ns)}
    for p in sorted(out.rglob("*")):
        st = os.lstat(p)
        found[str(p.relative_to(out))] = (st.st_ino, st.st_mtime_ns)
    return found


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def served(world, run, tmp_path):
    """A store with two adapters that fit the tiny Llama (``sql:v1``, also ``sql:latest``,
    and ``org/tone``) and one that does not (``wide``), and the base recorded."""
    run("add", world / "a", "--name", "sql:v1")
    run("tag", "sql:v1", "sql")
    run("add", world / "b", "--name", "org/tone")
    run("add", world / "wide-ad", "--name", "wide")
    run("base", "add", world / "llama", "--name", "tiny")
    return tmp_path / "loras"


def _export(run, out, *args, code=0):
    return run(
        "export",
        "--layout",
        "vllm",
        out,
        "--base",
        "tiny",
        "--served-model-id",
        SERVED,
        *args,
        code=code,
    )


def test_layout_holds_the_adapters_that_fit_and_vllm_resolves_each(served, run, world, hub):
    from peft import PeftModel

    res = _export(run, served)
    assert sorted(p.name for p in served.iterdir()) == ["org--tone", "sql", "sql@v1"]
    assert "wide" not in res.stdout
    assert "VLLM_LORA_RESOLVER_CACHE_DIR=" in res.stderr and "--max-lora-rank 8" in res.stderr

    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    plain = _logits(tiny_llama(), ids)
    for folder, ref in (("sql@v1", "sql:v1"), ("sql", "sql:latest"), ("org--tone", "org/tone")):
        path = vllm_resolves(served, SERVED, folder)
        assert path == (served / folder).resolve(), folder
        assert vllm_resolves(served, "another/model", folder) is None
        assert {p.name for p in path.iterdir()} == FILES
        # the weights are the store's blob, linked: no byte copy
        blob = hub.blobs.path(Digest.parse(hub.get(ref).weights_digest))
        assert os.stat(path / "adapter_model.safetensors").st_ino == os.stat(blob).st_ino
        # PEFT loads it and computes what the plain PEFT export computes
        exported = hub.export(ref, served.parent / f"peft-{folder}")
        want = _logits(PeftModel.from_pretrained(tiny_llama(), str(exported)).eval(), ids)
        got = _logits(PeftModel.from_pretrained(tiny_llama(), str(path)).eval(), ids)
        assert not torch.allclose(want, plain, atol=1e-4)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert vllm_resolves(served, SERVED, "wide") is None
    assert vllm_resolves(served, SERVED, "../loras/sql") is not None  # realpath stays inside
    assert vllm_resolves(served, SERVED, "/etc") is None


def test_rerun_touches_nothing_and_rm_removes_only_that_folder(served, run):
    _export(run, served)
    before = _snapshot(served)
    res = _export(run, served)
    assert _snapshot(served) == before
    assert [line.split()[0] for line in res.stdout.splitlines()] == ["unchanged"] * 3

    run("rm", "-y", "sql:v1")
    res = _export(run, served)
    after = _snapshot(served)
    assert "removed   sql@v1" in res.stdout
    assert sorted(p.name for p in served.iterdir()) == ["org--tone", "sql"]
    assert {k: v for k, v in before.items() if not k.startswith(("sql@v1", "."))} == {
        k: v for k, v in after.items() if k != "."
    }


def test_only_what_changed_is_rewritten(served, run):
    _export(run, served)
    before = _snapshot(served)
    run("tag", "sql:v1", "sql:prod")
    res = _export(run, served)
    assert "added     sql@prod  <- sql:prod" in res.stdout
    after = _snapshot(served)
    assert all(after[k] == v for k, v in before.items() if k != "."), "others untouched"

    # another served model id: every config changes, each folder is swapped in whole
    res = run("export", "--layout", "vllm", served, "--base", "tiny", "--served-model-id", "x/y")
    assert [line.split()[0] for line in res.stdout.splitlines()] == ["updated"] * 4
    assert vllm_resolves(served, "x/y", "sql@prod") is not None
    assert vllm_resolves(served, SERVED, "sql@prod") is None


def test_foreign_files_are_never_touched(served, run, world):
    served.mkdir()
    (served / "notes.txt").write_text("mine")
    (served / "mine").mkdir()
    (served / "mine" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (served / "sql").mkdir()  # a folder lorahub did not make, named like one it would
    (served / "sql" / "keep.bin").write_bytes(b"x")
    before = _snapshot(served)

    res = _export(run, served)
    assert "skipped sql: a folder lorahub did not make is in the way" in res.stderr
    after = _snapshot(served)
    assert {k: after[k] for k in before if k != "."} == {
        k: v for k, v in before.items() if k != "."
    }

    # a folder lorahub made that someone added a file to is kept when no longer served
    (served / "sql@v1" / "extra.txt").write_text("hand-made")
    run("rm", "-y", "sql:v1")
    res = _export(run, served)
    assert (served / "sql@v1" / "extra.txt").exists()
    assert "skipped sql@v1: no longer served" in res.stderr
    for name in ("notes.txt", "mine", "sql"):
        assert (served / name).exists()


def test_symlinks_where_hard_links_fail(served, run, monkeypatch, hub):
    from peft import PeftModel

    def no_link(src, dst, *args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    res = _export(run, served, "--json")
    doc = json.loads(res.stdout)
    assert {a["link"] for a in doc["adapters"]} == {"symlink"}
    weights = served / "sql@v1" / "adapter_model.safetensors"
    assert weights.is_symlink() and Path(os.readlink(weights)).is_absolute()
    PeftModel.from_pretrained(tiny_llama(), str(served / "sql@v1"))
    before = _snapshot(served)
    _export(run, served)
    assert _snapshot(served) == before


def test_json_quiet_references_and_usage(served, run):
    doc = json.loads(_export(run, served, "--json").stdout)
    assert doc["served_model_id"] == SERVED and doc["vllm_max_lora_rank"] == 8
    assert [a["folder"] for a in doc["adapters"]] == ["org--tone", "sql", "sql@v1"]
    quiet = _export(run, served, "-q").stdout.splitlines()  # -q: each folder's absolute path
    assert quiet == [str(served.absolute() / f) for f in ("org--tone", "sql", "sql@v1")]

    # given names: only those, and nothing removed
    other = served.parent / "only"
    res = run(
        "export",
        "--layout",
        "vllm",
        "sql:v1",
        other,
        "--base",
        "tiny",
        "--served-model-id",
        SERVED,
        "-q",
    )
    assert res.stdout.splitlines() == [str(other.absolute() / "sql@v1")]
    assert [p.name for p in other.iterdir()] == ["sql@v1"]
    res = run(
        "export",
        "--layout",
        "vllm",
        "wide",
        other,
        "--base",
        "tiny",
        "--served-model-id",
        SERVED,
        code=1,
    )
    assert "fits" in res.stderr
    res = run(
        "export",
        "--layout",
        "vllm",
        "@" + doc["adapters"][0]["digest"],
        other,
        "--base",
        "tiny",
        "--served-model-id",
        SERVED,
        code=2,
    )
    assert "name[:tag]" in res.stderr

    res = run("export", "--layout", "vllm", served, "--base", "tiny", code=2)
    assert "--served-model-id" in res.stderr
    run("export", "--layout", "vllm", served, "--base", "tiny", "--force", code=2)
    run("export", "sql:v1", "org/tone", served.parent / "x", code=2)


def test_show_prints_serving_hints(run, world, tmp_path):
    src = tmp_path / "patterned"
    peft_adapter(
        tiny_llama(),
        src,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 24},
    )
    run("add", src, "--name", "pat")
    out = run("show", "pat").stdout
    assert "--max-lora-rank 32 (vLLM); largest module rank 24" in out
    hints = json.loads(run("show", "pat", "--json").stdout)["serving"]
    assert hints == {"max_rank": 24, "vllm_max_lora_rank": 32, "warnings": []}

    run("add", world / "dora-ad", "--name", "dora")
    out = run("show", "dora").stdout
    assert "DoRA: vLLM refuses it" in out
    assert "LoRA on embeddings (model.embed_tokens" in out
    hints = json.loads(run("show", "dora", "--json").stdout)["serving"]
    assert hints["max_rank"] == 4 and hints["vllm_max_lora_rank"] == 8
    assert [w.split(" (")[0].split(":")[0] for w in hints["warnings"]] == [
        "DoRA",
        "whole tensors that replace the base's",  # PEFT saved the embedding layer whole
        "LoRA on embeddings",
    ]


def test_show_warns_for_modules_to_save_and_lm_head(run, tmp_path):
    src = tmp_path / "head"
    peft_adapter(
        tiny_llama(),
        src,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "lm_head"],
        modules_to_save=["embed_tokens"],
    )
    run("add", src, "--name", "head")
    warnings = json.loads(run("show", "head", "--json").stdout)["serving"]["warnings"]
    assert any(w.startswith("modules_to_save (") for w in warnings), warnings
    assert any(w.startswith("LoRA on the output head (lm_head)") for w in warnings), warnings


def test_served_model_id_defaults_to_the_base_repo_id(world, run, tmp_path, monkeypatch):
    """A base recorded by Hub repo id (here from the local Hugging Face cache, offline), the
    only one recorded: neither --base nor --served-model-id is needed."""
    hf_home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    storage = hf_home / "hub" / "models--tiny-org--llama"
    snap = storage / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for f in (world / "llama").iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text("a" * 40)
    run("base", "add", "tiny-org/llama")
    run("add", world / "a", "--name", "sql")

    out = tmp_path / "loras"
    doc = json.loads(run("export", "--layout", "vllm", out, "--json").stdout)
    assert doc["served_model_id"] == "tiny-org/llama"
    assert vllm_resolves(out, "tiny-org/llama", "sql") == (out / "sql").resolve()


def test_a_marker_listing_a_users_file_never_gets_that_file_deleted(served, run):
    """The marker is a file anyone can edit: which files are lorahub's is decided by what
    serving writes, not by the marker's own ``files`` list."""
    _export(run, served)
    folder = served / "sql@v1"
    marker = folder / ".lorahub-serving.json"
    doc = json.loads(marker.read_text())
    doc["files"] = [*doc["files"], "notes.md"]
    marker.write_text(json.dumps(doc))
    (folder / "notes.md").write_text("mine")

    run("rm", "-y", "sql:v1")
    res = _export(run, served)
    assert (folder / "notes.md").read_text() == "mine"
    assert "skipped sql@v1: no longer served" in res.stderr
    assert "removed   sql@v1" not in res.stdout
