"""Friendlier answers (issue 12, item 6), through the real CLI: a missing tag lists the tags
the name has, gc says what its grace period kept, per-module ranks are shown and filtered
on, and `show --metadata` warns where a header's rank or alpha disagrees with the config."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from factories import peft_adapter, tiny_clip, tiny_llama, write_peft_adapter
from safetensors.torch import save_file

# Runs one CLI command in a fresh process (a backfilled store is read through the standard
# library's sqlite3 there) and says on stderr whether SQLAlchemy was imported.
PROBE = """
import sys
from lorahub.cli import main
sys.argv = ["lorahub", *sys.argv[1:]]
code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code or 0
print("sqlalchemy imported: " + str("sqlalchemy" in sys.modules), file=sys.stderr)
sys.exit(code)
"""


def _fresh_process(home: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROBE, "--home", str(home), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


# ------------------------------------------------------------------------- tag hints


def _says_tags(text: str, ref: str, tags: list[str], *, bare: bool) -> None:
    assert f"no adapter matches {ref!r}" in text, text
    for tag in tags:
        assert f"llama-sql:{tag}" in text, text
    assert ("a bare name means 'llama-sql:latest'" in text) is bare, text


def test_a_missing_tag_lists_the_tags_on_the_plain_sqlite_path(run, store_home, tmp_path):
    run("add", write_peft_adapter(tmp_path / "a", seed=1), "--name", "llama-sql:v1")
    run("add", write_peft_adapter(tmp_path / "b", seed=2), "--name", "llama-sql:v2")
    run("add", write_peft_adapter(tmp_path / "c", seed=3), "--name", "other:latest")

    res = _fresh_process(store_home, "show", "llama-sql", cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip().endswith("sqlalchemy imported: False"), res.stderr
    _says_tags(res.stderr, "llama-sql", ["v1", "v2"], bare=True)
    assert "other" not in res.stderr  # only the tags of the name asked for
    # The newest tag is the one suggested.
    assert "e.g. `llama-sql:v2`" in res.stderr

    res = _fresh_process(store_home, "show", "llama-sql:v9", cwd=tmp_path)
    assert res.returncode == 1
    _says_tags(res.stderr, "llama-sql:v9", ["v1", "v2"], bare=False)

    # A name with no tag at all keeps the plain answer.
    res = _fresh_process(store_home, "show", "nothing-here", cwd=tmp_path)
    assert res.returncode == 1
    assert "no adapter matches 'nothing-here'; see `lorahub ls`" in res.stderr
    assert "has tag(s)" not in res.stderr


def test_a_missing_tag_lists_the_tags_through_sqlalchemy(
    run, store_home, tmp_path, world, monkeypatch
):
    run("add", write_peft_adapter(tmp_path / "a", seed=1), "--name", "llama-sql:v1")
    # The same catalog through SQLAlchemy's engine, as any other database is read.
    monkeypatch.setenv("LORAHUB_DATABASE_URL", f"sqlite:///{store_home / 'lorahub.db'}")
    res = run("show", "llama-sql", code=1)
    _says_tags(res.stderr, "llama-sql", ["v1"], bare=True)
    monkeypatch.delenv("LORAHUB_DATABASE_URL")

    # `tag` resolves in its write session (the ORM's queries.resolve_one), `rm` first through
    # the plain reads, `resolve` in the resolver that picks a base's variant.
    res = run("tag", "llama-sql", "llama-sql:prod", code=1)
    _says_tags(res.stderr, "llama-sql", ["v1"], bare=True)
    res = run("rm", "-y", "llama-sql:v2", code=1)
    _says_tags(res.stderr, "llama-sql:v2", ["v1"], bare=False)
    res = run("resolve", "llama-sql", "--base", world / "llama", code=1)
    _says_tags(res.stderr, "llama-sql", ["v1"], bare=True)
    # The suggestion works as given.
    assert run("show", "llama-sql:v1", "-q").stdout.strip().startswith("@xxh128:")


# ------------------------------------------------------------------------- gc grace


def test_gc_says_what_the_grace_period_kept_and_grace_0_frees_it(run, tmp_path):
    run("add", write_peft_adapter(tmp_path / "a", seed=1), "--name", "gone:v1")
    kept = json.loads(run("show", "gone:v1", "--json").stdout)
    run("add", write_peft_adapter(tmp_path / "b", seed=2), "--name", "stays:v1")
    run("rm", "-y", "gone:v1")

    res = run("gc")
    assert "freed 0 B" in res.stdout
    assert "kept 1 unused blob(s)" in res.stderr and "1h grace period" in res.stderr
    assert "`lorahub gc --grace 0`" in res.stderr

    report = json.loads(run("gc", "--json").stdout)
    assert report["kept_blobs"] == [kept["weights_digest"]]
    assert report["kept_bytes"] == kept["size"] > 0
    assert report["grace"] == 3600 and report["bytes_freed"] == 0

    dry = run("gc", "--dry-run", "--grace", "30m")
    assert "would keep 1 unused blob(s)" in dry.stderr and "30m grace period" in dry.stderr

    freed = json.loads(run("gc", "--grace", "0", "--json").stdout)
    assert freed["blobs"] == [kept["weights_digest"]]
    assert freed["bytes_freed"] == kept["size"]
    assert freed["kept_blobs"] == [] and freed["kept_bytes"] == 0
    res = run("gc")
    assert "grace period" not in res.stderr  # nothing left to keep
    assert run("show", "stays:v1", "-q").stdout.startswith("@")


# ------------------------------------------------------------------------- ranks


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """A real PEFT save whose v_proj modules have rank 8 and q_proj rank 4 (rank_pattern)."""
    out = tmp_path / "mixed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_adapter(
            tiny_llama(),
            out,
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={"v_proj": 8},
        )
    return out


def _ranks_by_ref(listing: str) -> dict[str, dict[str, int]]:
    return {a["refs"][0]: a["ranks"] for a in json.loads(listing)}


def test_per_module_ranks_are_shown_and_filtered_on(run, store_home, tmp_path, mixed, monkeypatch):
    run("add", mixed, "--name", "mixed:v1")
    run("add", write_peft_adapter(tmp_path / "plain", r=4), "--name", "plain:v1")

    for path in ("sqlite3", "engine"):
        if path == "engine":
            monkeypatch.setenv("LORAHUB_DATABASE_URL", f"sqlite:///{store_home / 'lorahub.db'}")
        listed = _ranks_by_ref(run("ls", "--json").stdout)
        assert listed == {"mixed:v1": {"4": 2, "8": 2}, "plain:v1": {"4": 4}}, path
        assert _ranks_by_ref(run("ls", "--json", "--filter", "rank=8").stdout).keys() == {
            "mixed:v1"
        }
        assert _ranks_by_ref(run("ls", "--json", "-f", "rank=4").stdout).keys() == {
            "mixed:v1",
            "plain:v1",
        }
        assert run("ls", "-q", "-f", "rank=16").stdout == ""
        # Another filter still applies with it.
        assert run("ls", "-q", "-f", "rank=8", "-f", "name=plain").stdout == ""
        assert json.loads(run("show", "mixed:v1", "--json").stdout)["ranks"] == {"4": 2, "8": 2}
    monkeypatch.delenv("LORAHUB_DATABASE_URL")

    shown = run("show", "mixed:v1").stdout
    assert "4 (r; modules: 2 of rank 4, 2 of rank 8)" in shown
    assert (
        "rank" in run("show", "plain:v1").stdout and "of rank" not in run("show", "plain:v1").stdout
    )
    table = run("ls", "-f", "rank=8").stdout
    assert "mixed:v1" in table and "4,8" in table
    # The record written through the ORM (tag) carries them too.
    assert json.loads(run("tag", "mixed:v1", "mixed:prod", "--json").stdout)["ranks"] == {
        "4": 2,
        "8": 2,
    }
    assert "rank=N matches an adapter any of whose modules" in " ".join(
        run("ls", "--help").stdout.split()
    )


# ------------------------------------------------------------------------- metadata

# Two text-encoder modules of each layer, rank 4, alpha 2 in the weights (the .alpha keys).
TE_MODULES = [f"encoder.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


@pytest.fixture
def clip_base(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    state = {k: v.contiguous() for k, v in tiny_clip().state_dict().items()}
    base = tmp_path / "clip"
    base.mkdir()
    save_file(state, str(base / "model.safetensors"))
    return base, state


def _kohya_file(
    path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str], seed: int = 3
) -> Path:
    """A kohya (sd-scripts) text-encoder LoRA: rank 4, ``.alpha`` 2 in every module."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in TE_MODULES:
        # transformers 5 dropped CLIPTextModel's ``text_model.`` level; kohya names keep it.
        w = state.get(f"text_model.{name}.weight", state.get(f"{name}.weight"))
        assert w is not None
        key = f"lora_te_text_model_{name.replace('.', '_')}"
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, w.shape[1], generator=g)
        tensors[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], 4, generator=g)
        tensors[f"{key}.alpha"] = torch.tensor(2.0, dtype=torch.float16)
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_show_metadata_warns_when_the_header_alpha_disagrees(run, tmp_path, clip_base):
    base, state = clip_base
    header = {
        "ss_network_dim": "4",
        "ss_network_alpha": "8",  # the weights' .alpha say 2
        "ss_output_name": "style",
        "ss_tag_frequency": json.dumps({"tags": {f"t{i}": i for i in range(200)}}),
    }
    path = _kohya_file(tmp_path / "style.safetensors", state, header)
    run("add", path, "--base", base, "--name", "style:v1")

    plain = run("show", "style:v1")
    assert "warning" not in plain.stderr and "ss_network_alpha" not in plain.stdout

    res = run("show", "style:v1", "--metadata")
    assert "warning: header ss_network_alpha=8 but the config's lora_alpha is 2" in res.stderr
    # alpha / r: an engine that reads the header gets 8/4 instead of 2/4.
    assert "scales this adapter by 2 instead of 0.5" in res.stderr
    assert "ss_network_dim" not in res.stderr  # the header's rank agrees
    lines = res.stdout.splitlines()
    assert any(ln.split() == ["ss_output_name", "style"] for ln in lines), res.stdout
    assert any("ss_tag_frequency" in ln and "--json for all" in ln for ln in lines)

    record = json.loads(run("show", "style:v1", "--metadata", "--json").stdout)
    meta = record["metadata"]
    assert meta["imported"] == header  # every kept key, in full
    assert meta["stored"] == {"format": "pt"}  # the blob's own header
    assert [(d["key"], d["header"], d["config"]) for d in meta["disagreements"]] == [
        ("ss_network_alpha", 8.0, 2.0)
    ]
    assert record["alpha"] == 2.0 and record["rank"] == 4
    assert "metadata" not in json.loads(run("show", "style:v1", "--json").stdout)


def test_show_metadata_is_quiet_when_header_and_config_agree(run, tmp_path, clip_base):
    base, state = clip_base
    header = {"ss_network_dim": "4", "ss_network_alpha": "2", "ss_network_module": "networks.lora"}
    run("add", _kohya_file(tmp_path / "ok.safetensors", state, header), "--base", base, "-n", "ok")
    res = run("show", "ok", "--metadata")
    assert res.stderr == ""
    assert "ss_network_module" in res.stdout
    assert (
        json.loads(run("show", "ok", "--metadata", "--json").stdout)["metadata"]["disagreements"]
        == []
    )

    # The header's rank disagreeing is named too, with the scale it implies.
    wrong = {"ss_network_dim": "16", "ss_network_alpha": "2"}
    path = _kohya_file(tmp_path / "dim.safetensors", state, wrong, seed=4)  # another adapter
    run("add", path, "--base", base, "-n", "dim")
    res = run("show", "dim", "--metadata")
    assert "header ss_network_dim=16 but the config's r is 4" in res.stderr
    assert "by 0.125 instead of 0.5" in res.stderr


def test_a_peft_adapter_without_header_metadata_has_nothing_to_warn(run, tmp_path):
    run("add", write_peft_adapter(tmp_path / "a"), "--name", "a")
    res = run("show", "a", "--metadata")
    assert res.stderr == ""
    meta = json.loads(run("show", "a", "--metadata", "--json").stdout)["metadata"]
    assert meta["imported"] == {} and meta["disagreements"] == []
