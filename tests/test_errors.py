"""Errors by kind: each family carries its data, today's names still catch what they caught,
and the CLI turns each family into its exit status and message through one table."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from factories import read_adapter, write_peft_adapter

import lorahub
from lorahub import errors as E
from lorahub.cli import LorahubGroup
from lorahub.cli import errors as cli_errors
from lorahub.refs import MIN_PREFIX

README = Path(__file__).resolve().parent.parent / "README.md"

# Every name importable before the families existed, and what it was (builtin bases).
LEGACY = {
    "LorahubError": (Exception,),
    "InvalidReference": (ValueError,),
    "AdapterNotFound": (LookupError,),
    "AmbiguousReference": (LookupError,),
    "InvalidAdapter": (ValueError,),
    "IntegrityError": (OSError,),
    "BlobCollision": (OSError,),
    "StoreError": (OSError,),
    "BaseModelError": (ValueError,),
    "IncompatibleAdapter": (ValueError,),
    "MergeError": (RuntimeError,),
    "ComposeError": (ValueError,),
    "RemoteError": (OSError,),
}

# A leaf raised where an older class was: every class it must still be caught by.
LEAVES = [
    (E.MergeOutputConflict("x"), (E.Conflict, E.MergeError, RuntimeError)),
    (E.OutputConflict("x"), (E.Conflict, E.StoreError, OSError)),
    (E.InvalidMergeArgument("x"), (E.InvalidArgument, E.InvalidInput, E.MergeError, ValueError)),
    (E.MergeIOError("x"), (E.StoreError, E.MergeError, OSError, RuntimeError)),
    (E.BaseNotFound("x"), (E.NotFound, E.BaseModelError, LookupError, ValueError)),
    (E.IncompatibleParents("x"), (E.Incompatible, E.ComposeError, ValueError)),
    (E.InvalidComposeArgument("x"), (E.InvalidArgument, E.ComposeError, ValueError)),
    (E.MergeBaseNotFound("x"), (E.NotFound, E.MergeError, LookupError, RuntimeError)),
    (E.IncompatibleMerge("x"), (E.Incompatible, E.MergeError, ValueError, RuntimeError)),
    (E.InvalidMergeInput("x"), (E.InvalidInput, E.MergeError, ValueError, RuntimeError)),
    (E.MergeDeviceUnavailable("x"), (E.DeviceUnavailable, E.InvalidInput, E.MergeError)),
    (E.ComposeDeviceUnavailable("x"), (E.DeviceUnavailable, E.InvalidInput, E.ComposeError)),
    (E.RemoteNotFound("x"), (E.RemoteError, E.NotFound, OSError, LookupError)),
    (E.RemoteConflict("x"), (E.Conflict, E.RemoteError, OSError)),
    (E.BlobCollision("x", "xxh128:00"), (E.CorruptData, E.IntegrityError, OSError)),
    (E.AdapterNotFound("x"), (E.NotFound, LookupError)),
    (E.AmbiguousReference("ab", ["a", "b"]), (E.NotFound, LookupError)),
    (E.IncompatibleAdapter("x"), (E.Incompatible, ValueError)),
]


# ------------------------------------------------------------------ the classes


@pytest.mark.parametrize("name", sorted(LEGACY))
def test_todays_names_stay_importable_with_their_builtin(name):
    cls = getattr(E, name)
    assert issubclass(cls, E.LorahubError)
    assert all(issubclass(cls, base) for base in LEGACY[name])


def test_the_package_still_exports_its_error_names():
    for name in lorahub.__all__:
        if name.endswith(("Error", "Found", "Reference", "Adapter")):
            assert getattr(lorahub, name) is getattr(E, name)


def test_integrity_error_is_the_corrupt_data_family_under_its_old_name():
    assert E.IntegrityError is E.CorruptData
    with pytest.raises(E.IntegrityError):
        raise E.CorruptData("bytes differ")


@pytest.mark.parametrize("error, catchers", LEAVES, ids=lambda v: type(v).__name__)
def test_a_leaf_is_caught_by_its_family_and_its_older_name(error, catchers):
    for cls in (E.LorahubError, *catchers):
        with pytest.raises(cls):
            raise error


def test_families_carry_their_data():
    err = E.CorruptData(
        "blob differs", expected="xxh128:aa", actual="xxh128:bb", path=Path("/s/blob")
    )
    assert (err.expected, err.actual, err.path, str(err)) == (
        "xxh128:aa",
        "xxh128:bb",
        "/s/blob",
        "blob differs",
    )
    assert E.CorruptData("missing").actual is None
    remote = E.RemoteError(
        "gone", repo_id="org/x", revision="main", status=404, server_message="Repo not found"
    )
    assert (remote.repo_id, remote.revision, remote.status, remote.server_message) == (
        "org/x",
        "main",
        404,
        "Repo not found",
    )
    assert E.RemoteError("offline").status is None
    assert E.Incompatible("does not fit", "the report").report == "the report"
    assert E.Conflict("exists", target=Path("/out")).target == "/out"
    tag = E.RemoteConflict("tag taken", target="v1", repo_id="org/x", revision="abc")
    assert (tag.target, tag.repo_id, tag.revision, tag.status) == ("v1", "org/x", "abc", None)
    assert E.BlobCollision("collides", "xxh128:cc").expected == "xxh128:cc"


@pytest.mark.parametrize(
    "family, builtin",
    [
        (E.NotFound, LookupError),
        (E.InvalidInput, ValueError),
        (E.InvalidArgument, ValueError),
        (E.CorruptData, OSError),
        (E.Incompatible, ValueError),
        (E.RemoteError, OSError),
        (E.StoreError, OSError),
    ],
)
def test_each_family_is_also_its_natural_builtin(family, builtin):
    assert issubclass(family, E.LorahubError) and issubclass(family, builtin)


@pytest.mark.parametrize(
    "error",
    [
        E.CorruptData("m", expected="a", actual="b", path="/p"),
        E.RemoteConflict("m", target="v1", repo_id="o/r"),
        E.AmbiguousReference("ab", ["abc", "abd"]),
        E.BlobCollision("m", "xxh128:00"),
        E.AdapterNotFound("sql:v1"),
        E.MergeOutputConflict("m", target="/o"),
    ],
    ids=lambda v: type(v).__name__,
)
def test_errors_survive_pickling_with_their_data(error):
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error)
    assert back.__dict__ == error.__dict__


# ------------------------------------------------------------------ raise sites


def test_a_corrupt_blob_names_expected_actual_and_path(tmp_path):
    from lorahub.blobs import BlobStore

    blobs = BlobStore(tmp_path / "blobs", tmp_path / "tmp")
    digest = blobs.put_bytes(b"the real bytes")
    blobs.path(digest).chmod(0o644)
    blobs.path(digest).write_bytes(b"other bytes")
    with pytest.raises(E.CorruptData) as err:
        blobs.checked_path(digest)
    assert err.value.expected == str(digest) and err.value.actual not in (None, str(digest))
    assert err.value.path == os.fspath(blobs.path(digest))
    blobs.path(digest).unlink()
    with pytest.raises(E.IntegrityError) as err:
        blobs.checked_path(digest)
    assert err.value.actual is None and "missing" in str(err.value)


def test_an_edited_export_names_its_lorahub_json(hub, tmp_path):
    info = hub.add(write_peft_adapter(tmp_path / "a"), name="sql").adapter
    out = hub.export("sql", tmp_path / "out")
    config = Path(out) / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "lora_alpha": 64}))
    with lorahub.open(tmp_path / "other") as other, pytest.raises(E.CorruptData) as err:
        other.add(out)
    assert err.value.expected == info.digest and err.value.actual != info.digest
    assert err.value.path == os.fspath(Path(out) / "lorahub.json")


def test_a_short_digest_says_how_many_hex_digits_it_needs():
    from lorahub.refs import parse

    with pytest.raises(E.InvalidReference, match=f"{MIN_PREFIX} to 32 hex"):
        parse("xxh128:abcdef01")


def test_bad_cli_weights_are_an_invalid_argument_not_a_merge_error():
    from lorahub.cli.output import parse_weights

    for text, count in (("1,x", 2), ("1,nan", 2), ("1", 2)):
        with pytest.raises(E.InvalidArgument) as err:
            parse_weights(text, count)
        assert not isinstance(err.value, E.MergeError)


# ------------------------------------------------- raise sites: the class says what went wrong


def test_a_merge_output_that_exists_is_a_conflict_naming_it_and_still_a_merge_error(
    hub, world, tmp_path
):
    hub.add(world / "a", name="rs:v1")
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(E.MergeError) as err:
        hub.merge(world / "llama", ["rs:v1"], out=out, device="cpu")
    assert type(err.value) is E.MergeOutputConflict
    assert isinstance(err.value, E.Conflict) and err.value.target == os.fspath(out)
    assert (out / "notes.txt").read_text() == "mine"


def test_an_export_destination_or_the_store_is_an_output_conflict(hub, tmp_path):
    from lorahub.outputs import check_output, check_outside

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(E.StoreError) as err:
        check_output(taken, force=True, kind="export")
    assert type(err.value) is E.OutputConflict and err.value.target == os.fspath(taken)
    inside = hub.home / "out"
    with pytest.raises(E.OutputConflict) as err:
        check_outside(inside, hub.home)
    assert err.value.target == os.fspath(inside)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weights": [1.0, "x"]}, "weights must be numbers"),
        ({"weights": [float("inf")]}, "finite"),
        ({"weights": [1.0, 2.0]}, "2 weights for 1 adapters"),
        ({"dtype": "int8"}, "unknown output dtype"),
        ({"max_shard_size": 0}, "max_shard_size must be positive"),
    ],
    ids=["not-a-number", "infinite", "count", "dtype", "shard-size"],
)
def test_a_bad_merge_argument_is_an_invalid_argument_and_still_a_merge_error(world, kwargs, match):
    from lorahub.base import open_base
    from lorahub.merge.plan import plan_merge

    base, adapter = open_base(world / "llama"), read_adapter(world / "a")
    with pytest.raises(E.MergeError, match=match) as err:
        plan_merge(base, [adapter], **kwargs)
    assert type(err.value) is E.InvalidMergeArgument
    assert isinstance(err.value, E.InvalidArgument)


def test_bad_sizes_devices_and_dtypes_are_invalid_arguments(monkeypatch):
    from lorahub.device import resolve_device
    from lorahub.merge.plan import normalize_dtype
    from lorahub.settings import load
    from lorahub.units import parse_size

    for call in (
        lambda: parse_size("5 parsecs"),
        lambda: parse_size(0),
        lambda: normalize_dtype("int8"),
    ):
        with pytest.raises(E.InvalidMergeArgument):
            call()
    # Merge and compose both choose a device: the primitive's refusal belongs to neither.
    for device, match in (("tpu", "unknown device 'tpu'"), ("meta", "device must be cpu, cuda")):
        with pytest.raises(E.InvalidArgument, match=match) as err:
            resolve_device(device)
        assert not isinstance(err.value, (E.MergeError, E.ComposeError))
    monkeypatch.setenv("LORAHUB_MERGED_MAX_BYTES", "lots")
    with pytest.raises(E.InvalidArgument, match="LORAHUB_MERGED_MAX_BYTES: not a size"):
        load()


@pytest.mark.parametrize(
    "adapters, weights, match",
    [([], None, "nothing to merge"), (["rs:v1"], [1.0, 2.0], "got 2 weights for 1 adapters")],
    ids=["no-adapters", "weight-count"],
)
def test_a_bad_merge_call_on_the_hub_is_caught_as_an_invalid_argument(
    hub, world, tmp_path, adapters, weights, match
):
    hub.add(world / "a", name="rs:v1")
    for call in (
        lambda: hub.merge(world / "llama", adapters, weights, out=tmp_path / "o", device="cpu"),
        lambda: hub.iter_merged(world / "llama", adapters, weights, device="cpu"),
    ):
        try:
            call()
        except E.InvalidArgument as exc:
            assert type(exc) is E.InvalidMergeArgument and match in str(exc)
        else:
            raise AssertionError("no error")
    assert not (tmp_path / "o").exists()


def test_a_bad_device_is_merges_or_composes_own_invalid_argument(hub, world, tmp_path):
    hub.add(world / "a", name="rs:v1")
    hub.add(world / "ad2", name="other:v1")
    with pytest.raises(E.MergeError, match="device must be cpu, cuda, cuda:N or auto") as err:
        hub.merge(world / "llama", ["rs:v1"], out=tmp_path / "o", device="meta")
    assert type(err.value) is E.InvalidMergeArgument
    with pytest.raises(E.ComposeError, match="device must be cpu, cuda, cuda:N or auto") as err:
        hub.compose(["rs:v1", "other:v1"], name="c", device="meta")
    assert type(err.value) is E.InvalidComposeArgument


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weights": [1.0]}, "1 weights for 2 adapters"),
        ({"weights": [1.0, "x"]}, "is not a number"),
        ({"rank": 0}, "rank must be a positive integer"),
        ({"method": "ties", "density": 2.0}, "density must be a number"),
        ({"method": "blend"}, "unknown composition method"),
    ],
    ids=["count", "not-a-number", "rank", "density", "method"],
)
def test_a_bad_compose_argument_is_an_invalid_argument_and_still_a_compose_error(
    hub, world, kwargs, match
):
    hub.add(world / "a", name="rs:v1")
    hub.add(world / "ad2", name="other:v1")
    with pytest.raises(E.InvalidArgument, match=match) as err:
        hub.compose(["rs:v1", "other:v1"], name="c", **kwargs)
    assert type(err.value) is E.InvalidComposeArgument
    assert isinstance(err.value, E.ComposeError) and not isinstance(err.value, E.MergeError)


def test_a_merge_base_with_no_local_weights_is_not_found_and_still_a_merge_error(
    hub, world, tmp_path, monkeypatch
):
    import dataclasses

    import lorahub.base
    from lorahub.merge.source import Sources

    hub.add(world / "a", name="rs:v1")
    real = lorahub.base.open_base
    # A Hub base read remotely: headers only, no files on this machine.
    monkeypatch.setattr(
        lorahub.base, "open_base", lambda *a, **k: dataclasses.replace(real(*a, **k), root=None)
    )
    with pytest.raises(E.NotFound, match="not on this machine") as err:
        hub.merge(world / "llama", ["rs:v1"], out=tmp_path / "o", device="cpu")
    assert type(err.value) is E.MergeBaseNotFound and isinstance(err.value, E.MergeError)
    with pytest.raises(E.MergeBaseNotFound, match="has no local files"):
        Sources(lorahub.base.open_base(world / "llama"), None)  # type: ignore[arg-type]


def test_merge_inputs_that_do_not_fit_together_are_incompatible_and_still_a_merge_error(
    world, tmp_path
):
    import dataclasses

    from factories import random_peft_adapter

    from lorahub.base import open_base
    from lorahub.merge.plan import plan_merge

    base = open_base(world / "llama")
    one, two = (
        read_adapter(
            random_peft_adapter(
                world / "llama",
                tmp_path / n,
                seed=s,
                r=2,
                target_modules=["q_proj"],
                modules_to_save=["lm_head"],
            )
        )
        for n, s in (("one", 1), ("two", 2))
    )
    with pytest.raises(E.Incompatible, match=r"both replace 'lm_head\.weight'") as err:
        plan_merge(base, [one, two])
    assert type(err.value) is E.IncompatibleMerge and isinstance(err.value, E.MergeError)
    # A tensor an adapter replaces (modules_to_save) in a quantised base.
    tensors = {
        **base.tensors,
        "lm_head.weight": dataclasses.replace(base.tensors["lm_head.weight"], dtype="I8"),
    }
    with pytest.raises(E.IncompatibleMerge, match=r"lorahub merges into .* weights only"):
        plan_merge(dataclasses.replace(base, tensors=tensors), [one])


def test_a_base_dtype_torch_lacks_is_invalid_merge_input():
    from lorahub.merge.kernels import torch_dtype

    with pytest.raises(E.InvalidInput, match="F4 is not supported") as err:
        torch_dtype("F4")
    assert type(err.value) is E.InvalidMergeInput and isinstance(err.value, E.MergeError)


def test_a_missing_merge_base_shard_is_an_io_error_and_still_a_merge_error(world, tmp_path):
    from lorahub.base import open_base
    from lorahub.merge.writer import merge_to_dir

    base_dir = tmp_path / "llama"
    shutil.copytree(world / "llama", base_dir)
    base = open_base(base_dir)
    (base_dir / "model.safetensors").unlink()
    with pytest.raises(E.MergeError, match="cannot open base shard") as err:
        merge_to_dir(base, [read_adapter(world / "a")], out=tmp_path / "out", device="cpu")
    assert type(err.value) is E.MergeIOError and isinstance(err.value, E.StoreError)


def test_a_base_path_that_does_not_exist_is_not_found_and_still_a_base_model_error(tmp_path):
    from lorahub.base import open_base

    missing = tmp_path / "no-such-model"
    with pytest.raises(E.BaseModelError, match="not found") as err:
        open_base(missing)
    assert type(err.value) is E.BaseNotFound and isinstance(err.value, LookupError)


def test_parents_of_different_bases_are_incompatible_and_still_a_compose_error():
    from lorahub.compose import ParentBase, parents_base
    from lorahub.manifest import BaseRef

    parents = [
        ParentBase("a", BaseRef("org/one", signature="xxh128:" + "1" * 32)),
        ParentBase("b", BaseRef("org/two", signature="xxh128:" + "2" * 32)),
    ]
    with pytest.raises(E.ComposeError, match="different base architectures") as err:
        parents_base(parents)
    assert type(err.value) is E.IncompatibleParents and isinstance(err.value, E.Incompatible)


# ------------------------------------------------- raise sites on the Hub (the test server)


@pytest.fixture
def seeded(hub_server, loopback_only, tmp_path):
    """The test Hub holding a public PEFT repo ``alice/a``; returns the server and its files."""
    files = {p.name: p.read_bytes() for p in write_peft_adapter(tmp_path / "src").iterdir()}
    hub_server.seed_repo("alice/a", files)
    return hub_server, files


def test_a_download_whose_bytes_differ_is_corrupt_data_with_both_hashes(hub, seeded):
    server, files = seeded
    weights = files["adapter_model.safetensors"]
    server.replace_downloads = {"adapter_model.safetensors": b"\1" * len(weights)}
    with pytest.raises(E.IntegrityError, match="does not match the hash") as err:
        hub.pull("alice/a")
    assert type(err.value) is E.CorruptData
    assert err.value.expected == hashlib.sha256(weights).hexdigest()
    assert err.value.actual == hashlib.sha256(b"\1" * len(weights)).hexdigest()
    assert err.value.path.endswith("adapter_model.safetensors")


def test_a_download_cut_short_is_corrupt_data_with_both_sizes(hub, seeded):
    server, files = seeded
    server.truncate_downloads = {"adapter_model.safetensors": 100}
    with pytest.raises(E.CorruptData, match="cut short") as err:
        hub.pull("alice/a")
    assert err.value.expected == len(files["adapter_model.safetensors"])
    assert err.value.actual == 100


def test_a_repo_or_revision_not_on_the_hub_is_remote_not_found_with_its_ids(hub, seeded):
    with pytest.raises(E.NotFound) as err:
        hub.pull("alice/nothing-here")
    assert type(err.value) is E.RemoteNotFound
    # 401, not 404: without a token the Hub will not say whether a private repo exists.
    assert (err.value.repo_id, err.value.revision, err.value.status) == (
        "alice/nothing-here",
        "main",
        401,
    )
    with pytest.raises(E.RemoteNotFound, match="has no revision 'nope'") as err:
        hub.pull("alice/a@nope")
    assert (err.value.repo_id, err.value.revision) == ("alice/a", "nope")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_an_http_failure_carries_status_and_the_server_message():
    # Older huggingface_hub releases are built on httpx, newer ones on httpx2.
    httpx2 = pytest.importorskip("httpx2") if _has("httpx2") else pytest.importorskip("httpx")
    from huggingface_hub.errors import HfHubHTTPError

    from lorahub.remote.errors import hub_errors

    request = httpx2.Request("POST", "http://hub/api/repos/create")
    refused = HfHubHTTPError(
        "403 Forbidden",
        response=httpx2.Response(403, request=request),
        server_message="Forbidden: no  write\naccess",
    )
    denied = pytest.raises(E.RemoteError, match="your token cannot write to org/x")
    with denied as err, hub_errors("org/x", "dev", writing=True):
        raise refused
    assert type(err.value) is E.RemoteError and err.value.__cause__ is refused
    assert (err.value.repo_id, err.value.revision, err.value.status) == ("org/x", "dev", 403)
    assert err.value.server_message == "Forbidden: no write access"


def test_a_tag_taken_on_the_hub_is_a_remote_conflict_naming_it(hub, seeded, tmp_path, monkeypatch):
    server, _ = seeded
    server.add_token("hf_alice_write", "alice")
    monkeypatch.setenv("HF_TOKEN", "hf_alice_write")
    hub.add(write_peft_adapter(tmp_path / "one"), name="one:v1")
    hub.add(write_peft_adapter(tmp_path / "two", seed=7), name="two:v1")
    first = hub.push("one:v1", "alice/tagged", tag="v1")
    with pytest.raises(E.RemoteError, match="tag 'v1' already exists") as err:
        hub.push("two:v1", "alice/tagged", tag="v1")
    assert type(err.value) is E.RemoteConflict and isinstance(err.value, E.Conflict)
    assert (err.value.target, err.value.repo_id, err.value.revision) == (
        "v1",
        "alice/tagged",
        first.commit,
    )


# ------------------------------------------------------------------ the CLI's table


def _cli_raising(error: BaseException) -> click.Group:
    """A group with the real error handling and one command, ``boom``, that raises."""

    @click.group(cls=LorahubGroup)
    def group() -> None:
        pass

    @group.command()
    def boom() -> None:
        raise error

    group._pending = []  # no lorahub commands to load
    return group


def _with_cause(error: Exception) -> Exception:
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as low:
            raise error from low
    except Exception as exc:
        return exc


FAMILIES = [
    E.NotFound("n"),
    E.InvalidInput("i"),
    E.InvalidArgument("a"),
    E.Conflict("c"),
    E.CorruptData("d"),
    E.Incompatible("x"),
    E.RemoteError("r"),
    E.StoreError("s"),
    E.MergeError("m"),
    E.LorahubError("l"),
    *(leaf for leaf, _ in LEAVES),
]


@pytest.mark.parametrize("error", FAMILIES, ids=lambda v: type(v).__name__)
def test_every_family_exits_with_its_table_status_and_one_error_line(error):
    res = CliRunner().invoke(_cli_raising(error), ["boom"])
    row = cli_errors.outcome(error)
    # A bad argument value is a usage error (2), as click's own bad option values are.
    usage = isinstance(error, E.InvalidArgument)
    assert res.exit_code == row.code == (cli_errors.EXIT_USAGE if usage else cli_errors.EXIT_ERROR)
    assert res.stderr == f"Error: {error}\n"
    assert isinstance(res.exception, SystemExit)


def test_the_table_is_read_first_match_from_specific_to_general():
    assert cli_errors.TABLE[-1].family is E.LorahubError
    assert cli_errors.outcome(E.RemoteConflict("t")).family is E.Conflict
    assert cli_errors.outcome(E.BaseNotFound("b")).family is E.NotFound
    assert cli_errors.outcome(E.MergeError("m")).family is E.LorahubError
    assert cli_errors.outcome(E.MergeBaseNotFound("b")).family is E.NotFound
    assert cli_errors.outcome(E.IncompatibleMerge("i")).family is E.Incompatible
    assert cli_errors.outcome(E.InvalidComposeArgument("c")).family is E.InvalidArgument
    assert cli_errors.outcome(E.InvalidReference("r")).family is E.InvalidInput


@pytest.mark.parametrize(
    "error, hinted",
    [
        (E.StoreError("the catalog failed"), True),
        (E.RemoteError("cannot reach the Hub"), True),
        (E.MergeError("cannot merge"), True),
        (E.NotFound("no such adapter"), False),
        (E.InvalidInput("bad value"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_the_debug_hint_follows_an_error_raised_from_a_lower_level_one(error, hinted):
    res = CliRunner().invoke(_cli_raising(_with_cause(error)), ["boom"])
    lines = res.stderr.splitlines()
    assert res.exit_code == 1 and lines[0] == f"Error: {error}"
    assert lines[1:] == ([cli_errors.DEBUG_HINT] if hinted else [])
    # Raised by lorahub itself, with nothing below it: the message is all there is.
    res = CliRunner().invoke(_cli_raising(type(error)("plain")), ["boom"])
    assert res.stderr == "Error: plain\n"


def test_with_debug_set_the_error_itself_escapes(monkeypatch):
    monkeypatch.setenv("LORAHUB_DEBUG", "1")
    error = E.StoreError("the catalog failed")
    res = CliRunner().invoke(_cli_raising(error), ["boom"])
    assert res.exception is error and "Error:" not in res.stderr


def test_an_unexpected_exception_is_a_bug_and_is_not_dressed_up():
    error = ZeroDivisionError("division by zero")
    res = CliRunner().invoke(_cli_raising(error), ["boom"])
    assert res.exception is error and "Error:" not in res.stderr


def test_ctrl_c_exits_130_with_one_word():
    res = CliRunner().invoke(_cli_raising(KeyboardInterrupt()), ["boom"])
    assert res.exit_code == cli_errors.EXIT_INTERRUPTED == 130
    assert res.stderr == "Interrupted.\n"


def test_real_commands_exit_by_family(run, tmp_path):
    res = run("show", "missing:v1", code=1)
    assert res.stderr.startswith("Error: no adapter matches 'missing:v1'")
    # A bad --filter or option value is a usage error (2), as a bad option is.
    res = run("ls", "--filter", "colour=red", code=2)
    assert "Error: Invalid value for '-f' / '--filter': unknown filter" in res.stderr
    res = run("compose", "a", "b", "--weights", "1,x", "-n", "c", code=2)
    assert res.stderr == "Error: --weights '1,x' must be numbers separated by commas\n"
    res = run("show", "@abcdef", code=1)
    assert f"at least {MIN_PREFIX} hex digits" in res.stderr
    run("--help")  # usage and help are click's: exit 0 here, 2 for a bad option
    assert run("ls", "--no-such-option", code=2).exit_code == cli_errors.EXIT_USAGE


def test_a_damaged_catalog_points_at_the_debug_switch(run, store_home, tmp_path):
    run("add", write_peft_adapter(tmp_path / "a"), "-n", "a")
    (store_home / "lorahub.db").write_bytes(b"this is not a database" * 100)
    res = run("ls", code=1)
    assert res.stderr.startswith("Error: ") and "lorahub fsck" in res.stderr
    assert res.stderr.rstrip().endswith(cli_errors.DEBUG_HINT)


def test_the_debug_switch_shows_the_traceback_in_a_real_process(tmp_path):
    env = {**os.environ, "LORAHUB_HOME": str(tmp_path / "h")}
    cmd = [sys.executable, "-c", "from lorahub.cli import main; main()", "show", "nope:v1"]
    quiet = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert quiet.returncode == 1 and quiet.stderr.startswith("Error: no adapter matches")
    assert "Traceback" not in quiet.stderr
    loud = subprocess.run(cmd, capture_output=True, text=True, env={**env, "LORAHUB_DEBUG": "1"})
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "AdapterNotFound" in loud.stderr


def test_the_readme_documents_every_exit_status():
    text = README.read_text()
    section = text[text.index("### Exit codes") :]
    section = section[: section.index("\n### ", 1)]
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", section, re.M)}
    used = {row.code for row in cli_errors.TABLE}
    used |= {cli_errors.EXIT_OK, cli_errors.EXIT_USAGE, cli_errors.EXIT_INTERRUPTED}
    used |= {cli_errors.EXIT_INCOMPATIBLE}
    assert documented == used
    for family in ("NotFound", "InvalidInput", "Conflict", "CorruptData", "Incompatible"):
        assert f"`{family}`" in section
    assert "LORAHUB_DEBUG=1" in section


def test_a_device_the_machine_lacks_exits_1_and_an_unknown_one_2(
    run, hub, world, tmp_path, monkeypatch
):
    """``--device cuda`` without a GPU is the machine's fault, not the command line's."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run("add", world / "a", "-n", "a")
    run("add", world / "ad2", "-n", "b")
    out = tmp_path / "o"
    res = run("merge", world / "llama", "a", "-o", out, "--device", "cuda", code=1)
    assert res.stderr == "Error: device 'cuda' asked for, but torch sees no CUDA GPU; use cpu\n"
    res = run("compose", "a", "b", "-n", "c", "--device", "cuda", code=1)
    assert "torch sees no CUDA GPU" in res.stderr
    res = run("merge", world / "llama", "a", "-o", out, "--device", "tpu", code=2)
    assert res.stderr == "Error: unknown device 'tpu'; use auto, cpu, cuda or cuda:N\n"
    assert not out.exists()
    with pytest.raises(E.DeviceUnavailable) as err:
        hub.merge(world / "llama", ["a"], out=out, device="cuda:0")
    assert isinstance(err.value, E.MergeError) and not isinstance(err.value, E.InvalidArgument)
