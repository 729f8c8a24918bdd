"""The CLI through click's runner, and its error contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from factories import write_peft_adapter

import lorahub


def test_add_ls_show_tag_rm_export(run, tmp_path):
    src = write_peft_adapter(tmp_path / "a")
    out = run("add", src, "--name", "sql-expert:v1")
    assert out.output.startswith("added") and "sql-expert:v1" in out.output
    assert run("add", src, "--name", "sql-expert:v1").output.startswith("present")

    listing = run("ls").output.splitlines()
    assert listing[0].split()[:3] == ["REFERENCE", "DIGEST", "RANK"]
    assert listing[1].split()[0] == "sql-expert:v1"

    data = json.loads(run("ls", "--json").output)
    assert data[0]["refs"] == ["sql-expert:v1"] and data[0]["rank"] == 4
    digest = data[0]["digest"]
    assert run("ls", "-q").output.split() == [f"@{digest}"]
    assert json.loads(run("ls", "--json", "--filter", "rank=8").output) == []

    shown = json.loads(run("show", "sql-expert:v1", "--json").output)
    assert shown["digest"] == digest
    assert shown["manifest"]["config"]["r"] == 4
    assert shown["origin"]["format"] == "peft-safetensors"
    human = run("show", "sql-expert:v1").output
    assert digest in human and "q_proj, v_proj" in human

    run("tag", "sql-expert:v1", "sql-expert:prod")
    run("export", "sql-expert:prod", tmp_path / "out")
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()

    run("rm", "-y", "sql-expert:v1")
    assert json.loads(run("ls", "--json").output)[0]["refs"] == ["sql-expert:prod"]
    assert "1 blobs, 1 adapters: ok" in run("verify").output
    run("rm", "-y", "sql-expert:prod")
    assert "would free" in run("gc", "--dry-run", "--grace", "0").output
    assert "freed" in run("gc", "--grace", "0").output
    assert json.loads(run("ls", "--json").output) == []


def test_rm_asks_and_never_blocks_without_tty(run, tmp_path):
    run("add", write_peft_adapter(tmp_path / "a"), "-n", "x")
    res = run("rm", "x", code=None)  # the runner's stdin is not a TTY
    assert res.exit_code != 0 and "pass -y" in res.output
    assert json.loads(run("ls", "--json").output)[0]["refs"] == ["x:latest"]


def test_errors_are_one_line_without_traceback(run, tmp_path):
    res = run("show", "missing:v1", code=None)
    assert res.exit_code == 1
    assert res.stderr.startswith("Error: no adapter matches 'missing:v1'")
    assert "Traceback" not in res.output + res.stderr

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{")
    good = write_peft_adapter(tmp_path / "good")
    res = run("add", bad, good, code=None)
    assert res.exit_code == 1  # one refused: non-zero, but the good one was added
    assert "refused" in res.stderr and "not valid JSON" in res.stderr
    assert "added" in res.stdout
    res = run("ls", "--filter", "colour=red", code=None)
    assert res.exit_code == 2 and "unknown filter" in res.stderr  # a usage error


def test_verify_exits_nonzero_and_names_bad_blob(run, store_home, tmp_path):
    run("add", write_peft_adapter(tmp_path / "a"), "-n", "x")
    weights = json.loads(run("show", "x", "--json").output)["weights_digest"]
    hexd = weights.split(":")[1]
    blob = store_home / "blobs" / "xxh128" / hexd[:2] / hexd[2:]
    blob.chmod(0o644)  # read-only in the store
    blob.write_bytes(b"garbage")
    res = run("verify", code=None)
    assert res.exit_code == 1 and weights in res.stderr
    res = run("verify", "--json", code=None)
    assert json.loads(res.stdout)["ok"] is False


def test_debug_shows_traceback(store_home):
    env = {**os.environ, "LORAHUB_DEBUG": "1", "LORAHUB_HOME": str(store_home)}
    cmd = [sys.executable, "-c", "from lorahub.cli import main; main()", "show", "nope"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_console_script_runs_as_a_subprocess(store_home, tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "lorahub")
    env = {**os.environ, "LORAHUB_HOME": str(store_home)}
    src = write_peft_adapter(tmp_path / "a")
    cmd = [exe, "add", str(src), "-n", "a:v1"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([exe, "ls", "-q"], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and res.stdout.startswith("@xxh128:")
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, env=env)
    assert "Store, check, merge" in res.stdout


def _write_config(src, **changes):
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(changes)
    (src / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "changes",
    [
        {"r": "x"},
        {"lora_alpha": None},
        {"rank_pattern": [1]},
        {"base_model_name_or_path": ["x"]},
    ],
)
def test_bad_config_values_are_errors_not_tracebacks(run, tmp_path, changes):
    src = write_peft_adapter(tmp_path / "a")
    _write_config(src, **changes)
    res = run("add", src, code=None)
    assert res.exit_code == 1 and "adapter_config.json" in res.stderr
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert json.loads(run("ls", "--json").output) == []


def test_garbage_bin_is_refused_without_unsafe_advice(run, tmp_path):
    src = write_peft_adapter(tmp_path / "a")
    (src / "adapter_model.safetensors").unlink()
    (src / "adapter_model.bin").write_text("hello")
    res = run("add", src, code=None)
    assert res.exit_code == 1 and "weights_only=True" in res.stderr
    assert "weights_only set to False" not in res.stderr
    assert isinstance(res.exception, SystemExit)


def test_odd_arguments_get_clear_errors(run, tmp_path):
    src = write_peft_adapter(tmp_path / "a")
    run("add", src, "-n", "a")
    for args in (
        ("ls", "-f", "rank=abc"),
        ("add", ""),
        ("add", src, "-n", ""),
        ("gc", "--grace", "-5m"),
        ("ls", "--limit", "0"),
    ):
        res = run(*args, code=None)
        assert res.exit_code in (1, 2), args
        assert isinstance(res.exception, SystemExit), (args, res.exception)
    (tmp_path / "afile").write_text("x")
    res = run("export", "a", tmp_path / "afile" / "sub", code=None)
    assert res.exit_code == 1 and res.stderr.startswith("Error: cannot write")
    assert run("tag", "a", "b").output.startswith("b:latest -> ")


def test_size_style_merged_cap_is_understood(tmp_path, monkeypatch):
    from lorahub.settings import load

    monkeypatch.setenv("LORAHUB_MERGED_MAX_BYTES", "10GB")
    assert load(tmp_path).merged_max_bytes == 10 * 10**9
    monkeypatch.setenv("LORAHUB_MERGED_MAX_BYTES", "lots")
    with pytest.raises(lorahub.LorahubError, match="LORAHUB_MERGED_MAX_BYTES"):
        load(tmp_path)


def test_rm_twice_or_by_digest_and_name_in_one_go(run, tmp_path):
    src = write_peft_adapter(tmp_path / "a")
    run("add", src, "-n", "one:v1")
    res = run("rm", "one:v1", "one:v1", "-y")
    assert res.output.count("removed one:v1") == 1
    run("add", src, "-n", "one:v1", code=None)
    digest = json.loads(run("show", "one:v1", "--json", code=None).output)["digest"]
    res = run("rm", "@" + digest, "one:v1", "-y")
    assert "one:v1 was already removed" in res.output
