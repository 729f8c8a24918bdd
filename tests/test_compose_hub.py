"""Composition through the Hub and the CLI: stored with provenance, reproducible."""

from __future__ import annotations

import json

import pytest
import torch
from factories import LLAMA_MODULES, peft_adapter, tiny_gpt2, write_peft_adapter

import lorahub
from lorahub.errors import ComposeError


@pytest.fixture
def hub(hub, tmp_path):
    """The shared store, holding two adapters of the Llama modules: a (rank 4), b (rank 2)."""
    hub.add(write_peft_adapter(tmp_path / "a", r=4, alpha=8, seed=1), name="a")
    hub.add(write_peft_adapter(tmp_path / "b", r=2, alpha=4, seed=2), name="b")
    return hub


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
    for name, base, signature in (("c", "x", "1" * 32), ("d", "y", "2" * 32)):
        base_ref = BaseRef(base, None, "xxh128:" + signature)
        hub.store(adapter, name=name, origin_kind="import", origin={}, base=base_ref)
    with pytest.raises(ComposeError, match="different base architectures"):
        hub.compose(["c", "d"])


def test_compose_cli_prints_errors_for_approximations(run, tmp_path):
    for n, seed in (("a", 1), ("b", 2)):
        run("add", write_peft_adapter(tmp_path / n, seed=seed), "-n", n, code=None)
    res = run("compose", "a", "b", "--method", "svd", "--rank", "2", "-n", "s")
    assert "REL. ERROR" in res.stdout and "model.layers.0.self_attn.q_proj" in res.stdout
    res = run("compose", "a", "b", "-w", "1,0.5", "-n", "c", "--json", code=None)
    data = json.loads(res.stdout)
    assert data["report"]["exact"] is True and data["adapter"]["refs"] == ["c:latest"]
    shown = run("show", "c", code=None).stdout
    assert "provenance method" in shown and "cat" in shown
    run("compose", "a", "--method", "nope", code=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_compose_on_a_missing_gpu_is_a_clear_error(hub):
    with pytest.raises(ComposeError, match="no CUDA GPU"):
        hub.compose(["a", "b"], device="cuda")


def _gpt2_adapter(path):
    """A GPT-2 adapter as PEFT saves it: Conv1D weights, so fan_in_fan_out is true."""
    peft_adapter(
        tiny_gpt2(), path, r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True
    )
    return path


def test_adapters_for_different_models_are_refused_unless_allowed(run, tmp_path):
    run("add", write_peft_adapter(tmp_path / "a1", seed=1), "-n", "a1")
    run("add", _gpt2_adapter(tmp_path / "gpt"), "-n", "gpt")
    before = run("ls", "-q").stdout
    err = run("compose", "a1", "gpt", "--method", "cat", "-n", "mix", code=1).stderr
    assert err.startswith("Error: cannot compose adapters made for different base models")
    assert "fan_in_fan_out" in err and "--allow-mixed-bases" in err and "Traceback" not in err
    assert "a1: base 'tiny/llama' (unverified), fan_in_fan_out false" in err
    assert "gpt: base unknown, fan_in_fan_out true" in err
    assert run("ls", "-q").stdout == before  # nothing was stored
    out = json.loads(run("compose", "a1", "gpt", "--allow-mixed-bases", "--json").stdout)
    assert out["adapter"]["base"] == {}  # half of it is for a model it does not name
    assert any("fan_in_fan_out" in n for n in out["report"]["notes"])


def test_parents_naming_different_bases_are_refused(store_home, tmp_path):
    with lorahub.open(store_home) as hub:
        for n, base in (("l1", "meta-llama/Llama-3.2-1B"), ("l2", "meta-llama/Llama-3.2-1B/")):
            extra = {"base_model_name_or_path": base}
            hub.add(write_peft_adapter(tmp_path / n, seed=len(n), extra_config=extra), name=n)
        extra = {"base_model_name_or_path": "mistralai/Mistral-7B-v0.1"}
        hub.add(write_peft_adapter(tmp_path / "m", seed=5, extra_config=extra), name="m")
        same = hub.compose(["l1", "l2"]).adapter  # one base, however the path was spelled
        assert same.base.name == "meta-llama/Llama-3.2-1B"
        with pytest.raises(ComposeError) as err:
            hub.compose(["l1", "m"], name="mix")
        msg = str(err.value)
        assert "they name different base models and none was checked against one" in msg
        assert "l1: base 'meta-llama/Llama-3.2-1B' (unverified)" in msg
        assert "m: base 'mistralai/Mistral-7B-v0.1' (unverified)" in msg
        assert hub.list_adapters(["name=mix"]) == []
        mixed = hub.compose(["l1", "m"], name="mix", allow_mixed_bases=True).adapter
        assert not mixed.base.verified and mixed.base.name is None


def test_an_unverified_parent_must_fit_the_base_of_the_verified_ones(store_home, world, tmp_path):
    fits = {f"model.layers.{i}.self_attn.q_proj": (32, 32) for i in range(2)}
    with lorahub.open(store_home) as hub:
        made = hub.add(write_peft_adapter(tmp_path / "v", fits), name="v", base=world / "llama")
        hub.add(write_peft_adapter(tmp_path / "f", fits, seed=2), name="f")
        hub.add(write_peft_adapter(tmp_path / "u", seed=3), name="u")  # v_proj 32 -> 32: no
        # Same claimed base name; "f" fits the recorded base, so the result keeps that base.
        kept = hub.compose(["v", "f"]).adapter
        assert kept.base == made.adapter.base
        with pytest.raises(ComposeError, match=r"u was not recorded for a base and does not fit"):
            hub.compose(["v", "u"])
        loose = hub.compose(["v", "u"], allow_mixed_bases=True).adapter
        assert not loose.base.verified  # a base part of it does not fit is not claimed


def test_the_error_is_recorded_beside_the_identity_and_the_page_shows_it(hub):
    """An approximate composition records how far it is from the exact weighted sum (each
    module's relative Frobenius error, recomputed here in float64 from the stored factors);
    the figures are in the origin, not the manifest, so the digest does not depend on them."""
    from lorahub.serve.web.pages import _error_text

    exact = hub.compose(["a", "b"], [1.0, 0.5], method="cat", name="exact:v1")
    assert hub.get("exact:v1").origin["error"] == {"exact": True, "max": 0.0, "mean": 0.0}
    assert _error_text(hub.get("exact:v1").origin["error"]) == "exact"
    approx = hub.compose(["a", "b"], [1.0, 0.5], method="svd", rank=2, name="approx:v1")
    info = hub.get("approx:v1")
    error = info.origin["error"]
    blend, a, b = hub.load("approx:v1"), hub.load("a"), hub.load("b")
    errors = []
    for module in LLAMA_MODULES:
        target = _delta(a, module) + 0.5 * _delta(b, module)
        errors.append(float(torch.linalg.norm(_delta(blend, module) - target) / target.norm()))
    assert error["exact"] is False
    assert error["max"] == pytest.approx(max(errors), rel=1e-3)
    assert error["mean"] == pytest.approx(sum(errors) / len(errors), rel=1e-3)
    assert _error_text(error) == f"relative error max {error['max']:.3g}, mean {error['mean']:.3g}"
    assert "error" not in json.dumps(info.manifest["provenance"])
    assert exact.adapter.digest != approx.adapter.digest
    assert _error_text(None) is None and _error_text({"max": "x"}) is None  # older adapters
