"""``--force`` replaces only lorahub's own earlier output (issue 10, item 2 and finding 15).

Each refusal is checked to leave every byte where it was; each replacement to leave the new
output complete and nothing beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from factories import cli_runner, peft_adapter, tiny_llama
from safetensors.torch import load_file

import lorahub
import lorahub.merge.writer
from lorahub import fsutil
from lorahub.errors import MergeError, OutputConflict, StoreError
from lorahub.formats.lorahub_json import read as read_lorahub_json
from lorahub.outputs import EXPORT_FILES, check_output


@pytest.fixture
def run(run, world):
    """The CLI on the shared store, which holds the world's ``a`` as rs:v1, ``b`` as other:v1."""
    run("add", world / "a", "-n", "rs:v1")
    run("add", world / "b", "-n", "other:v1")
    return run


@pytest.fixture
def hub(hub, world):
    """The shared store, holding the world's ``a`` as rs:v1 and ``b`` as other:v1."""
    hub.add(world / "a", name="rs:v1")
    hub.add(world / "b", name="other:v1")
    return hub


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` (links not followed) with a hash of its bytes or its kind."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def litter(parent: Path) -> list[str]:
    """Leftovers of replaced or partial outputs (the merged cache's own ``.locks`` is none)."""
    names = (n for n in os.listdir(parent) if n != ".locks")
    return sorted(n for n in names if ".old-" in n or ".partial-" in n or n[0] == ".")


# ---------------------------------------------------------------------------------------------
# The reproductions of issue 10, finding 2


def test_merge_onto_its_base_is_refused_and_the_base_is_intact(run, world, tmp_path, monkeypatch):
    shutil.copytree(world / "llama", tmp_path / "basecopy")
    before = tree(tmp_path / "basecopy")
    monkeypatch.chdir(tmp_path)
    res = run("merge", "./basecopy", "rs:v1", "-o", "./basecopy", "--force", code=1)
    assert "is the base model of this merge" in res.stderr and "Traceback" not in res.output
    assert tree(tmp_path / "basecopy") == before and litter(tmp_path) == []


def test_merge_to_the_current_directory_is_refused(run, world, tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    shutil.copytree(world / "llama", proj / "basecopy")
    (proj / "notes.txt").write_text("mine")
    before = tree(proj)
    monkeypatch.chdir(proj)
    res = run("merge", "./basecopy", "rs:v1", "-o", ".", "--force", code=1)
    assert "is the current directory" in res.stderr
    assert tree(proj) == before and litter(tmp_path) == [] and litter(proj) == []


def test_a_parent_of_the_current_directory_is_refused(run, world, tmp_path, monkeypatch):
    (tmp_path / "proj" / "sub").mkdir(parents=True)
    (tmp_path / "proj" / "lorahub.json").write_text("{}")
    before = tree(tmp_path / "proj")
    monkeypatch.chdir(tmp_path / "proj" / "sub")
    res = run("merge", world / "llama", "rs:v1", "-o", "..", "--force", code=1)
    assert "holds the current directory" in res.stderr
    res = run("export", "rs:v1", "..", "--force", code=1)
    assert "holds the current directory" in res.stderr
    assert tree(tmp_path / "proj") == before


def test_export_force_onto_unrelated_files_is_refused_and_they_stay(run, tmp_path):
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "notes.txt").write_text("mine")
    (proj / "src" / "main.py").write_text("print(1)")
    before = tree(proj)
    res = run("export", "rs:v1", proj, "--force", code=1)
    assert "has no lorahub.json" in res.stderr and "Remove it yourself" in res.stderr
    # Even beside a lorahub.json, files lorahub did not write keep the folder safe.
    run("export", "rs:v1", tmp_path / "out")
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "out" / "src").mkdir()
    res = run("export", "other:v1", tmp_path / "out", "--force", code=1)
    assert "holds files lorahub did not write: notes.txt, src" in res.stderr
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert tree(proj) == before and litter(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Refusals of the rule


def test_an_adapter_folder_given_to_merge_is_refused_before_it_is_added(hub, world, tmp_path):
    ad = tmp_path / "x" / "ad"
    peft_adapter(tiny_llama(), ad, seed=5, r=2, target_modules=["v_proj"])
    # Even dressed as a lorahub output, an input is never replaced.
    (ad / "lorahub.json").write_text(json.dumps({"files": sorted(os.listdir(ad))}))
    before, count = tree(ad), len(hub.list_adapters())
    with pytest.raises(MergeError, match="is an adapter of this merge"):
        hub.merge(world / "llama", str(ad), out=ad, force=True)
    with pytest.raises(MergeError, match=r"holds an adapter of this merge"):
        hub.merge(world / "llama", str(ad), out=ad.parent, force=True)
    assert tree(ad) == before and len(hub.list_adapters()) == count


def test_a_folder_holding_the_base_is_refused(hub, world, tmp_path):
    shutil.copytree(world / "llama", tmp_path / "proj" / "base")
    (tmp_path / "proj" / "lorahub.json").write_text("{}")
    before = tree(tmp_path / "proj")
    with pytest.raises(MergeError, match="holds the base model of this merge"):
        hub.merge(tmp_path / "proj" / "base", "rs:v1", out=tmp_path / "proj", force=True)
    with pytest.raises(StoreError, match="holds the base model of this export"):
        hub.export("rs:v1", tmp_path / "proj", force=True, base=tmp_path / "proj" / "base")
    assert tree(tmp_path / "proj") == before


def test_the_store_is_refused(run, store_home, world, tmp_path):
    before = tree(store_home / "blobs"), run("ls", "-q").stdout
    for out in (store_home, store_home / "merged", tmp_path):
        res = run("merge", world / "llama", "rs:v1", "-o", out, "--force", code=1)
        assert "overlaps the lorahub store" in res.stderr
        res = run("export", "rs:v1", out, "--force", code=1)
        assert "overlaps the lorahub store" in res.stderr
    assert (tree(store_home / "blobs"), run("ls", "-q").stdout) == before


def test_a_file_at_the_output_is_refused(hub, world, tmp_path):
    (tmp_path / "out").write_text("mine")
    with pytest.raises(MergeError, match="is not a folder"):
        hub.merge(world / "llama", "rs:v1", out=tmp_path / "out", force=True)
    with pytest.raises(StoreError, match="is not a folder"):
        hub.export("rs:v1", tmp_path / "out", force=True)
    assert (tmp_path / "out").read_text() == "mine"


@pytest.mark.parametrize("what", ["merge", "export"])
def test_a_symlinked_output_is_refused_and_its_target_untouched(hub, world, tmp_path, what):
    tmp_path = tmp_path / "w"  # apart from the store, whose database may change
    target = tmp_path / "real"
    hub.export("rs:v1", target)  # a replaceable lorahub output, so only the link stops it
    (tmp_path / "out").symlink_to(target)
    before = tree(tmp_path)
    with pytest.raises((MergeError, StoreError), match="is a symbolic link to") as err:
        if what == "merge":
            hub.merge(world / "llama", "other:v1", out=tmp_path / "out", force=True)
        else:
            hub.export("other:v1", tmp_path / "out", force=True)
    assert f"give the target path ({target})" in str(err.value)
    assert tree(tmp_path) == before and litter(tmp_path) == []
    # A dangling link is refused too, not written through.
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(StoreError, match="is a symbolic link"):
        hub.export("rs:v1", tmp_path / "dangling", force=True)
    assert not (tmp_path / "nowhere").exists() and litter(tmp_path) == []


def test_without_force_the_message_says_whether_force_would_help(hub, tmp_path):
    hub.export("rs:v1", tmp_path / "out")
    with pytest.raises(StoreError, match=r"an earlier lorahub output.*pass --force"):
        hub.export("rs:v1", tmp_path / "out")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("x")
    with pytest.raises(StoreError, match="--force does not change that"):
        hub.export("rs:v1", tmp_path / "mine")


@pytest.mark.parametrize(
    "doc",
    [{"hello": 1}, {"base": {}, "tensors": 3, "files": "model.safetensors"}, [1, 2], "not json"],
    ids=["unrelated", "malformed-files", "not-a-dict", "not-json"],
)
def test_a_lorahub_json_lorahub_did_not_write_is_no_licence(hub, tmp_path, doc):
    out = tmp_path / "out"
    out.mkdir()
    text = doc if isinstance(doc, str) else json.dumps(doc)
    (out / "lorahub.json").write_text(text)
    (out / "model.safetensors").write_text("mine")
    with pytest.raises(StoreError, match="Remove it yourself"):
        hub.export("rs:v1", out, force=True)
    assert (out / "model.safetensors").read_text() == "mine"


def test_a_recorded_name_that_is_now_a_folder_or_link_is_not_replaced(hub, tmp_path):
    out = tmp_path / "out"
    hub.export("rs:v1", out)
    (out / "README.md").unlink()
    (out / "README.md").mkdir()
    (out / "README.md" / "draft.txt").write_text("mine")
    with pytest.raises(StoreError, match=r"did not write: README\.md"):
        hub.export("rs:v1", out, force=True)
    shutil.rmtree(out / "README.md")
    (out / "README.md").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StoreError, match=r"did not write: README\.md"):
        hub.export("rs:v1", out, force=True)


# ---------------------------------------------------------------------------------------------
# What --force does replace


def test_force_replaces_an_earlier_merge_in_one_step(hub, world, tmp_path, monkeypatch):
    out = tmp_path / "m"
    hub.merge(world / "llama", "rs:v1", out=out, device="cpu")
    first = load_file(out / "model.safetensors")
    meta = json.loads((out / "lorahub.json").read_text())
    assert sorted(os.listdir(out)) == meta["files"]  # every file it wrote, nothing else

    swaps = []
    real = fsutil._exchange

    def spy(a, b):
        complete = (Path(a) / "lorahub.json").is_file() and (Path(b) / "lorahub.json").is_file()
        done = real(a, b)
        swaps.append((Path(b), complete, done))
        return done

    monkeypatch.setattr(fsutil, "_exchange", spy)
    hub.merge(world / "llama", "rs:v1", [0.5], out=out, device="cpu", force=True)
    # Swapped with the complete new tree in one rename where the filesystem can (Linux).
    assert swaps and swaps[0][:2] == (out, True)
    second = load_file(out / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    base = load_file(world / "llama" / "model.safetensors")[key].double()
    # Half the weight gives exactly half the delta (float32 output, float64 check).
    delta1, delta2 = first[key].double() - base, second[key].double() - base
    assert (delta2 - 0.5 * delta1).abs().max() < 1e-6 and delta1.abs().max() > 1e-3
    assert json.loads((out / "lorahub.json").read_text())["weights"] == [0.5]
    assert litter(tmp_path) == []


def test_a_failed_replacement_leaves_the_earlier_output_whole(hub, world, tmp_path, monkeypatch):
    out = tmp_path / "m"
    hub.merge(world / "llama", "rs:v1", out=out, device="cpu")
    before = tree(out)

    def broken(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(lorahub.merge.writer, "_write_checkpoint", broken)
    with pytest.raises(MergeError, match="Input/output error"):
        hub.merge(world / "llama", "other:v1", out=out, device="cpu", force=True)
    assert tree(out) == before and litter(tmp_path) == []


def test_files_that_appear_during_a_merge_are_not_deleted(hub, world, tmp_path, monkeypatch):
    out = tmp_path / "m"
    hub.merge(world / "llama", "rs:v1", out=out, device="cpu")
    real = lorahub.merge.writer._write_checkpoint

    def meanwhile(*args, **kwargs):
        written = real(*args, **kwargs)
        (out / "notes.txt").write_text("written while the merge ran")
        return written

    monkeypatch.setattr(lorahub.merge.writer, "_write_checkpoint", meanwhile)
    with pytest.raises(MergeError, match=r"did not write: notes\.txt"):
        hub.merge(world / "llama", "other:v1", out=out, device="cpu", force=True)
    assert (out / "notes.txt").is_file() and litter(tmp_path) == []


def test_a_destination_that_appears_during_an_export_is_an_output_conflict(
    hub, tmp_path, monkeypatch
):
    import lorahub.export

    out = tmp_path / "out"
    real = lorahub.export.write_peft_folder

    def meanwhile(*args, **kwargs):
        real(*args, **kwargs)
        out.mkdir()
        (out / "notes.txt").write_text("written while the export ran")

    monkeypatch.setattr(lorahub.export, "write_peft_folder", meanwhile)
    with pytest.raises(StoreError, match=r"already exists and has no lorahub\.json") as err:
        hub.export("rs:v1", out)
    assert type(err.value) is OutputConflict and err.value.target == os.fspath(out)
    assert os.listdir(out) == ["notes.txt"] and litter(tmp_path) == []


def test_the_export_file_list_is_the_peft_folder_writers():
    from lorahub.formats import lorahub_json, peft, peft_folder

    assert peft_folder.FILES is EXPORT_FILES
    assert EXPORT_FILES == (peft.CONFIG, peft.SAFETENSORS, "README.md", lorahub_json.FILENAME)


def test_force_replaces_an_earlier_export(hub, world, tmp_path):
    out = tmp_path / "out"
    hub.export("rs:v1", out)
    doc = json.loads((out / "lorahub.json").read_text())
    assert sorted(os.listdir(out)) == doc["files"] == sorted(EXPORT_FILES)
    cli_runner(hub.home)("export", "other:v1", out, "--force")
    digest, _ = read_lorahub_json(out / "lorahub.json", "export")
    assert digest == hub.get("other:v1").digest and litter(tmp_path) == []
    # A merge may replace an export, and an export a merge: both are lorahub's outputs.
    hub.merge(world / "llama", "rs:v1", out=out, device="cpu", force=True)
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    hub.export("rs:v1", out, force=True)
    assert sorted(os.listdir(out)) == sorted(EXPORT_FILES) and litter(tmp_path) == []


def test_the_file_list_changes_neither_the_digest_nor_pull(hub, tmp_path):
    hub.export("rs:v1", tmp_path / "out")
    digest, manifest = read_lorahub_json(tmp_path / "out" / "lorahub.json", "export")
    assert digest == hub.get("rs:v1").digest == str(lorahub.manifest.digest_of(manifest))


def test_an_empty_folder_is_filled_without_force(hub, world, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "e").mkdir()
    hub.merge(world / "llama", "rs:v1", out=tmp_path / "m", device="cpu")
    hub.export("rs:v1", tmp_path / "e")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path / "e")) == sorted(EXPORT_FILES)
    assert litter(tmp_path) == []


def test_outputs_of_an_older_lorahub_are_recognised_by_their_fixed_files(hub, world, tmp_path):
    exp, mer = tmp_path / "e", tmp_path / "m"
    hub.export("rs:v1", exp)
    hub.merge(world / "llama", "rs:v1", out=mer, device="cpu")
    for folder in (exp, mer):
        doc = json.loads((folder / "lorahub.json").read_text())
        del doc["files"]  # as written before outputs listed their files
        (folder / "lorahub.json").write_text(json.dumps(doc))
    (mer / "README.md").unlink()  # nor did merges write a card then
    hub.export("other:v1", exp, force=True)
    hub.merge(world / "llama", "other:v1", out=mer, device="cpu", force=True)
    assert read_lorahub_json(exp / "lorahub.json", "e")[0] == hub.get("other:v1").digest
    assert json.loads((mer / "lorahub.json").read_text())["adapters"][0]["refs"] == ["other:v1"]
    for folder in (exp, mer):
        doc = json.loads((folder / "lorahub.json").read_text())
        del doc["files"]
        (folder / "lorahub.json").write_text(json.dumps(doc))
        (folder / "train.py").write_text("mine")
    (mer / "README.md").unlink()
    with pytest.raises(StoreError, match=r"did not write: train\.py"):
        hub.export("rs:v1", exp, force=True)
    with pytest.raises(MergeError, match=r"did not write: train\.py"):
        hub.merge(world / "llama", "rs:v1", out=mer, device="cpu", force=True)
    assert (exp / "train.py").is_file() and (mer / "train.py").is_file()


def test_the_merged_cache_rebuilds_an_entry_its_catalog_lost(hub, world):
    from lorahub.catalog import db
    from lorahub.catalog import merged as merged_q

    path = hub.merged(world / "llama", "rs:v1", device="cpu")
    (entry,) = hub.merged_list()
    with db.write_session(hub.engine) as s:
        s.delete(merged_q.get(s, entry.key))
    assert hub.merged(world / "llama", "rs:v1", device="cpu") == path
    assert [e.key for e in hub.merged_list()] == [entry.key]
    assert (path / "model.safetensors").is_file() and litter(path.parent) == []


# ---------------------------------------------------------------------------------------------
# The pieces


def test_publish_dir_never_replaces_or_follows_a_link(tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "keep.txt").write_text("mine")
    (tmp_path / "out").symlink_to(tmp_path / "target")
    (tmp_path / "file").write_text("mine")
    for out in (tmp_path / "out", tmp_path / "file"):
        (tmp_path / "tmp").mkdir()
        for replace in (True, False):
            with pytest.raises(FileExistsError):
                fsutil.publish_dir(tmp_path / "tmp", out, replace=replace)
        shutil.rmtree(tmp_path / "tmp")
    assert os.readlink(tmp_path / "out") == str(tmp_path / "target")
    assert (tmp_path / "target" / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["file", "out", "target"]


def test_publish_dir_puts_back_a_link_that_took_the_folders_place(tmp_path, monkeypatch):
    """The two-rename fallback: a folder swapped for a link after the checks is moved back."""
    monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)
    (tmp_path / "target").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "tmp").mkdir()
    real_rename = os.rename

    def racing(a, b):
        if Path(a) == tmp_path / "out" and not Path(a).is_symlink():
            os.rmdir(a)
            os.symlink(tmp_path / "target", a)  # an attacker wins the race
        return real_rename(a, b)

    monkeypatch.setattr(fsutil.os, "rename", racing)
    with pytest.raises(FileExistsError, match="symbolic link"):
        fsutil.publish_dir(tmp_path / "tmp", tmp_path / "out", replace=True)
    assert os.readlink(tmp_path / "out") == str(tmp_path / "target")
    assert sorted(os.listdir(tmp_path)) == ["out", "target", "tmp"]


def test_check_output_answers_whether_there_is_something_to_replace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_output(tmp_path / "new", force=False, kind="merge") is False
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", force=False, kind="merge") is True
    with pytest.raises(MergeError, match="current directory"):
        check_output(tmp_path, force=True, kind="merge")
    with pytest.raises(MergeError, match="current directory"):
        check_output(Path("."), force=False, kind="merge")
