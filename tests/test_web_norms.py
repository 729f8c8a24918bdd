"""The adapter page's per-module chart (``serve/web/norms.py``, ``serve/web/chart.py``), no
browser: the norms against the full delta in float64 with PEFT's own factors and scales,
the cache on disk, a damaged blob, and the SVG's escaping and layout."""

from __future__ import annotations

import os
import random
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import peft_adapter, tiny_gpt2, tiny_llama

import lorahub
from lorahub.digest import Digest
from lorahub.info import AdapterInfo
from lorahub.serve.auth import ANONYMOUS, Auth
from lorahub.serve.mapping import Mapping
from lorahub.serve.web import chart
from lorahub.serve.web.norms import ModuleNorm
from lorahub.serve.web.pages import WebPages

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two PEFT adapters the world fixture lacks: rsLoRA with per-module rank and alpha
    patterns, and a GPT-2 one (fan_in_fan_out)."""
    d = tmp_path_factory.mktemp("norm-adapters")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "setting fan_in_fan_out to True" for Conv1D
        peft_adapter(
            tiny_llama(),
            d / "patterned",
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            use_rslora=True,
            rank_pattern={"v_proj": 2},
            alpha_pattern={"layers.1.self_attn.q_proj": 3},
        )
        peft_adapter(tiny_gpt2(), d / "gpt2", r=4, lora_alpha=8, target_modules=["c_attn"])
    return d


def pages_of(hub: lorahub.Hub) -> WebPages:
    return WebPages(hub, Mapping("local"), Auth(hub, True))


def peft_norms(folder: Path, base: Any) -> dict[str, float]:
    """Each module's ‖scale·B·A‖ from the adapter as PEFT loads it: its factors and its own
    ``scaling`` (rsLoRA and the patterns applied by PEFT), the delta formed in float64."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(base, str(folder))
    out = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or "default" not in layer.scaling:
            continue
        if "default" in layer.lora_A:
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        else:
            a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
        scale = layer.scaling["default"]
        delta = scale * b.detach().double() @ a.detach().double()
        out[name.removeprefix("base_model.model.")] = float(torch.linalg.norm(delta))
    return out


@pytest.mark.parametrize("which", ["a", "dora-ad", "patterned", "gpt2"])
def test_norms_equal_the_full_delta_norm(which, world, made, hub):
    folder = world / which if (world / which).exists() else made / which
    hub.add(folder, name=f"{which}:v1")
    info = hub.get(f"{which}:v1")
    expected = peft_norms(folder, tiny_gpt2() if which == "gpt2" else tiny_llama())
    assert set(expected) == set(info.modules)
    if which == "gpt2":
        assert info.config["fan_in_fan_out"] is True
    if which == "dora-ad":
        assert "model.embed_tokens" in expected  # lora_embedding_A/B: the same formula
    if which == "patterned":  # the patterns really vary the scale: alpha/sqrt(r) per module
        table = {m["name"]: m["scale"] for m in _table(info)}
        assert table["model.layers.0.self_attn.v_proj"] == pytest.approx(8 / 2**0.5)
        assert table["model.layers.1.self_attn.q_proj"] == pytest.approx(3 / 2)
    norms = pages_of(hub).module_norms(info)
    assert norms is not None
    got = {n.name: n.norm for n in norms}
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-9), name


def _table(info: AdapterInfo) -> list[dict[str, Any]]:
    from lorahub.serve.web.pages import _modules

    return _modules(info)


def test_norms_are_computed_once_and_kept_on_disk(world, hub):
    hub.add(world / "a", name="a:v1")
    info = hub.get("a:v1")
    first = pages_of(hub).module_norms(info)
    assert first is not None and len(first) == 2
    key = Digest.parse(info.weights_digest).hex
    entry = hub.home / "serve" / "norms" / key[:2] / f"{key[2:]}.json"
    written = entry.stat()
    # The blob gone: a fresh server (nothing in memory) still has the values, from the file.
    blob = hub.blobs.path(Digest.parse(info.weights_digest))
    blob.rename(blob.with_name("away"))
    pages = pages_of(hub)
    assert pages.module_norms(info) == first
    assert pages.module_norms(info) == first  # then from memory
    again = entry.stat()
    assert (again.st_ino, again.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temp file left


def test_adapters_sharing_a_blob_share_its_norms_each_with_its_own_scale(world, hub, tmp_path):
    import json
    import shutil

    shutil.copytree(world / "a", tmp_path / "louder")
    config = json.loads((tmp_path / "louder" / "adapter_config.json").read_text())
    config["lora_alpha"] = config["lora_alpha"] * 3  # same factors, three times the scale
    (tmp_path / "louder" / "adapter_config.json").write_text(json.dumps(config))
    hub.add(world / "a", name="a:v1")
    hub.add(tmp_path / "louder", name="louder:v1")
    a, louder = hub.get("a:v1"), hub.get("louder:v1")
    assert a.weights_digest == louder.weights_digest and a.digest != louder.digest
    pages = pages_of(hub)
    quiet, loud = pages.module_norms(a), pages.module_norms(louder)
    assert quiet and loud and [n.name for n in quiet] == [n.name for n in loud]
    for q, lo in zip(quiet, loud, strict=True):
        assert lo.norm == pytest.approx(3 * q.norm, rel=1e-12)
    assert len(list((hub.home / "serve" / "norms").rglob("*.json"))) == 1  # one blob, one entry


def test_a_damaged_norms_entry_is_computed_again(world, hub):
    hub.add(world / "a", name="a:v1")
    info = hub.get("a:v1")
    first = pages_of(hub).module_norms(info)
    key = Digest.parse(info.weights_digest).hex
    entry = hub.home / "serve" / "norms" / key[:2] / f"{key[2:]}.json"
    entry.write_text('{"modules": {"x": NaN}}')
    assert pages_of(hub).module_norms(info) == first


@pytest.mark.parametrize("damage", ["flipped", "missing"])
def test_a_damaged_blob_gives_no_chart_and_no_error(damage, world, hub):
    from starlette.requests import Request

    hub.add(world / "a", name="a:v1")
    info = hub.get("a:v1")
    blob = hub.blobs.path(Digest.parse(info.weights_digest))
    if damage == "missing":
        blob.unlink()
    else:
        os.chmod(blob, 0o644)
        data = bytearray(blob.read_bytes())
        data[-10] ^= 0xFF  # still a readable safetensors file: only the hash tells
        blob.write_bytes(bytes(data))
    pages = pages_of(hub)
    assert pages.module_norms(info) is None
    scope = {
        "type": "http",
        "method": "GET",
        "path": f"/ui/adapters/{info.digest}",
        "query_string": b"",
        "headers": [],
        "scheme": "http",
        "server": ("testserver", 80),
        "root_path": "",
    }
    response = pages.adapter(Request(scope), ANONYMOUS, info.digest)
    body = bytes(response.body).decode()
    assert response.status_code == 200
    assert 'class="norms"' not in body and "weights could not be read" in body
    assert not (hub.home / "serve" / "norms").exists()  # nothing wrong was kept


def test_hostile_module_names_are_escaped():
    hostile = "<script>window.__pwned=1</script>"
    svg = str(chart.norms_svg([ModuleNorm(hostile, 1.0), ModuleNorm("a\"b&c'", 2.0)]))
    assert "<script" not in svg and "&lt;script&gt;" in svg
    tree = ET.fromstring(svg)  # well-formed: nothing broke out of an attribute or a title
    titles = [t.text for t in tree.iter(f"{SVG}title")]
    assert titles == [f"{hostile}: 1", "a\"b&c': 2"]
    assert not [e for e in tree.iter() if any(k.startswith("on") for k in e.attrib)]


def test_many_modules_one_thin_bar_each_in_layer_order():
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(500)]
    shuffled = random.Random(0).sample(names, len(names))
    svg = chart.norms_svg([ModuleNorm(n, float(k)) for k, n in enumerate(shuffled)])
    tree = ET.fromstring(str(svg))
    bars = [g for g in tree.iter(f"{SVG}g") if g.get("class") == "bar"]
    assert len(bars) == 500
    order = [g.find(f"{SVG}title").text.split(":")[0] for g in bars]  # type: ignore[union-attr]
    assert order == names  # layers.10 after layers.9, not after layers.1
    height = float(tree.get("viewBox", "").split()[3])
    assert height <= chart.TOP + chart.MAX_PLOT_H + chart.BOTTOM
    widths = [
        float(r.get("width", "")) for r in tree.iter(f"{SVG}rect") if r.get("class") == "fill"
    ]
    assert max(widths) <= chart.WIDTH and min(widths) == 0.0


def test_natural_order_and_axis_ticks():
    names = ["b.10", "b.9", "a.2.x", "a.10.x", "b.1"]
    assert sorted(names, key=chart.natural_key) == ["a.2.x", "a.10.x", "b.1", "b.9", "b.10"]
    assert chart.nice_ticks(13.7) == [0, 5, 10, 15]
    assert chart.nice_ticks(0.42) == [0, 0.1, 0.2, 0.3, 0.4, 0.5]
    assert chart.nice_ticks(0.0) == [0, 1]


def test_large_weights_are_read_in_the_background_and_the_page_says_so(world, hub, monkeypatch):
    """A page never waits on a large blob: the first view says the chart is coming, the
    norms are computed by one background thread, and a later view draws them."""
    import time

    from lorahub.serve.web import pages as pages_module

    monkeypatch.setattr(pages_module, "INLINE_NORMS_BYTES", 0)  # every blob counts as large
    hub.add(world / "a", name="a:v1")
    info = hub.get("a:v1")
    pages = pages_of(hub)
    first = pages.norm_chart(info)
    assert first["pending"] and first["svg"] is None and not first["unreadable"]
    deadline = time.monotonic() + 30
    while (chart_now := pages.norm_chart(info))["pending"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert chart_now["svg"] is not None and not chart_now["pending"]
    assert pages.module_norms(info) == pages_of(hub).module_norms(info)  # the same numbers
