"""Push an adapter to a Hub, pull it into a second store, and show what crossed the wire.

    python examples/push_pull.py                 # local Hub look-alike: no account, no network
    python examples/push_pull.py --local         # the same, even when HF_ENDPOINT is set
    HF_ENDPOINT=https://huggingface.co python examples/push_pull.py --repo you/lorahub-demo

Without HF_ENDPOINT (or with --local) it starts the Hub-compatible test server from
tests/hubserver.py on 127.0.0.1 and points huggingface_hub at it, so it runs on a fresh
machine. Against a real Hub it uses your token (HF_TOKEN or `hf auth login`) and --repo.

It makes a small PEFT adapter, adds it to store A, pushes it twice (the second push uploads
nothing), pulls it into store B twice (the second pull downloads no weights) and checks both
stores hold the same digest.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_TOKEN = "hf_local_demo_token"


def make_adapter(path: Path) -> Path:
    """A PEFT adapter for a Llama-shaped model (2 layers, q/v, rank 8), seeded."""
    import json

    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(8, 256, generator=g)
            tensors[f"{key}.lora_B.weight"] = torch.randn(256, 8, generator=g) * 0.01
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "meta-llama/Llama-3.2-1B",
        "task_type": "CAUSAL_LM",
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path


def start_local_hub(workdir: Path):
    """Start the test Hub and set huggingface_hub's environment before it is imported."""
    from tests.hubserver import HubServer  # standard library only

    server = HubServer().start()
    server.add_token(DEMO_TOKEN, "demo")
    os.environ.update(
        {
            "HF_ENDPOINT": server.url,
            "HF_TOKEN": DEMO_TOKEN,
            "HF_HOME": str(workdir / "hf-home"),
            "HF_HUB_DISABLE_XET": "1",  # the test server speaks LFS, not Xet
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_VERBOSITY": "error",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    os.environ.pop("HF_HUB_OFFLINE", None)
    if "huggingface_hub" in sys.modules:  # imported already: patch what it read at import
        from huggingface_hub import constants

        constants.ENDPOINT = server.url
        constants.HUGGINGFACE_CO_URL_TEMPLATE = (
            server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        constants.HF_HUB_DISABLE_XET = True
        constants.HF_HUB_OFFLINE = False
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--local", action="store_true", help="use the local test Hub server")
    parser.add_argument("--repo", help="repo to push to (default: demo/sql-expert locally)")
    args = parser.parse_args(argv)
    local = args.local or not os.environ.get("HF_ENDPOINT")
    if not local and not args.repo:
        parser.error("against a real Hub, give --repo you/some-repo")

    sys.path.insert(0, str(ROOT))  # lorahub and tests.hubserver, even without installing
    with tempfile.TemporaryDirectory(prefix="lorahub-push-pull-") as tmp:
        work = Path(tmp)
        server = start_local_hub(work) if local else None
        import lorahub

        repo = args.repo or "demo/sql-expert"
        where = f"local test Hub at {server.url}" if server else os.environ["HF_ENDPOINT"]
        print(f"hub:     {where}")

        def wire() -> str:
            if server is None:
                return ""
            text = (
                f"  [wire: {len(server.requests)} requests, {server.bytes_uploaded} bytes "
                f"uploaded, {server.bytes_downloaded} bytes downloaded]"
            )
            server.clear_log()
            return text

        try:
            with lorahub.open(work / "store-a") as a, lorahub.open(work / "store-b") as b:
                info = a.add(make_adapter(work / "adapter"), name="sql-expert:v1").adapter
                print(f"added:   sql-expert:v1  {info.digest}  ({info.size} bytes of weights)")
                if server:
                    server.clear_log()

                first = a.push("sql-expert:v1", repo, tag="v1")
                print(
                    f"push 1:  commit {first.commit[:12]}, {len(first.files_uploaded)} files, "
                    f"{first.bytes_uploaded} bytes{wire()}"
                )
                print(f"         {first.commit_url}")
                again = a.push("sql-expert:v1", repo, tag="v1")
                print(f"push 2:  commit {again.commit[:12]}, changed: {again.committed}{wire()}")
                print(
                    f"second push: {'a new commit' if again.committed else 'no commit'}, "
                    f"{again.bytes_uploaded} bytes uploaded"
                )

                pulled = b.pull(f"{repo}@v1", name="sql-expert:v1")
                if server:
                    print(f"pull 1:  {pulled.digest}{wire()}")
                with lorahub.open(work / "store-c") as c:
                    c.pull(f"{repo}@v1")
                    fetched = server.bytes_downloaded if server else 0
                    print(f"pull 2:  into a third store{wire()}")
                if server:
                    print(f"second pull: {fetched} weight bytes downloaded")
                origin = pulled.origin
                print(f"origin:  {origin['repo_id']}@{origin['revision']} = {origin['commit']}")
                print(f"same digest in both stores: {pulled.digest == info.digest}")
        finally:
            if server:
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
