"""Composition of adapters, checked against float64 references written here and against PEFT.

Parents are built from seeded factors with known alpha, r and rsLoRA, so every reference
delta is the plain formula ``w * s * B @ A`` computed here, never by the code under test.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import xxhash
from factories import tiny_llama
from safetensors.torch import save_file

from lorahub import compose as compose_mod
from lorahub.adapter import LoraAdapter, pattern_value
from lorahub.compose import METHODS, ComposeError, compose

F64 = torch.float64
P = "base_model.model."


class Parent:
    """A seeded parent: the adapter plus the raw numbers the references are computed from."""

    def __init__(
        self,
        modules: dict[str, tuple[int, int]],
        *,
        r: int,
        alpha: float,
        seed: int,
        rslora: bool = False,
        fan_in_fan_out: bool = False,
        ranks: dict[str, int] | None = None,
        alphas: dict[str, float] | None = None,
        embeddings: frozenset[str] = frozenset(),
        config: dict | None = None,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        ranks, alphas = ranks or {}, alphas or {}
        self.raw: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        sd = {}
        for name, (fin, fout) in modules.items():
            leaf = name.rsplit(".", 1)[-1]
            rr, aa = ranks.get(leaf, r), alphas.get(leaf, alpha)
            a = torch.randn(rr, fin, generator=g) / math.sqrt(fin)
            b = torch.randn(fout, rr, generator=g)
            scale = aa / (math.sqrt(rr) if rslora else rr)
            self.raw[name] = (a, b, scale)
            if name in embeddings:
                sd[f"{P}{name}.lora_embedding_A"], sd[f"{P}{name}.lora_embedding_B"] = a, b
            else:
                sd[f"{P}{name}.lora_A.weight"], sd[f"{P}{name}.lora_B.weight"] = a, b
        cfg = {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": alpha,
            "use_rslora": rslora,
            "fan_in_fan_out": fan_in_fan_out,
            "rank_pattern": ranks,
            "alpha_pattern": alphas,
            "target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules}),
            "base_model_name_or_path": "tiny/base",
            "task_type": "CAUSAL_LM",
            **(config or {}),
        }
        self.adapter = LoraAdapter.from_state_dict(cfg, sd)

    def task_vector(self, name: str, weight: float) -> torch.Tensor:
        """``w * s * B @ A`` in float64, in the factors' [out, in] layout; zero if absent."""
        a, b, s = self.raw[name]
        return weight * s * (b.to(F64) @ a.to(F64))


def reference_sum(parents, weights, name, shape) -> torch.Tensor:
    total = torch.zeros(shape, dtype=F64)
    for p, w in zip(parents, weights, strict=True):
        if name in p.raw:
            total += p.task_vector(name, w)
    return total


def stored(adapter: LoraAdapter, name: str) -> torch.Tensor:
    """The stored delta in the factors' [out, in] layout, r and alpha read from the config."""
    m = adapter.modules[name]
    cfg = adapter.config
    r = pattern_value(cfg["rank_pattern"], name) or cfg["r"]
    alpha = pattern_value(cfg["alpha_pattern"], name) or cfg["lora_alpha"]
    assert r == m.rank and not cfg["use_rslora"] and not cfg["use_dora"]
    return alpha / r * (m.B.flatten(1).to(F64) @ m.A.flatten(1).to(F64))


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).detach().norm() / y.detach().norm())


QV = {"layers.0.q": (12, 10), "layers.0.v": (12, 10), "layers.1.q": (12, 10)}


@pytest.fixture
def parents() -> list[Parent]:
    p1 = Parent(QV, r=4, alpha=8, seed=1)
    p2 = Parent(
        {"layers.0.q": (12, 10), "layers.1.q": (12, 10), "layers.0.up": (12, 16)},
        r=6,
        alpha=3,
        rslora=True,
        ranks={"up": 2},
        alphas={"up": 5},
        seed=2,
    )
    p3 = Parent({"layers.0.v": (12, 10), "layers.0.up": (12, 16)}, r=3, alpha=3, seed=3)
    return [p1, p2, p3]


WEIGHTS = [1.0, -0.7, 0.4]
SHAPES = {
    "layers.0.q": (10, 12),
    "layers.0.v": (10, 12),
    "layers.1.q": (10, 12),
    "layers.0.up": (16, 12),
}


def test_cat_is_the_exact_weighted_sum(parents):
    out, report = compose([p.adapter for p in parents], WEIGHTS, method="cat")
    assert sorted(out.modules) == sorted(SHAPES)
    for name, shape in SHAPES.items():
        ref = reference_sum(parents, WEIGHTS, name, shape)
        assert rel(stored(out, name), ref) < 1e-6, name
    ranks = {e.module: e.rank for e in report.errors}
    assert ranks == {"layers.0.q": 10, "layers.0.v": 7, "layers.1.q": 10, "layers.0.up": 5}
    assert report.exact and report.max_error < 1e-6
    assert report.rank == 10


@pytest.mark.parametrize("method", ["cat", "linear", "svd"])
def test_parts_that_cancel_report_no_error(parents, method):
    """a - a is a zero target: its error is 0, not a division of rounding noise by noise."""
    a = parents[0].adapter
    _, report = compose([a, a], [1.0, -1.0], method=method)
    assert report.max_error == 0.0


def test_config_has_scaling_one_per_module_and_round_trips(parents):
    out, report = compose([p.adapter for p in parents], WEIGHTS, method="cat")
    cfg = out.config
    assert cfg["use_rslora"] is False and cfg["use_dora"] is False
    assert cfg["r"] == cfg["lora_alpha"] == report.rank
    assert cfg["target_modules"] == ["q", "up", "v"]
    assert cfg["base_model_name_or_path"] == "tiny/base" and cfg["task_type"] == "CAUSAL_LM"
    for name, m in out.modules.items():
        r = pattern_value(cfg["rank_pattern"], name) or cfg["r"]
        alpha = pattern_value(cfg["alpha_pattern"], name) or cfg["lora_alpha"]
        assert r == m.rank and alpha == r
    # anchored full names: "layers.0.v" must not match "xlayers.0.v" or "layers.0.vv"
    assert all(key.startswith("^") for key in cfg["rank_pattern"])
    assert pattern_value(cfg["rank_pattern"], "layers.0.v") == 7
    assert pattern_value(cfg["rank_pattern"], "x.layers.0.v") is None
    again = LoraAdapter.from_state_dict(json.loads(json.dumps(cfg)), out.state_dict())
    assert all(torch.equal(again.modules[n].A, out.modules[n].A) for n in out.modules)


def test_svd_at_or_above_total_rank_equals_cat(parents):
    adapters = [p.adapter for p in parents]
    cat, _ = compose(adapters, WEIGHTS, method="cat")
    svd, report = compose(adapters, WEIGHTS, method="svd", rank=64)
    for name in SHAPES:
        assert rel(stored(svd, name), stored(cat, name)) < 1e-6
    assert report.exact and report.max_error < 1e-6
    # capped at the total rank of each module (and min(out, in)), nothing lost
    assert {e.module: e.rank for e in report.errors}["layers.0.v"] == 7


@pytest.mark.parametrize("method", ["svd", "linear"])
def test_low_rank_matches_float64_truncated_svd(parents, method):
    k = 3
    out, report = compose([p.adapter for p in parents], WEIGHTS, method=method, rank=k)
    errors = {e.module: e.rel_error for e in report.errors}
    for name, shape in SHAPES.items():
        ref = reference_sum(parents, WEIGHTS, name, shape)
        u, s, vh = torch.linalg.svd(ref)
        best = (u[:, :k] * s[:k]) @ vh[:k]
        assert rel(stored(out, name), best) < 1e-5, name
        expected = float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())
        assert errors[name] == pytest.approx(expected, abs=1e-6)
    assert not report.exact
    assert report.max_error == max(errors.values())


@pytest.mark.parametrize(
    ("rslora", "r", "alpha", "scale"), [(False, 4, 8, 2.0), (True, 4, 6, 3.0), (True, 9, 9, 3.0)]
)
@pytest.mark.parametrize("method", ["cat", "svd"])
def test_source_scaling_is_applied_once(rslora, r, alpha, scale, method):
    p = Parent({"m": (7, 5)}, r=r, alpha=alpha, rslora=rslora, seed=4)
    out, _ = compose([p.adapter], [1.0], method=method)
    a, b, _ = p.raw["m"]
    assert rel(stored(out, "m"), scale * (b.to(F64) @ a.to(F64))) < 1e-6


def test_fan_in_fan_out_parents_keep_their_layout():
    names = {"h.0.c_attn": (8, 24)}
    p1 = Parent(names, r=2, alpha=4, seed=5, fan_in_fan_out=True)
    p2 = Parent(names, r=3, alpha=3, seed=6, fan_in_fan_out=True)
    out, _ = compose([p1.adapter, p2.adapter], [0.5, 2.0])
    assert out.fan_in_fan_out and out.config["fan_in_fan_out"] is True
    ref = reference_sum([p1, p2], [0.5, 2.0], "h.0.c_attn", (24, 8)).T  # Conv1D: [in, out]
    assert out.delta("h.0.c_attn", dtype=F64).shape == (8, 24)
    assert rel(out.delta("h.0.c_attn", dtype=F64), ref) < 1e-6
    # A parent saved with the other flag has the same factors, hence the same linear map.
    p3 = Parent(names, r=2, alpha=4, seed=5, fan_in_fan_out=False)
    mixed, report = compose([p2.adapter, p3.adapter], [2.0, 0.5])
    assert mixed.fan_in_fan_out and any("fan_in_fan_out" in n for n in report.notes)
    assert rel(mixed.delta("h.0.c_attn", dtype=F64), ref) < 1e-6


def test_elementwise_rank_defaults_to_the_sum_of_parent_ranks(parents):
    _, report = compose([p.adapter for p in parents], WEIGHTS, method="ties", density=0.5)
    ranks = {e.module: e.rank for e in report.errors}
    assert ranks == {"layers.0.q": 10, "layers.0.v": 7, "layers.1.q": 10, "layers.0.up": 5}
    assert any("rank not given" in n for n in report.notes)


def test_lora_biases_are_summed_and_load_in_peft(tmp_path: Path):
    from peft import PeftModel

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin1 = torch.nn.Linear(6, 5)
            self.lin2 = torch.nn.Linear(5, 4)

        def forward(self, x):
            return self.lin2(torch.relu(self.lin1(x)))

    plain = {"task_type": None}
    p1 = Parent({"lin1": (6, 5)}, r=2, alpha=4, seed=1, config={"lora_bias": True, **plain})
    p2 = Parent({"lin1": (6, 5), "lin2": (5, 4)}, r=3, alpha=3, seed=2, config=plain)
    bias = torch.randn(5, generator=torch.Generator().manual_seed(3))
    p1.adapter.modules["lin1"].bias = bias
    weights = [0.5, 1.5]
    out, report = compose([p1.adapter, p2.adapter], weights, method="svd", rank=4)
    assert out.config["lora_bias"] is True
    assert torch.allclose(out.modules["lin1"].bias, 0.5 * 2.0 * bias)
    assert torch.equal(out.modules["lin2"].bias, torch.zeros(4))
    assert any("bias" in n for n in report.notes)

    adir = tmp_path / "biased"
    adir.mkdir()
    save_file(out.state_dict(), str(adir / "adapter_model.safetensors"))
    (adir / "adapter_config.json").write_text(json.dumps(out.config))
    torch.manual_seed(0)
    base = Tiny().to(F64)
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adir)).eval()
    ref = copy.deepcopy(base)
    with torch.no_grad():
        ref.lin1.weight += stored(out, "lin1")
        ref.lin1.bias += 0.5 * 2.0 * bias.to(F64)
        ref.lin2.weight += stored(out, "lin2")
        x = torch.randn(3, 6, dtype=F64)
        assert torch.allclose(model(x), ref(x), rtol=1e-6, atol=1e-7)


def test_conv2d_and_embedding_modules():
    g = torch.Generator().manual_seed(7)
    sds, raws = [], []
    for r in (2, 3):
        a, b = torch.randn(r, 3, 3, 3, generator=g), torch.randn(5, r, 1, 1, generator=g)
        ea, eb = torch.randn(r, 11, generator=g), torch.randn(6, r, generator=g)
        sds.append(
            {
                f"{P}conv.lora_A.weight": a,
                f"{P}conv.lora_B.weight": b,
                f"{P}emb.lora_embedding_A": ea,
                f"{P}emb.lora_embedding_B": eb,
            }
        )
        raws.append((a, b, ea, eb, 2.0 / r))
    adapters = [
        LoraAdapter.from_state_dict({"r": r, "lora_alpha": 2.0}, sd)
        for r, sd in zip((2, 3), sds, strict=True)
    ]
    w = [1.5, -0.5]
    conv_ref = sum(
        wi * s * torch.einsum("or,rihw->oihw", b[:, :, 0, 0].to(F64), a.to(F64))
        for wi, (a, b, _, _, s) in zip(w, raws, strict=True)
    )
    emb_ref = sum(
        wi * s * (eb.to(F64) @ ea.to(F64)).T for wi, (_, _, ea, eb, s) in zip(w, raws, strict=True)
    )
    cat, _ = compose(adapters, w)
    assert cat.modules["emb"].kind == "embedding" and cat.modules["conv"].kind == "conv2d"
    assert cat.modules["conv"].A.shape == (5, 3, 3, 3) and cat.modules["conv"].B.shape == (
        5,
        5,
        1,
        1,
    )
    assert rel(cat.delta("conv", dtype=F64), conv_ref) < 1e-6
    assert rel(cat.delta("emb", dtype=F64), emb_ref) < 1e-6
    assert set(cat.state_dict()) >= {f"{P}emb.lora_embedding_A", f"{P}conv.lora_A.weight"}

    svd, _ = compose(adapters, w, method="svd", rank=2)
    u, s, vh = torch.linalg.svd(conv_ref.flatten(1))
    best = ((u[:, :2] * s[:2]) @ vh[:2]).reshape(conv_ref.shape)
    assert rel(svd.delta("conv", dtype=F64), best) < 1e-5


# --- TIES, DARE, magnitude pruning against a plain float64 reference ---------------------


def ref_trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * n) largest magnitudes (and any tied with the smallest kept)."""
    k = int(density * t.numel())
    if k == 0:
        return torch.zeros_like(t)
    cut = t.abs().flatten().sort(descending=True).values[k - 1]
    return torch.where(t.abs() >= cut, t, torch.zeros_like(t))


def ref_dare_mask(seed: int, module: str, index: int, shape, density: float) -> torch.Tensor:
    # The documented contract: xxh64("<seed>:<module>:<index>") seeds a CPU generator, and an
    # element survives where a float32 uniform draw over [out, in] is below the density.
    g = torch.Generator().manual_seed(xxhash.xxh64_intdigest(f"{seed}:{module}:{index}".encode()))
    return torch.rand(shape, generator=g, dtype=torch.float32) < density


def ref_merge(method, vectors, density, majority_sign, masks=None) -> torch.Tensor:
    """Element by element, as the papers describe the methods."""
    if method in ("dare_linear", "dare_ties"):
        vals = [
            torch.where(m, v / density, torch.zeros_like(v))
            for v, m in zip(vectors, masks, strict=True)
        ]
    else:
        vals = [ref_trim(v, density) for v in vectors]
    if method in ("dare_linear", "magnitude_prune"):
        return sum(vals)
    out = torch.zeros_like(vals[0])
    rows, cols = out.shape
    for i in range(rows):
        for j in range(cols):
            xs = [float(v[i, j]) for v in vals]
            signs = [(x > 0) - (x < 0) for x in xs]
            vote = sum(xs) if majority_sign == "total" else sum(signs)
            elected = 1.0 if vote >= 0 else -1.0
            agreeing = [x for x in xs if x * elected > 0]
            out[i, j] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    return out


ELEMENTWISE = [
    ("ties", "total"),
    ("ties", "frequency"),
    ("dare_ties", "total"),
    ("dare_ties", "frequency"),
    ("dare_linear", "total"),
    ("magnitude_prune", "total"),
]


def reference_targets(parents, weights, method, density, majority_sign, seed):
    targets = {}
    for name, shape in SHAPES.items():
        vecs, masks = [], []
        for i, (p, w) in enumerate(zip(parents, weights, strict=True)):
            if name in p.raw:
                vecs.append(p.task_vector(name, w))
                masks.append(ref_dare_mask(seed, name, i, shape, density))
        targets[name] = ref_merge(method, vecs, density, majority_sign, masks)
    return targets


@pytest.mark.parametrize(("method", "sign"), ELEMENTWISE)
def test_elementwise_methods_match_reference_at_full_rank(parents, method, sign):
    density, seed = 0.4, 11
    adapters = [p.adapter for p in parents]
    out, report = compose(
        adapters, WEIGHTS, method=method, rank=12, density=density, majority_sign=sign, seed=seed
    )
    targets = reference_targets(parents, WEIGHTS, method, density, sign, seed)
    for name, target in targets.items():
        assert target.abs().sum() > 0
        assert rel(stored(out, name), target) < 1e-5, name
    assert not report.exact and report.max_error < 1e-5
    assert report.density == density


@pytest.mark.parametrize(("method", "sign"), [("ties", "total"), ("dare_ties", "frequency")])
def test_elementwise_methods_truncate_optimally_and_report_the_error(parents, method, sign):
    density, seed, k = 0.5, 3, 4
    out, report = compose(
        [p.adapter for p in parents],
        WEIGHTS,
        method=method,
        rank=k,
        density=density,
        majority_sign=sign,
        seed=seed,
    )
    errors = {e.module: e.rel_error for e in report.errors}
    for name, target in reference_targets(parents, WEIGHTS, method, density, sign, seed).items():
        u, s, vh = torch.linalg.svd(target)
        best = (u[:, :k] * s[:k]) @ vh[:k]
        assert rel(stored(out, name), best) < 1e-4, name
        assert errors[name] == pytest.approx(rel(stored(out, name), target), rel=1e-4)
    assert {e.rank for e in report.errors} == {k}


def test_randomized_refactor_is_near_optimal_and_deterministic(monkeypatch):
    monkeypatch.setattr(compose_mod, "_RANDOMIZED_MIN_DIM", 16)
    names = {"big": (128, 96)}
    ps = [Parent(names, r=8, alpha=8, seed=20 + i) for i in range(4)]
    w = [1.0, 0.8, 0.6, -0.5]
    kw = {"method": "ties", "rank": 8, "density": 0.5, "seed": 5}
    out, report = compose([p.adapter for p in ps], w, **kw)
    assert any("randomized" in n for n in report.notes)
    target = ref_merge(
        "ties", [p.task_vector("big", wi) for p, wi in zip(ps, w, strict=True)], 0.5, "total"
    )
    s = torch.linalg.svdvals(target)
    optimal = float(s[8:].square().sum().sqrt() / s.square().sum().sqrt())
    actual = rel(stored(out, "big"), target)
    assert report.max_error == pytest.approx(actual, rel=1e-4)
    assert optimal <= actual <= 1.01 * optimal
    again, _ = compose([p.adapter for p in ps], w, **kw)
    assert torch.equal(again.modules["big"].A, out.modules["big"].A)


@pytest.mark.parametrize(
    ("method", "kw"),
    [
        ("cat", {}),
        ("linear", {}),
        ("svd", {"rank": 4}),
        ("ties", {"density": 1.0, "rank": 4}),
        ("dare_ties", {"density": 1.0, "rank": 4}),
        ("dare_linear", {"density": 1.0, "rank": 4}),
        ("magnitude_prune", {"density": 1.0, "rank": 4}),
    ],
)
def test_single_adapter_with_weight_one_reproduces_itself(method, kw):
    p = Parent(QV, r=4, alpha=16, rslora=True, seed=9)
    out, report = compose([p.adapter], method=method, **kw)
    for name in QV:
        a, b, s = p.raw[name]
        assert rel(stored(out, name), s * (b.to(F64) @ a.to(F64))) < 1e-5
    assert report.max_error < 1e-5


def test_dare_is_deterministic_with_a_seed(parents):
    adapters = [p.adapter for p in parents]
    kw = {"method": "dare_ties", "rank": 4, "density": 0.3}
    first, _ = compose(adapters, WEIGHTS, seed=42, **kw)
    second, _ = compose(adapters, WEIGHTS, seed=42, **kw)
    other, _ = compose(adapters, WEIGHTS, seed=43, **kw)
    sd1, sd2, sd3 = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert any(not torch.equal(sd1[k], sd3[k]) for k in sd1)


def test_result_is_float32_on_cpu_whatever_the_parents_dtype(parents):
    bf16 = copy.deepcopy(parents[0].adapter)
    for m in bf16.modules.values():
        m.A, m.B = m.A.to(torch.bfloat16), m.B.to(torch.bfloat16)
    out, _ = compose([bf16, parents[1].adapter], [1.0, 1.0])
    assert {t.dtype for t in out.state_dict().values()} == {torch.float32}


# --- PEFT as the reference -----------------------------------------------------------------


def test_linear_differs_from_peft_linear_by_the_cross_terms():
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin1 = torch.nn.Linear(12, 10)
            self.lin2 = torch.nn.Linear(10, 8)

    torch.manual_seed(0)
    model = get_peft_model(Tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["lin1", "lin2"]))
    model.add_adapter("b", LoraConfig(r=4, lora_alpha=3, target_modules=["lin1", "lin2"]))
    g = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=g)
    weights = [0.7, -0.4]
    model.add_weighted_adapter(["default", "b"], weights, "mix", combination_type="linear")

    parents = [
        LoraAdapter.from_state_dict(
            {"r": 4, "lora_alpha": model.peft_config[name].lora_alpha},
            get_peft_model_state_dict(model, adapter_name=name),
        )
        for name in ("default", "b")
    ]
    ours, report = compose(parents, weights, method="linear")
    assert report.exact

    for module in ("lin1", "lin2"):
        layer = getattr(model.base_model.model, module)
        peft_delta = layer.get_delta_weight("mix").to(F64)
        coef = [w * layer.scaling[a] for w, a in zip(weights, ("default", "b"), strict=True)]
        a_ = [layer.lora_A[a].weight.to(F64) for a in ("default", "b")]
        b_ = [layer.lora_B[a].weight.to(F64) for a in ("default", "b")]
        # PEFT sums sqrt(|c_i|) B_i and sign(c_j) sqrt(|c_j|) A_j separately, so its product
        # has the terms i != j on top of the weighted sum of deltas.
        cross = sum(
            math.sqrt(abs(coef[i]))
            * math.sqrt(abs(coef[j]))
            * math.copysign(1, coef[j])
            * (b_[i] @ a_[j])
            for i in range(2)
            for j in range(2)
            if i != j
        )
        exact = sum(c * (b @ a) for c, a, b in zip(coef, a_, b_, strict=True))
        assert rel(stored(ours, module), exact) < 1e-6
        assert float(cross.detach().norm()) > 0.1 * float(exact.detach().norm())
        assert rel(stored(ours, module) + cross, peft_delta) < 1e-5


def test_exported_composition_loads_in_peft_with_exact_logits(tmp_path: Path):
    from peft import PeftModel

    base = tiny_llama(dtype=F64, vocab=64, intermediate=48, max_position_embeddings=64)

    attn = {
        f"model.layers.{i}.self_attn.{p}": (32, 32 if p == "q_proj" else 16)
        for i in range(2)
        for p in ("q_proj", "v_proj")
    }
    up = {f"model.layers.{i}.mlp.up_proj": (32, 48) for i in range(2)}
    p1 = Parent(
        {**attn, "model.embed_tokens": (64, 32)},
        r=4,
        alpha=8,
        seed=30,
        embeddings=frozenset({"model.embed_tokens"}),
    )
    p2 = Parent(
        {k: v for k, v in attn.items() if "v_proj" in k} | up,
        r=2,
        alpha=4,
        rslora=True,
        ranks={"up_proj": 3},
        seed=31,
    )
    weights = [0.8, 1.3]
    out, report = compose([p1.adapter, p2.adapter], weights, method="cat")
    assert len({e.rank for e in report.errors}) > 1  # exercises rank_pattern in PEFT

    adir = tmp_path / "blend"
    adir.mkdir()
    save_file(out.state_dict(), str(adir / "adapter_model.safetensors"))
    (adir / "adapter_config.json").write_text(json.dumps(out.config))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(adir)).eval()

    reference = copy.deepcopy(base)
    params = dict(reference.named_parameters())
    shapes = {n: tuple(params[n + ".weight"].shape) for n in out.modules}
    with torch.no_grad():
        for name in out.modules:
            w = params[name + ".weight"]
            if name == "model.embed_tokens":
                w += reference_sum([p1, p2], weights, name, shapes[name][::-1]).T
            else:
                w += reference_sum([p1, p2], weights, name, shapes[name])
        ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
        got = peft_model(input_ids=ids).logits
        want = reference(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert got.dtype == F64
    assert float((want - plain).abs().max()) > 1e-2 * float(want.abs().max())
    assert float((got - want).abs().max()) < 1e-6 * float(want.abs().max())


# --- refusals ------------------------------------------------------------------------------


def test_dora_parent_is_refused():
    p = Parent({"m": (6, 4)}, r=2, alpha=2, seed=1, config={"use_dora": True})
    p.adapter.modules["m"].magnitude = torch.ones(4)
    with pytest.raises(ComposeError, match="DoRA"):
        compose([p.adapter])


def test_shape_conflict_names_module_and_shapes():
    a = Parent({"layers.0.q": (12, 10)}, r=2, alpha=2, seed=1)
    b = Parent({"layers.0.q": (12, 14)}, r=2, alpha=2, seed=2)
    with pytest.raises(ComposeError, match=r"'layers\.0\.q'.*out 10.*out 14"):
        compose([a.adapter, b.adapter])


def test_kind_conflict_is_refused():
    a = Parent({"emb": (12, 10)}, r=2, alpha=2, seed=1, embeddings=frozenset({"emb"}))
    b = Parent({"emb": (12, 10)}, r=2, alpha=2, seed=2)
    with pytest.raises(ComposeError, match="embedding"):
        compose([a.adapter, b.adapter])


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"method": "mean"}, "unknown composition method 'mean'"),
        ({"method": "ties", "rank": 2}, "needs a density"),
        ({"method": "ties", "density": 0.0}, r"density must be a number in \(0, 1\]"),
        ({"method": "dare_linear", "density": 1.5}, r"density must be a number in \(0, 1\]"),
        ({"method": "svd", "rank": 2, "density": 0.5}, "density is used only by"),
        ({"method": "cat", "rank": 4}, "cat keeps every parent's rank"),
        ({"method": "svd", "rank": 0}, "rank must be a positive integer"),
        ({"method": "ties", "density": 0.5, "majority_sign": "mean"}, "majority_sign"),
        ({"weights": [1.0]}, "1 weights for 2 adapters"),
        ({"weights": [1.0, float("nan")]}, "not finite"),
    ],
)
def test_bad_arguments_are_refused(kw, match):
    a = Parent({"m": (6, 4)}, r=2, alpha=2, seed=1)
    b = Parent({"m": (6, 4)}, r=2, alpha=2, seed=2)
    with pytest.raises(ComposeError, match=match):
        compose([a.adapter, b.adapter], **kw)
    assert "cat" in METHODS


def test_modules_to_save_must_agree():
    head = torch.randn(4, 6)
    a = Parent({"m": (6, 4)}, r=2, alpha=2, seed=1, config={"modules_to_save": ["lm_head"]})
    b = Parent({"m": (6, 4)}, r=2, alpha=2, seed=2, config={"modules_to_save": ["lm_head"]})
    c = Parent({"m": (6, 4)}, r=2, alpha=2, seed=3)
    a.adapter.full["lm_head.weight"] = head
    b.adapter.full["lm_head.weight"] = head.clone()
    out, report = compose([a.adapter, b.adapter])
    assert out.config["modules_to_save"] == ["lm_head"]
    assert report.copied == ("lm_head.weight",) and torch.equal(out.full["lm_head.weight"], head)
    with pytest.raises(ComposeError, match="modules_to_save"):
        compose([a.adapter, c.adapter])
    b.adapter.full["lm_head.weight"] = head + 1
    with pytest.raises(ComposeError, match=r"different trained copies of 'lm_head\.weight'"):
        compose([a.adapter, b.adapter])
