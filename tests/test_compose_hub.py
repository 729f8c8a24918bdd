"""Composition through the Hub and the CLI: stored with provenance, reproducible."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from factories import LLAMA_MODULES, write_peft_adapter

import lorahub
from lorahub.cli import cli
from lorahub.errors import ComposeError


@pytest.fixture
def hub(tmp_path):
    with lorahub.open(tmp_path / "s") as h:
        h.add(write_peft_adapter(tmp_path / "a", r=4, alpha=8, seed=1), name="a")
        h.add(write_peft_adapter(tmp_path / "b", r=2, alpha=4, seed=2), name="b")
        yield h


def _delta(adapter, module):
    m = adapter.modules[module]
    return m.scaling(adapter.use_rslora) * (m.B.double() @ m.A.double())


def test_cat_is_stored_with_provenance_and_exact(hub):
    res = hub.compose(["a", "b"], [1.0, 0.5], method="cat", name="blend:v1")
    assert res.added and res.report.exact
    info = hub.get("blend:v1")
    prov = info.provenance
    assert prov["kind"] == "compose" and prov["method"] == "cat"
    assert prov["parents"] == [hub.get("a").digest, hub.get("b").digest]
    assert prov["weights"] == [1.0, 0.5]
    blend, a, b = hub.load("blend:v1"), hub.load("a"), hub.load("b")
    for module in LLAMA_MODULES:
        expected = _delta(a, module) + 0.5 * _delta(b, module)
        torch.testing.assert_close(_delta(blend, module), expected, rtol=1e-5, atol=1e-6)
    assert info.origin_kind == "compose"


def test_same_inputs_give_the_same_digest(hub):
    one = hub.compose(["a", "b"], method="dare_linear", density=0.5, rank=4, seed=3)
    two = hub.compose(["a", "b"], method="dare_linear", density=0.5, rank=4, seed=3)
    other = hub.compose(["a", "b"], method="dare_linear", density=0.5, rank=4, seed=4)
    assert one.adapter.digest == two.adapter.digest and not two.added
    assert other.adapter.digest != one.adapter.digest


def test_parents_for_different_bases_are_refused(hub, tmp_path):
    from lorahub.manifest import BaseRef

    adapter = hub.load("b")
    hub.store(
        adapter,
        name="c",
        origin_kind="import",
        origin={},
        base=BaseRef("x", None, "xxh128:" + "1" * 32),
    )
    hub.store(
        adapter,
        name="d",
        origin_kind="import",
        origin={},
        base=BaseRef("y", None, "xxh128:" + "2" * 32),
    )
    with pytest.raises(ComposeError, match="different base architectures"):
        hub.compose(["c", "d"])


def test_compose_cli_prints_errors_for_approximations(tmp_path):
    runner = CliRunner()
    home = ["--home", str(tmp_path / "h")]
    for n, seed in (("a", 1), ("b", 2)):
        runner.invoke(
            cli, [*home, "add", str(write_peft_adapter(tmp_path / n, seed=seed)), "-n", n]
        )
    res = runner.invoke(
        cli, [*home, "compose", "a", "b", "--method", "svd", "--rank", "2", "-n", "s"]
    )
    assert res.exit_code == 0, res.output
    assert "REL. ERROR" in res.stdout and "model.layers.0.self_attn.q_proj" in res.stdout
    res = runner.invoke(cli, [*home, "compose", "a", "b", "-w", "1,0.5", "-n", "c", "--json"])
    data = json.loads(res.stdout)
    assert data["report"]["exact"] is True and data["adapter"]["refs"] == ["c:latest"]
    shown = runner.invoke(cli, [*home, "show", "c"]).stdout
    assert "provenance method" in shown and "cat" in shown
    res = runner.invoke(cli, [*home, "compose", "a", "--method", "nope"])
    assert res.exit_code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_compose_on_a_missing_gpu_is_a_clear_error(hub):
    with pytest.raises(ComposeError, match="no CUDA GPU"):
        hub.compose(["a", "b"], device="cuda")
