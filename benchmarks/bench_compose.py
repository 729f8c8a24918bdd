"""Compose 8 rank-16 adapters into one rank-64 adapter with SVD: lorahub vs PEFT.

The modules have LLaMA-7B shapes (q_proj/o_proj 4096x4096, up_proj 4096->11008,
down_proj 11008->4096), four per layer. Each side runs in its own subprocess on the same
seeded factors, so time and peak RSS belong to it alone. PEFT's add_weighted_adapter(svd)
forms each [out, in] delta and runs a full SVD of it (about a minute per module on
2 cores), so by default it runs on one module of each shape (layer 0's q_proj and up_proj)
and its time for all modules is extrapolated: every layer holds two modules of each cost
(o_proj is q_proj's shape, down_proj is up_proj's transpose). ``--peft layer`` runs layer 0,
``--peft all`` everything (an hour). PEFT gets ``svd_full_matrices=False``, its fastest
setting. lorahub always runs on all modules, and again on PEFT's subset for a like-for-like
time (best of 3 runs; PEFT runs once, its SVDs take minutes).

    .venv/bin/python benchmarks/bench_compose.py                # ~4 minutes on 2 cores
    .venv/bin/python benchmarks/bench_compose.py --peft none    # lorahub only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # leaf -> (in, out)
    "self_attn.q_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.up_proj": (4096, 11008),
    "mlp.down_proj": (11008, 4096),
}
WEIGHTS = [1.0, 0.8, 0.6, 0.5, -0.4, 0.3, 0.7, 0.9]


SUBSETS = {"pair": ("self_attn.q_proj", "mlp.up_proj"), "layer": tuple(SHAPES)}


def module_names(layers: int, subset: str = "all") -> list[str]:
    """All modules, or layer 0's ``pair`` / ``layer`` subset."""
    if subset != "all":
        return [f"model.layers.0.{leaf}" for leaf in SUBSETS[subset]]
    return [f"model.layers.{i}.{leaf}" for i in range(layers) for leaf in SHAPES]


def factors(adapter: int, name: str, r: int):
    """Seeded ``(A [r, in], B [out, r])`` for one adapter and module, the same in every process."""
    import torch
    import xxhash

    fin, fout = SHAPES[name.split(".", 3)[3]]
    g = torch.Generator().manual_seed(xxhash.xxh64_intdigest(f"{adapter}:{name}".encode()))
    return torch.randn(r, fin, generator=g) / fin**0.5, torch.randn(fout, r, generator=g) * 0.02


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dump(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))


def run_ours(args: argparse.Namespace) -> dict:
    from lorahub.adapter import LINEAR, LoraAdapter, LoraModule
    from lorahub.compose import compose

    names = module_names(args.layers, args.subset)
    adapters = []
    for i in range(args.adapters):
        mods = {}
        for n in names:
            a, b = factors(i, n, args.r)
            mods[n] = LoraModule(n, LINEAR, a, b, float(args.alpha))
        adapters.append(LoraAdapter({"r": args.r, "lora_alpha": args.alpha}, mods))
    before = rss_mib()
    times = []
    for _ in range(args.repeat):  # the first call also pays for LAPACK's thread-pool start
        t = time.perf_counter()
        out, report = compose(adapters, WEIGHTS[: args.adapters], method="svd", rank=args.rank)
        times.append(time.perf_counter() - t)
    keep = [n for n in names if n.startswith("model.layers.0.")]
    tensors = {f"{n}.{p}": getattr(out.modules[n], p) for n in keep for p in "AB"}
    dump(Path(args.dump) / f"ours-{args.subset}.safetensors", tensors)
    return {
        "seconds": min(times),
        "first_seconds": times[0],
        "rss_before_mib": before,
        "peak_rss_mib": peak_mib(),
        "modules": len(names),
        "reported_error": {e.module: e.rel_error for e in report.errors if e.module in keep},
    }


def run_peft(args: argparse.Namespace) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    class Node(torch.nn.Module):
        pass

    names = module_names(args.layers, args.subset)
    with torch.device("meta"):
        model = Node()
        for n in names:
            *path, leaf = n.split(".")
            parent = model
            for part in path:
                if not hasattr(parent, part):
                    setattr(parent, part, Node())
                parent = getattr(parent, part)
            fin, fout = SHAPES[n.split(".", 3)[3]]
            setattr(parent, leaf, torch.nn.Linear(fin, fout, bias=False))
    model = model.to_empty(device="cpu")  # real, uninitialised base weights: PEFT never reads them
    targets = sorted({n.rsplit(".", 1)[1] for n in names})
    cfg = {"r": args.r, "lora_alpha": args.alpha, "target_modules": targets}
    peft_model = get_peft_model(model, LoraConfig(**cfg), adapter_name="a0")
    for i in range(1, args.adapters):
        peft_model.add_adapter(f"a{i}", LoraConfig(**cfg))
    with torch.no_grad():
        for n in names:
            layer = peft_model.base_model.model.get_submodule(n)
            for i in range(args.adapters):
                a, b = factors(i, n, args.r)
                layer.lora_A[f"a{i}"].weight.copy_(a)
                layer.lora_B[f"a{i}"].weight.copy_(b)
    before = rss_mib()
    t = time.perf_counter()
    peft_model.add_weighted_adapter(
        [f"a{i}" for i in range(args.adapters)],
        WEIGHTS[: args.adapters],
        "mix",
        combination_type="svd",
        svd_rank=args.rank,
        svd_full_matrices=False,
    )
    seconds = time.perf_counter() - t
    tensors = {}
    for n in names:
        if n.startswith("model.layers.0."):
            layer = peft_model.base_model.model.get_submodule(n)
            assert layer.scaling["mix"] == 1.0
            tensors[f"{n}.A"] = layer.lora_A["mix"].weight
            tensors[f"{n}.B"] = layer.lora_B["mix"].weight
    dump(Path(args.dump) / "peft.safetensors", tensors)
    return {
        "seconds": seconds,
        "rss_before_mib": before,
        "peak_rss_mib": peak_mib(),
        "modules": len(names),
    }


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result = run_ours(args) if args.worker == "ours" else run_peft(args)
    print(json.dumps(result))


def spawn(kind: str, subset: str, args: argparse.Namespace, dump_dir: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--subset", subset, "--dump", dump_dir]
    for key in ("layers", "adapters", "r", "alpha", "rank", "threads", "repeat"):
        cmd += [f"--{key}", str(getattr(args, key))]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        sys.exit(f"{kind} worker failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def errors_vs_exact(path: Path, args: argparse.Namespace) -> dict[str, float]:
    """Relative Frobenius error of each stored delta against the exact weighted sum, float64."""
    from safetensors.torch import load_file

    stored = load_file(str(path))
    scale = args.alpha / args.r
    out = {}
    for n in sorted({k.rsplit(".", 1)[0] for k in stored}):
        exact = None
        for i, w in enumerate(WEIGHTS[: args.adapters]):
            a, b = factors(i, n, args.r)
            term = (w * scale) * (b.double() @ a.double())
            exact = term if exact is None else exact.add_(term)
        got = stored[f"{n}.B"].double() @ stored[f"{n}.A"].double()
        out[n] = float((got - exact).norm() / exact.norm())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=8, help="4 modules per layer (default 8: 32)")
    ap.add_argument(
        "--peft", choices=["pair", "layer", "all", "none"], default="pair", help="PEFT's modules"
    )
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--repeat", type=int, default=3, help="lorahub runs (best counts)")
    ap.add_argument("--worker", choices=["ours", "peft"], help=argparse.SUPPRESS)
    ap.add_argument("--subset", default="all", help=argparse.SUPPRESS)
    ap.add_argument("--dump", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    n_all = 4 * args.layers
    print(
        f"compose {args.adapters} adapters (r={args.r}, alpha={args.alpha:g}) with svd to rank "
        f"{args.rank}: {n_all} modules (4096x4096, 4096x11008), {args.threads} threads"
    )
    with tempfile.TemporaryDirectory() as tmp:
        ours = spawn("ours", "all", args, tmp)
        print(
            f"lorahub {n_all:3d} modules: {ours['seconds']:8.2f} s   "
            f"peak RSS {ours['peak_rss_mib']:6.0f} MiB (inputs {ours['rss_before_mib']:.0f} MiB)"
            f"   best of {args.repeat}, first call {ours['first_seconds']:.2f} s"
        )
        errors = {"lorahub": errors_vs_exact(Path(tmp) / "ours-all.safetensors", args)}
        if args.peft != "none":
            mine = ours if args.peft == "all" else spawn("ours", args.peft, args, tmp)
            peft = spawn("peft", args.peft, args, tmp)
            n = peft["modules"]
            if args.peft != "all":
                print(
                    f"lorahub {n:3d} modules: {mine['seconds']:8.2f} s   (PEFT's subset, "
                    f"first call {mine['first_seconds']:.2f} s)"
                )
            print(
                f"PEFT    {n:3d} modules: {peft['seconds']:8.2f} s   "
                f"peak RSS {peft['peak_rss_mib']:6.0f} MiB (model+inputs "
                f"{peft['rss_before_mib']:.0f} MiB)"
            )
            ratio = peft["seconds"] / mine["seconds"]
            print(f"speed-up on the same {n} modules, measured: {ratio:.0f}x")
            if args.peft != "all":
                full = peft["seconds"] * n_all / n  # each subset holds the shapes in proportion
                print(
                    f"PEFT    {n_all:3d} modules: {full:8.0f} s   (extrapolated, "
                    f"{peft['seconds'] / n:.1f} s per module)"
                )
                print(f"speed-up on {n_all} modules: {full / ours['seconds']:.0f}x")
            errors["PEFT"] = errors_vs_exact(Path(tmp) / "peft.safetensors", args)
        print("relative Frobenius error vs the exact weighted sum (float64):")
        for name in errors.get("PEFT", errors["lorahub"]):
            line = f"  {name:32s} lorahub {errors['lorahub'][name]:.8f}"
            line += f" (reported {ours['reported_error'][name]:.8f})"
            if "PEFT" in errors:
                line += f"   PEFT {errors['PEFT'][name]:.8f}"
            print(line)


if __name__ == "__main__":
    main()
