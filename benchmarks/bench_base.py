"""Benchmark: base-model content hash vs raw sequential read, and signature time.

Generates (once, cached under --dir) a >= 2 GB bf16 safetensors checkpoint in 3 shards with
an index, then prints throughput of ``lorahub.base.content_hash`` warm (page cache) and cold
(caches dropped), raw read throughput of the same files (a Python ``readinto`` loop and
``cat``), the hash/raw ratio, and the time to read the tensor table + signature.

    .venv/bin/python benchmarks/bench_base.py [--dir .bench-cache/base2g] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lorahub.base import content_hash, open_base

TENSOR_SHAPE = (8192, 4096)  # bf16: 64 MiB per tensor
N_TENSORS = 34  # 2.28 GB
N_SHARDS = 3
READ_BUF = 16 << 20


def _write_shard(path: Path, tensors: list[tuple[str, bytes]]) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, data in tensors:
        header[name] = {
            "dtype": "BF16",
            "shape": list(TENSOR_SHAPE),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, data in tensors:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def generate(root: Path) -> Path:
    """The big checkpoint (kept between runs) and a tiny one; returns the big one's dir."""
    big = root / "model"
    done = big / ".complete"
    if done.exists():
        return big
    big.mkdir(parents=True, exist_ok=True)
    nbytes = int(np.prod(TENSOR_SHAPE)) * 2
    rng = np.random.default_rng(0)
    # Layer order in the files, as transformers writes them; name order differs (10 < 2).
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(N_TENSORS)]
    per = -(-N_TENSORS // N_SHARDS)
    weight_map = {}
    t0 = time.perf_counter()
    for s in range(N_SHARDS):
        shard = f"model-{s + 1:05d}-of-{N_SHARDS:05d}.safetensors"
        chunk = names[s * per : (s + 1) * per]
        _write_shard(big / shard, [(n, rng.bytes(nbytes)) for n in chunk])
        weight_map.update(dict.fromkeys(chunk, shard))
    (big / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    done.write_text("ok")
    print(f"generated {big} in {time.perf_counter() - t0:.1f} s")
    return big


def generate_tiny(root: Path) -> Path:
    tiny = root / "tiny"
    if not (tiny / "model.safetensors").exists():
        tiny.mkdir(parents=True, exist_ok=True)
        header = {}
        off = 0
        for i in range(20):
            header[f"layers.{i}.weight"] = {
                "dtype": "F32",
                "shape": [8, 8],
                "data_offsets": [off, off + 256],
            }
            off += 256
        raw = json.dumps(header).encode()
        (tiny / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(off))
    return tiny


def drop_caches(files: list[Path]) -> str:
    """Evict the files from the page cache; says which method worked."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "drop_caches"
    except OSError:
        pass
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "posix_fadvise(DONTNEED)"


def raw_read(files: list[Path]) -> int:
    buf = bytearray(READ_BUF)
    total = 0
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def cat(files: list[Path]) -> None:
    with open(os.devnull, "wb") as null:
        subprocess.run(["cat", *map(str, files)], stdout=null, check=True)


def measure(fn: Callable[[], object], nbytes: int, before: Callable[[], object], n: int) -> float:
    """Median GB/s of ``fn`` over ``n`` runs, each after ``before``."""
    rates = []
    for _ in range(n):
        before()
        t = time.perf_counter()
        fn()
        rates.append(nbytes / (time.perf_counter() - t) / 1e9)
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path(".bench-cache/base2g"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    big = generate(args.dir)
    tiny = generate_tiny(args.dir)
    base = open_base(big)
    files = [base.root / f for f in base.files]  # type: ignore[operator]
    file_bytes = sum(p.stat().st_size for p in files)
    data = base.total_bytes
    n = len(base.tensors)
    print(f"checkpoint: {big} ({len(files)} shards, {file_bytes / 1e9:.2f} GB, {n} tensors)")
    print(f"cpus: {os.cpu_count()}; repeats: {args.repeat} (median shown)")

    def warm() -> None:
        raw_read(files)

    method = drop_caches(files)

    def cold() -> None:
        drop_caches(files)

    rows = []
    for label, before in (("warm", warm), (f"cold [{method}]", cold)):
        h = measure(lambda: content_hash(base), data, before, args.repeat)
        r = measure(lambda: raw_read(files), file_bytes, before, args.repeat)
        c = measure(lambda: cat(files), file_bytes, before, args.repeat)
        rows.append((label, h, r, c))
    print()
    print(f"{'':28}{'hash GB/s':>11}{'readinto GB/s':>15}{'cat GB/s':>10}{'hash/raw':>10}")
    for label, h, r, c in rows:
        print(f"{label:28}{h:11.2f}{r:15.2f}{c:10.2f}{h / max(r, c):9.0%}")
    print("(hash/raw = hash throughput / the faster raw read of the same files)")

    def sig_ms(path: Path) -> float:
        times = []
        for _ in range(max(5, args.repeat)):
            t = time.perf_counter()
            b = open_base(path)
            _ = b.signature
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    print()
    print(f"open_base + signature, 2 GB model ({len(files)} shards): {sig_ms(big):.2f} ms")
    print(f"open_base + signature, tiny model (1 file, 20 tensors): {sig_ms(tiny):.2f} ms")
    print(f"content hash: {content_hash(base)}")


if __name__ == "__main__":
    main()
