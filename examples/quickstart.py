"""lorahub end to end on a tiny model made here: no download, no GPU, a few seconds.

    python examples/quickstart.py [--home DIR]

It writes a small Llama-shaped base checkpoint and two PEFT adapters for it, then stores,
names, lists, checks, composes, merges and exports them through the Python API.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import lorahub

HIDDEN, FFN, LAYERS, VOCAB = 64, 128, 2, 256
PROJ = {
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (HIDDEN, HIDDEN),
    "v_proj": (HIDDEN, HIDDEN),
    "o_proj": (HIDDEN, HIDDEN),
}
MLP = {"gate_proj": (FFN, HIDDEN), "up_proj": (FFN, HIDDEN), "down_proj": (HIDDEN, FFN)}


def make_base(path: Path) -> Path:
    """A Llama-shaped checkpoint: config.json + model.safetensors (bf16)."""
    g = torch.Generator().manual_seed(0)
    t = {
        "model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g),
        "model.norm.weight": torch.ones(HIDDEN),
        "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=g),
    }
    for i in range(LAYERS):
        for name, shape in PROJ.items():
            t[f"model.layers.{i}.self_attn.{name}.weight"] = torch.randn(*shape, generator=g) * 0.05
        for name, shape in MLP.items():
            t[f"model.layers.{i}.mlp.{name}.weight"] = torch.randn(*shape, generator=g) * 0.05
        t[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(HIDDEN)
        t[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(HIDDEN)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16) for k, v in t.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": HIDDEN,
                "intermediate_size": FFN,
                "num_hidden_layers": LAYERS,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "vocab_size": VOCAB,
                "torch_dtype": "bfloat16",
            }
        )
    )
    return path


def make_adapter(path: Path, targets: list[str], r: int, alpha: float, seed: int) -> Path:
    """A PEFT-layout adapter directory, as `save_pretrained` writes it."""
    g = torch.Generator().manual_seed(seed)
    shapes = {**PROJ, **MLP}
    sd = {}
    for i in range(LAYERS):
        for name in targets:
            out_f, in_f = shapes[name]
            group = "self_attn" if name in PROJ else "mlp"
            key = f"base_model.model.model.layers.{i}.{group}.{name}"
            sd[f"{key}.lora_A.weight"] = torch.randn(r, in_f, generator=g) * 0.1
            sd[f"{key}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.1
    path.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": r,
                "lora_alpha": alpha,
                "target_modules": targets,
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": "tiny-llama",
            }
        )
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="store directory (default: a new temporary one)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lorahub-quickstart-"))
    home = Path(args.home) if args.home else work / "store"

    base = make_base(work / "tiny-llama")
    sql = make_adapter(work / "sql-expert", ["q_proj", "v_proj"], r=8, alpha=16, seed=1)
    tone_targets = ["q_proj", "o_proj", "down_proj"]
    tone = make_adapter(work / "tone-formal", tone_targets, r=4, alpha=4, seed=2)

    hub = lorahub.open(home)
    print(f"store: {hub.home}")
    for src, name in ((sql, "sql-expert:v1"), (tone, "tone-formal:v1")):
        res = hub.add(src, name=name)
        print(f"{res.status:<8} {name:<16} {res.adapter.digest}")
    hub.tag("sql-expert:v1", "sql-expert:prod")

    for info in hub.list_adapters():
        print(
            f"  {', '.join(info.refs):<32} rank={info.rank:<3} alpha={info.alpha:<5g} "
            f"targets={','.join(info.targets)}"
        )
    print(
        "only rank 8 on q_proj:", [i.refs for i in hub.list_adapters(["rank=8", "target=q_proj"])]
    )

    base_info = hub.add_base(base)
    print(f"base {base_info.name}: {base_info.tensor_count} tensors, {base_info.content_hash}")
    print("check:", hub.check("sql-expert:prod", base=base).summary.splitlines()[0])
    fit = hub.resolve("tone-formal:v1", base=base)
    print(f"resolve tone-formal:v1 -> {fit.short} ({fit.match})")

    blend = hub.compose(["sql-expert:v1", "tone-formal:v1"], [1.0, 0.5], name="blend:v1")
    print(f"composed blend:v1 = {blend.report.summary}")
    small = hub.compose(
        ["sql-expert:v1", "tone-formal:v1"], [1.0, 0.5], method="svd", rank=4, name="blend:r4"
    )
    print(f"composed blend:r4 = {small.report.summary}")

    result = hub.merge(base, ["sql-expert:v1", "tone-formal:v1"], [1.0, 0.5], out=work / "merged")
    print(
        f"merged {result.merged}/{result.tensors} tensors into {result.path} "
        f"({result.bytes_written} bytes, {result.seconds:.2f}s on {result.device})"
    )
    cached = hub.merged(base, ["blend:v1"])
    print(f"on-demand merge of blend:v1 kept at {cached}")

    out = hub.export("sql-expert:prod", work / "exported")
    print(f"exported a PEFT folder: {sorted(p.name for p in out.iterdir())}")

    report = hub.verify()
    print(
        f"verify: {report.checked_blobs} blobs, {report.checked_adapters} adapters, ok={report.ok}"
    )
    print("done")


if __name__ == "__main__":
    main()
