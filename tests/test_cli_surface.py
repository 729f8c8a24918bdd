"""The CLI's surface, the same on every command: one definition per shared option
(``lorahub/cli/options.py``); ``-q`` prints identifiers only; ``--json`` is the result's
``to_dict()``; exit codes 0/1/2/3; ``-v``/``-vv``/``LORAHUB_LOG_LEVEL`` show lorahub's logs;
``LORAHUB_DEBUG``/``HF_DEBUG`` show tracebacks; ``lorahub env``; shell completion of stored
references; help texts list the environment variables a command reads."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

import lorahub
from lorahub.cli import cli, options
from lorahub.cli import errors as cli_errors
from lorahub.digest import Digest

DIGEST_REF = re.compile(r"^@xxh128:[0-9a-f]{32}$")
HEX_ID = re.compile(r"^[\w-]+:[0-9a-f]{16,}$")  # a base's content hash or signature
CANARY = "hf_CANARY_surface_t0ken_never_printed_0123456789"


def lines(text: str) -> list[str]:
    return text.splitlines()


def all_commands() -> list[tuple[str, click.Command]]:
    """Every command, by its full name ("base add"), the group itself left out."""
    ctx = click.Context(cli)
    found: list[tuple[str, click.Command]] = []

    def walk(group: click.Group, prefix: str) -> None:
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            assert command is not None
            if isinstance(command, click.Group):
                walk(command, f"{prefix}{name} ")
            else:
                found.append((f"{prefix}{name}", command))

    walk(cli, "")
    return found


def option(command: click.Command, name: str) -> click.Option | None:
    return next((p for p in command.params if isinstance(p, click.Option) and p.name == name), None)


# ------------------------------------------------------------------ one definition


def test_each_shared_option_has_one_definition_and_one_help_everywhere():
    commands = all_commands()
    with_json = {n for n, c in commands if option(c, "as_json")}
    for name, command in commands:
        for param, help_text, flags in (
            ("as_json", options.JSON_HELP, ["--json"]),
            ("quiet", options.QUIET_HELP, ["-q", "--quiet"]),
            ("base", options.BASE_HELP, ["--base"]),
        ):
            opt = option(command, param)
            if opt is not None:
                assert opt.help == help_text, (name, param)
                assert opt.opts == flags, (name, param)
    # Every command that reports something has --json (issue: export, tag, rm, merged get
    # and base rm lacked it).
    for name in ("export", "tag", "rm", "merged get", "base rm", "ls", "show", "check", "env"):
        assert name in with_json, name


def test_help_texts_list_the_environment_variables_read(run):
    push = run("push", "--help").stdout
    section = push[push.index("Environment:") :]
    for var in ("LORAHUB_HOME", "HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE"):
        assert var in section
    assert "LORAHUB_HOME" in run("ls", "--help").stdout
    assert "LORAHUB_MERGED_MAX_BYTES" in run("merged", "get", "--help").stdout
    top = run("--help").stdout
    assert "LORAHUB_LOG_LEVEL" in top and "HF_DEBUG" in top
    assert "_LORAHUB_COMPLETE=bash_source lorahub" in top
    codes = top[top.index("Exit status:") :]
    for code in (0, 1, 2, 3, 130):
        assert re.search(rf"^\s+{code}\s+\S", codes, re.M), code
    for name, command in all_commands():
        assert command.epilog and "Environment:" in command.epilog, name


# ------------------------------------------------------------------ -q and --json


# What -q prints on each command that has it: one pattern per kind of identifier, as
# lorahub/cli/options.py and README's "What -q prints" table state. "" means no output.
BLOB = re.compile(r"^xxh128:[0-9a-f]{32}$")
BLOB_OR_LEFTOVER = re.compile(r"^(xxh128:[0-9a-f]{32}|/.+)$")  # gc: blobs, then leftover paths
MERGED_KEY = re.compile(r"^(xxh128:)?[0-9a-f]{16,}$")
COMMIT_URL = re.compile(r"^https?://\S+/commit/[0-9a-f]{40}$")
ABS_DIR = "an absolute folder path"
NOTHING = "no output (the exit status answers)"
QUIET_IDENTIFIERS: dict[str, object] = {
    "add": DIGEST_REF,
    "ls": DIGEST_REF,
    "show": DIGEST_REF,
    "tag": DIGEST_REF,
    "resolve": DIGEST_REF,
    "pull": DIGEST_REF,
    "compose": DIGEST_REF,
    "rm": DIGEST_REF,
    "export": ABS_DIR,
    "merge": ABS_DIR,
    "merged get": ABS_DIR,
    "path": ABS_DIR,
    "base add": HEX_ID,
    "base ls": HEX_ID,
    "base rm": HEX_ID,
    "merged ls": MERGED_KEY,
    "merged rm": MERGED_KEY,
    "verify": "blob digest, adapter digest reference or catalog URL",
    "gc": BLOB_OR_LEFTOVER,
    "push": COMMIT_URL,
    "check": NOTHING,
    "fsck": "nothing unless unrecovered",
    "token add": re.compile(r"^lh_[A-Za-z0-9_-]{43}$"),  # the secret, shown that once
    "token ls": re.compile(r"^[a-z0-9][a-z0-9._-]*$"),
    "token rm": re.compile(r"^[a-z0-9][a-z0-9._-]*$"),
}


def identifiers(res, pattern) -> list[str]:
    """The lines of ``res.stdout``, each asserted to match ``pattern`` (at least one)."""
    found = lines(res.stdout)
    assert found, res.stdout
    for line in found:
        if pattern is ABS_DIR:
            assert Path(line).is_absolute() and Path(line).is_dir(), line
        else:
            assert isinstance(pattern, re.Pattern) and pattern.match(line), (pattern, line)
    return found


def test_every_quiet_command_documents_its_identifier():
    """Each command with -q is in the table above, says what -q prints in its help, and is
    in README's table; `env` has none and its help says why."""
    commands = dict(all_commands())
    quiet = {n for n, c in commands.items() if option(c, "quiet")}
    assert quiet == set(QUIET_IDENTIFIERS), quiet ^ set(QUIET_IDENTIFIERS)
    for name in quiet:
        assert "-q " in (commands[name].help or ""), f"{name}: its help does not say what -q prints"
    assert "No -q" in (commands["env"].help or "")
    readme = (Path(lorahub.__file__).parent.parent / "README.md").read_text()
    table = readme[readme.index("What `-q` prints") :]
    table = table[: table.index("\n\n", table.index("|"))]
    for name in (*quiet, "env"):
        assert f"`{name}`" in table, name
    assert "check -q" in options.__doc__ and "fsck -q" in options.__doc__


def test_quiet_prints_one_kind_of_identifier_per_object_type(
    run, world, tmp_path, store_home, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # relative outputs: -q still prints absolute paths
    added = identifiers(run("add", world / "a", world / "b", "-q"), DIGEST_REF)
    assert len(added) == 2
    run("tag", added[0], "a:v1")
    assert identifiers(run("tag", "a:v1", "a:prod", "-q"), DIGEST_REF) == [added[0]]
    assert identifiers(run("show", "a:v1", "-q"), DIGEST_REF) == [added[0]]
    assert sorted(identifiers(run("ls", "-q"), DIGEST_REF)) == sorted(added)
    assert identifiers(run("ls", "-q", "--filter", "name=a"), DIGEST_REF) == [added[0]]

    base = identifiers(run("base", "add", world / "llama", "-n", "llama", "-q"), HEX_ID)
    assert len(base) == 1
    assert identifiers(run("base", "ls", "-q"), HEX_ID) == base
    assert identifiers(run("resolve", "a:v1", "--base", "llama", "-q"), DIGEST_REF) == [added[0]]
    # check -q: no output, the exit status is the answer (as grep -q).
    assert run("check", "a:v1", "--base", "llama", "-q").stdout == ""
    run("add", world / "wide-ad", "-n", "wide")
    assert run("check", "wide", "--base", "llama", "-q", code=3).stdout == ""
    run("rm", "wide", "-y")

    out = identifiers(run("export", "a:v1", "exported", "-q"), ABS_DIR)
    assert out == [str(tmp_path / "exported")]
    assert identifiers(run("path", "a:v1", "-q"), ABS_DIR) == [run("path", "a:v1").stdout.strip()]
    merged = identifiers(run("merge", world / "llama", "a:v1", "-o", "merged", "-q"), ABS_DIR)
    assert merged == [str(tmp_path / "merged")]
    got = run("merged", "get", world / "llama", "a:v1", "-q", "--device", "cpu")
    assert len(identifiers(got, ABS_DIR)) == 1
    key = identifiers(run("merged", "ls", "-q"), MERGED_KEY)
    assert len(key) == 1
    assert identifiers(run("merged", "rm", key[0], "-y", "-q"), MERGED_KEY) == key
    # export --layout vllm -q: each LoRA folder's absolute path, not its bare name.
    kept = run(
        "export",
        "--layout",
        "vllm",
        "served",
        "--base",
        "llama",
        "--served-model-id",
        "org/m",
        "-q",
    )
    folders = identifiers(kept, ABS_DIR)
    assert folders and all(Path(f).parent == tmp_path / "served" for f in folders), folders
    assert "a" in {Path(f).name for f in folders}

    blend = identifiers(run("compose", "a:v1", added[1], "-n", "blend", "-q"), DIGEST_REF)
    assert len(blend) == 1
    assert run("verify", "-q").stdout == ""  # nothing bad: no identifiers
    assert run("fsck", "-q").stdout == ""  # a clean store: silent
    # rm -q: the digest reference of the adapter that lost the names, once.
    assert identifiers(run("rm", "a:v1", "a:prod", "-y", "-q"), DIGEST_REF) == [added[0]]
    assert identifiers(run("rm", added[1], "-y", "-q"), DIGEST_REF) == [added[1]]
    assert run("rm", added[1], "-y", "-q", code=None).stdout == ""  # nothing removed
    assert identifiers(run("base", "rm", "llama", "-q"), HEX_ID) == base
    run("rm", "a", "blend", "-y")
    freed = identifiers(run("gc", "--grace", "0", "-q"), BLOB_OR_LEFTOVER)
    assert len(freed) == len(set(freed)) and len([f for f in freed if BLOB.match(f)]) >= 2


def test_verify_quiet_prints_the_bad_blob_digest(run, world, store_home):
    added = identifiers(run("add", world / "a", "-n", "a:v1", "-q"), DIGEST_REF)
    with lorahub.open(store_home) as hub:
        info = hub.get("a:v1")
        blob = hub.blobs.path(Digest.parse(info.weights_digest))
    assert added == [f"@{info.digest}"]
    blob.chmod(0o644)
    blob.write_bytes(b"\0" * blob.stat().st_size)
    bad = identifiers(run("verify", "-q", code=1), re.compile(r"^@?xxh128:[0-9a-f]{32}$"))
    assert info.weights_digest in bad


def test_fsck_quiet_is_silent_after_a_repair_it_could_make(run, world, store_home):
    run("add", world / "a", "-n", "a:v1")
    assert run("fsck", "-q").stdout == ""
    (store_home / "lorahub.db").unlink()  # the catalog lost: fsck restores it from the files
    repaired = run("fsck", "-q")
    assert repaired.stdout == "" and repaired.stderr == ""
    assert len(identifiers(run("ls", "-q"), DIGEST_REF)) == 1
    assert "restored" not in run("fsck").stdout  # nothing left to do


def test_json_is_the_result_objects_to_dict(run, world, tmp_path, store_home):
    run("add", world / "a", "-n", "a:v1")
    tagged = json.loads(run("tag", "a:v1", "a:prod", "--json").stdout)
    with lorahub.open(store_home) as hub:
        info = hub.get("a:prod")
        assert tagged == json.loads(json.dumps(info.to_dict(), default=str))

    out = tmp_path / "out"
    exported = json.loads(run("export", "a:prod", out, "--json").stdout)
    assert exported["path"] == str(out) and (out / "adapter_config.json").is_file()
    # The ExportResult: the adapter's record, the folder and the base_model_name_or_path
    # actually written to its config.
    assert exported["adapter"]["digest"] == info.digest
    assert exported["adapter"] == json.loads(json.dumps(info.to_dict(), default=str))
    written = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert exported["base_model_name_or_path"] == written
    named = json.loads(
        run("export", "a:prod", tmp_path / "o2", "--json", "--base-model-id", "org/base").stdout
    )
    assert (
        named["base_model_name_or_path"]
        == "org/base"
        == json.loads((tmp_path / "o2" / "adapter_config.json").read_text())[
            "base_model_name_or_path"
        ]
    )
    with lorahub.open(store_home) as hub:
        result = hub.export_result("a:prod", tmp_path / "o3")
        assert isinstance(result, lorahub.ExportResult) and result.path == tmp_path / "o3"
        assert isinstance(hub.export("a:prod", tmp_path / "o4"), Path)  # the API is kept

    base = json.loads(run("base", "add", world / "llama", "-n", "llama", "--json").stdout)
    removed_base = json.loads(run("base", "rm", "llama", "--json").stdout)
    assert removed_base == base

    got = json.loads(
        run("merged", "get", world / "llama", "a:v1", "--json", "--device", "cpu").stdout
    )
    assert Path(got["path"]).is_dir() and got["adapters"] == ["a:v1"]

    report = json.loads(run("check", "a:v1", "--base", world / "llama", "--json").stdout)
    assert report["status"] in ("exact", "compatible") and report["problems"] == []
    verified = json.loads(run("verify", "--json").stdout)
    with lorahub.open(store_home) as hub:
        assert report == hub.check("a:v1", base=world / "llama").to_dict()
        assert verified == hub.verify().to_dict()

    removed = json.loads(run("rm", "a:v1", "a:prod", "-y", "--json").stdout)
    assert [r["reference"] for r in removed] == ["a:v1", "a:prod"]
    assert removed[0]["digest"] == info.digest
    assert sorted(n for r in removed for n in r["removed"]) == ["a:prod", "a:v1"]


# ------------------------------------------------------------------ exit codes


def test_usage_errors_exit_2_and_an_incompatible_check_exits_3(run, world):
    run("add", world / "wide-ad", "-n", "wide")
    for bad in ("colour=red", "rank=abc", "rank", "dora=maybe"):
        res = run("ls", "--filter", bad, code=cli_errors.EXIT_USAGE)
        assert "Error: Invalid value for '-f' / '--filter'" in res.stderr
        assert "Traceback" not in res.stderr
    run("ls", "--no-such-flag", code=2)
    run("compose", "wide", "wide", "--weights", "1,x", code=2)

    res = run("check", "wide", "--base", world / "llama", code=cli_errors.EXIT_INCOMPATIBLE)
    assert res.exit_code == 3 and "incompatible" in res.stdout
    res = run("check", "wide", "--base", world / "llama", "--json", code=3)
    assert json.loads(res.stdout)["status"] == "incompatible"
    run("check", "wide", "--base", world / "wide")  # fits: 0
    # A real error (no such adapter, no such base) stays 1, not 3.
    run("check", "nope:v1", "--base", world / "llama", code=cli_errors.EXIT_ERROR)
    run("check", "wide", "--base", world / "no-such-base", code=1)


# ------------------------------------------------------------------ logs and tracebacks


def test_verbose_shows_lorahub_logs_at_the_level_asked(run, world, monkeypatch):
    quiet = run("add", world / "a", "-n", "a")
    assert "info:" not in quiet.stderr and "debug:" not in quiet.stderr
    info = run("-v", "add", world / "b", "-n", "b")
    assert re.search(r"^info: (added|already present) xxh128:", info.stderr, re.M)
    assert "debug:" not in info.stderr
    debug = run("-vv", "ls")
    assert re.search(r"^debug: lorahub\.cli: lorahub \S+, store ", debug.stderr, re.M)
    assert debug.stdout.startswith("REFERENCE")  # stdout keeps only the listing

    monkeypatch.setenv("LORAHUB_LOG_LEVEL", "DEBUG")
    assert "debug: lorahub.cli:" in run("ls").stderr
    monkeypatch.setenv("LORAHUB_LOG_LEVEL", "chatty")
    assert "LORAHUB_LOG_LEVEL" in run("ls", code=2).stderr
    # The logger is put back after each command: the library's records reach the root
    # logger again (pytest's caplog, an application's handlers).
    library = logging.getLogger("lorahub")
    assert library.propagate and not library.handlers


@pytest.mark.parametrize("switch", ["LORAHUB_DEBUG", "HF_DEBUG"])
def test_either_debug_switch_shows_the_traceback(tmp_path, switch):
    env = {k: v for k, v in os.environ.items() if k not in ("LORAHUB_DEBUG", "HF_DEBUG")}
    env["LORAHUB_HOME"] = str(tmp_path / "h")
    cmd = [sys.executable, "-c", "from lorahub.cli import main; main()", "show", "nope:v1"]
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    loud = subprocess.run(cmd, capture_output=True, text=True, env={**env, switch: "1"})
    assert "Traceback" in loud.stderr and "AdapterNotFound" in loud.stderr


def test_a_repeated_push_shows_no_huggingface_hub_duplicate_warning(
    hub_server, run, world, monkeypatch, tmp_path, store_home, loopback_only
):
    from huggingface_hub import constants

    hub_server.add_token(CANARY, "alice", orgs=["myorg"])
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-tokens"))
    monkeypatch.setenv("HF_TOKEN", CANARY)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    hf = logging.getLogger("huggingface_hub")
    keep = Keep()
    hf.addHandler(keep)
    monkeypatch.setattr(hf, "level", logging.WARNING)
    try:
        run("add", world / "a", "-n", "a:v1")
        first = run("push", "a:v1", "myorg/a", "-q").stdout
        assert COMMIT_URL.match(first.strip()) and len(lines(first)) == 1, first
        pulled = identifiers(run("pull", "myorg/a", "-q"), DIGEST_REF)
        assert pulled == identifiers(run("show", "a:v1", "-q"), DIGEST_REF)
        again = run("push", "a:v1", "myorg/a")
        assert again.stdout.startswith("unchanged")
        assert first.strip() in again.stdout  # -q printed the commit URL, the identifier
        assert "No files have been modified" not in again.stderr
        assert not [r for r in records if "No files have been modified" in r.getMessage()]
        # The control: the library's own push, without the CLI's filter, does let
        # huggingface_hub's warning out, so the assertion above is not vacuous.
        with lorahub.open(store_home) as hub:
            assert hub.push("a:v1", "myorg/a").committed is False
        assert [r for r in records if "No files have been modified" in r.getMessage()]
    finally:
        hf.removeHandler(keep)


# ------------------------------------------------------------------ env and completion


def test_env_masks_the_password_and_never_prints_the_token(run, monkeypatch, store_home):
    monkeypatch.setenv("LORAHUB_DATABASE_URL", "postgresql://bob:s3cr@t-pw@db.example:5432/lh")
    monkeypatch.setenv("HF_TOKEN", CANARY)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = run("env")
    assert "s3cr@t-pw" not in res.output and CANARY not in res.output
    assert "postgresql://bob:***@db.example:5432/lh" in res.stdout
    assert re.search(r"^HF token\s+set \(HF_TOKEN\)$", res.stdout, re.M)
    assert re.search(r"^HF offline\s+yes$", res.stdout, re.M)
    assert re.search(rf"^store\s+{re.escape(str(store_home))}$", res.stdout, re.M)
    data = json.loads(run("env", "--json").stdout)
    assert CANARY not in json.dumps(data) and "s3cr@t-pw" not in json.dumps(data)
    assert data["hf_token"] is True and data["hf_offline"] is True
    assert data["lorahub"] == lorahub.__version__ and data["torch"]["version"]
    assert data["database_url"] == "postgresql://bob:***@db.example:5432/lh"
    for key in ("python", "huggingface_hub", "sqlalchemy", "hf_endpoint", "store"):
        assert data[key], key

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("LORAHUB_DATABASE_URL")
    data = json.loads(run("env", "--json").stdout)
    assert data["hf_token"] is False and data["database_url"].startswith("sqlite:///")


def test_mask_url_hides_query_secrets_too():
    from lorahub.cli.env import mask_url

    assert mask_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert mask_url("mysql://u:p@h/db?password=zz&charset=utf8") == (
        "mysql://u:***@h/db?password=***&charset=utf8"
    )
    assert mask_url("postgresql://u@h/db") == "postgresql://u@h/db"


def _complete(home: Path, *words: str) -> list[str]:
    """What bash completion offers for the last word of ``lorahub --home HOME WORDS``."""
    from click.testing import CliRunner

    comp = ["lorahub", "--home", str(home), *words]
    res = CliRunner().invoke(
        cli,
        [],
        prog_name="lorahub",
        env={
            "_LORAHUB_COMPLETE": "bash_complete",
            "COMP_WORDS": " ".join(comp),
            "COMP_CWORD": str(len(comp) - 1),
        },
    )
    assert res.exit_code == 0, res.output
    return [line.split(",", 1)[1] for line in res.stdout.splitlines() if line]


def test_completion_lists_stored_references(run, world, store_home):
    run("add", world / "a", "-n", "sql-expert:v1")
    run("tag", "sql-expert:v1", "sql-expert:prod")
    run("add", world / "b", "-n", "tone:v1")
    assert _complete(store_home, "show", "sq") == ["sql-expert:prod", "sql-expert:v1"]
    assert _complete(store_home, "show", "sql-expert:p") == ["sql-expert:prod"]
    assert _complete(store_home, "merge", "./base", "t") == ["tone:v1"]
    assert _complete(store_home, "rm", "-y", "") == [
        "sql-expert:prod",
        "sql-expert:v1",
        "tone:v1",
    ]
    assert _complete(store_home, "show", "%") == []  # no pattern characters
    assert _complete(store_home, "sh") == ["show"]
    # An empty or missing store completes nothing, quietly.
    assert _complete(store_home.parent / "nowhere", "show", "") == []


def test_completion_script_is_what_the_readme_says():
    res = subprocess.run(
        [sys.executable, "-c", "from lorahub.cli import main; main()"],
        capture_output=True,
        text=True,
        env={**os.environ, "_LORAHUB_COMPLETE": "bash_source"},
    )
    assert res.returncode == 0 and "_LORAHUB_COMPLETE=bash_complete" in res.stdout
    readme = (Path(lorahub.__file__).parent.parent / "README.md").read_text()
    assert 'eval "$(_LORAHUB_COMPLETE=bash_source lorahub)"' in readme
