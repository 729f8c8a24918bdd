"""Merge benchmark: lorahub's streaming merge vs ``cp -r && sync`` vs PEFT, on a ~1B Llama.

Generates (once, cached under ``--dir``) a Llama-style bf16 checkpoint of about 1.1B
parameters (TinyLlama's shape) and a rank-16 PEFT adapter on every attention and MLP
projection, then runs each contender in its own subprocess, so wall time and peak RSS
include Python start-up:

  (a) ``cp -r base out && sync``: the durable I/O floor;
  (b) ``lorahub.merge.merge_to_dir`` called from a plain script (every file fsynced);
  (c) the ``lorahub merge BASE bench:v1 -o OUT`` command, as a user runs it: store lookup,
      compatibility check and provenance included (adding the adapter and recording the
      base happen once, untimed, before the runs);
  (d) PEFT: ``from_pretrained`` + ``PeftModel.from_pretrained`` + ``merge_and_unload`` +
      ``save_pretrained`` + ``os.sync()``.

Writes through the page cache make ``cp + sync`` vary a lot from run to run on a small VM
(1.3 s to 4.9 s for the same copy), so both the best and the median run are printed; the
ratios use the best of each, the strict reading.

    .venv/bin/python benchmarks/bench_merge.py                 # CPU
    .venv/bin/python benchmarks/bench_merge.py --device cuda   # on a GPU machine

Peak RSS is the child's ``ru_maxrss`` from ``wait4``: the largest RSS of the child and its
waited-for descendants. The checkpoint is in the page cache for every run (it was just
written or read), so the figures compare work, not cold-disk reads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TIME = "/usr/bin/time"  # GNU time, for the peak RSS
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

OURS = """
import json, sys
from pathlib import Path
from safetensors.torch import load_file
from lorahub.adapter import LoraAdapter
from lorahub.base import open_base
from lorahub.merge import merge_to_dir

base, adapter_dir, out, device = sys.argv[1:5]
adapter_dir = Path(adapter_dir)
adapter = LoraAdapter.from_state_dict(
    json.loads((adapter_dir / "adapter_config.json").read_text()),
    load_file(adapter_dir / "adapter_model.safetensors"),
)
r = merge_to_dir(open_base(base), [adapter], out=Path(out), device=device)
print(f"merged {r.merged} of {r.tensors} tensors on {r.device}", file=sys.stderr)
"""

PEFT = """
import os, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

base, adapter_dir, out, device = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map=device)
model = PeftModel.from_pretrained(model, adapter_dir)
model = model.merge_and_unload()
model.save_pretrained(out)
os.sync()
"""


def llama_config(args: argparse.Namespace) -> dict:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    return cfg.to_dict() | {"architectures": ["LlamaForCausalLM"]}


def base_shapes(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    h, i, kv = args.hidden, args.intermediate, args.hidden // args.heads * args.kv_heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (args.vocab, h)}
    for n in range(args.layers):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (args.vocab, h)}
    return shapes


def write_safetensors(
    path: Path, shapes: dict[str, tuple[int, ...]], dtype: str, seed: int
) -> None:
    """Header first, then each tensor's bytes made chunk by chunk: never a whole model in RAM."""
    tdtype, size = {"BF16": (torch.bfloat16, 2), "F32": (torch.float32, 4)}[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + n * size],
        }
        offset += n * size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(seed)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in shapes.items():
            n = math.prod(shape)
            if name.endswith("norm.weight"):
                f.write(torch.ones(n, dtype=tdtype).view(torch.uint8).numpy().tobytes())
                continue
            for start in range(0, n, 1 << 24):
                chunk = torch.randn(min(1 << 24, n - start), generator=g) * 0.02
                f.write(chunk.to(tdtype).view(torch.uint8).numpy().tobytes())
    tmp.rename(path)


def prepare(args: argparse.Namespace) -> tuple[Path, Path]:
    base, adapter = args.dir / "base", args.dir / "adapter"
    config = llama_config(args)
    stamp = json.dumps([config, args.rank], sort_keys=True)
    if (args.dir / "stamp.json").is_file() and (args.dir / "stamp.json").read_text() == stamp:
        return base, adapter
    shutil.rmtree(args.dir, ignore_errors=True)
    base.mkdir(parents=True)
    adapter.mkdir()
    print(f"generating the base model under {base} ...", file=sys.stderr)
    (base / "config.json").write_text(json.dumps(config, indent=2))
    shapes = base_shapes(args)
    write_safetensors(base / "model.safetensors", shapes, "BF16", seed=0)
    lora: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in PROJECTIONS:
            out_f, in_f = shape
            lora[f"base_model.model.{module}.lora_A.weight"] = (args.rank, in_f)
            lora[f"base_model.model.{module}.lora_B.weight"] = (out_f, args.rank)
    write_safetensors(adapter / "adapter_model.safetensors", lora, "F32", seed=1)
    adapter_config = {
        "peft_type": "LORA",
        "r": args.rank,
        "lora_alpha": 2 * args.rank,
        "target_modules": PROJECTIONS,
        "base_model_name_or_path": str(base),
        "task_type": "CAUSAL_LM",
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
    }
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    (args.dir / "stamp.json").write_text(stamp)
    return base, adapter


def run(label: str, argv: list[str], out: Path, home: Path) -> dict:
    """Run one contender in a fresh process: wall time and the peak RSS of its process tree.

    GNU time measures the RSS: ``wait4`` from this (torch-laden) process would also count the
    memory the child shared with it between fork and exec.
    """
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # the previous run's dirty pages must not land on this one's sync
    env = dict(
        os.environ, PYTHONPATH=str(ROOT), TRANSFORMERS_VERBOSITY="error", LORAHUB_HOME=str(home)
    )
    rss_file = out.with_name(out.name + ".rss")
    start = time.perf_counter()
    proc = subprocess.run(
        [TIME, "-f", "%M %U %S", "-o", str(rss_file), *argv],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss, user, system = rss_file.read_text().split()[-3:]
    return {
        "label": label,
        "wall": wall,
        "rss": int(rss) * 1024,
        "cpu": float(user) + float(system),
    }


def check(ours: Path, peft: Path, names: list[str]) -> float:
    """Largest difference between our output and PEFT's, in bf16 ulps, over a few tensors."""
    from safetensors import safe_open

    worst = 0.0
    with safe_open(ours / "model.safetensors", "pt") as a:
        files = {}
        index = peft / "model.safetensors.index.json"
        weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else {}
        for name in names:
            file = peft / weight_map.get(name, "model.safetensors")
            if file not in files:
                files[file] = safe_open(file, "pt")
            x, y = a.get_tensor(name).double(), files[file].get_tensor(name).double()
            _, exp = torch.frexp(y.float())
            ulp = torch.ldexp(torch.ones_like(y), exp.double() - 8)
            worst = max(worst, float(((x - y).abs() / ulp).max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dir", type=Path, default=Path(".bench-cache/llama1b"))
    ap.add_argument(
        "--device", default="cpu", help="device for our merge and PEFT's (cpu, cuda, auto)"
    )
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--skip-peft", action="store_true", help="time cp and our merge only")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each; the fastest is shown")
    args = ap.parse_args()
    args.dir = args.dir.absolute()
    base, adapter = prepare(args)
    work = args.dir / "runs"
    work.mkdir(exist_ok=True)
    ckpt = (base / "model.safetensors").stat().st_size
    params = sum(math.prod(s) for s in base_shapes(args).values())
    subprocess.run(["cat", str(base / "model.safetensors")], stdout=subprocess.DEVNULL, check=True)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"model: {params / 1e9:.2f}B params, {ckpt / 1e9:.2f} GB bf16 ({args.layers} layers, "
        f"hidden {args.hidden}, intermediate {args.intermediate}, vocab {args.vocab}); "
        f"adapter rank {args.rank} on {len(PROJECTIONS)} projections"
    )
    print(
        f"machine: {os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}, "
        f"device {device}"
        + (f" ({torch.cuda.get_device_name()})" if device.startswith("cuda") else "")
    )
    py = sys.executable

    def driver(script: str, name: str) -> tuple[list[str], Path]:
        return [py, "-c", script, str(base), str(adapter), str(work / name), device], work / name

    home = work / "home"
    shutil.rmtree(home, ignore_errors=True)
    cli = [py, "-c", "from lorahub.cli import main; main()"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), LORAHUB_HOME=str(home))
    for setup in (["add", str(adapter), "--name", "bench:v1"], ["base", "add", str(base)]):
        subprocess.run([*cli, *setup], env=env, check=True, capture_output=True)
    contenders = [
        ("cp -r + sync", ["bash", "-c", f'cp -r "{base}" "{work / "cp"}" && sync'], work / "cp"),
        ("lorahub merge()", *driver(OURS, "ours")),
        (
            "lorahub CLI",
            [*cli, "merge", str(base), "bench:v1", "-o", str(work / "cli"), "--device", device],
            work / "cli",
        ),
    ]
    if not args.skip_peft:
        contenders.append(("peft merge+save", *driver(PEFT, "peft")))
    print(f"load average before: {os.getloadavg()[0]:.1f}; best of {args.repeat} run(s) each")
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in contenders}
    for _ in range(args.repeat):
        for label, argv, out in contenders:  # interleaved, so load changes hit all alike
            runs[label].append(run(label, argv, out, home))
    results = [min(r, key=lambda x: x["wall"]) for r in runs.values()]
    medians = {k: statistics.median(x["wall"] for x in r) for k, r in runs.items()}
    print(
        f"{'run':<18}{'best s':>8}{'GB/s':>7}{'median s':>10}{'CPU s':>7}{'peak RSS MB':>13}"
        "   all walls"
    )
    for r in results:
        gbps, mb = ckpt / r["wall"] / 1e9, r["rss"] / 2**20
        walls = " ".join(f"{x['wall']:.1f}" for x in runs[r["label"]])
        print(
            f"{r['label']:<18}{r['wall']:>8.2f}{gbps:>7.2f}{medians[r['label']]:>10.2f}"
            f"{r['cpu']:>7.1f}{mb:>13.0f}   {walls}"
        )
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    cp, ours, cli_run = results[0], results[1], results[2]
    for who, r in (("merge()", ours), ("CLI", cli_run)):
        label = f"{who} / cp time:"
        print(
            f"{label:<21}{r['wall'] / cp['wall']:.2f}  (target <= 2; medians: "
            f"{medians[r['label']] / medians[cp['label']]:.2f})"
        )
    if not args.skip_peft:
        peft = results[3]
        print(f"peft / ours time:    {peft['wall'] / ours['wall']:.2f}  (target >= 4)")
        print(f"peft / ours RSS:     {peft['rss'] / ours['rss']:.2f}  (target >= 5)")
        last = args.layers - 1
        names = [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            f"model.layers.{last}.self_attn.k_proj.weight",
            "lm_head.weight",
        ]
        worst = check(work / "ours", work / "peft", names)
        print(f"ours vs peft, worst of {len(names)} tensors: {worst:.2f} bf16 ulp")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
