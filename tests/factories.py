"""Tiny, seeded models and adapters for tests, written straight to disk (no download)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

LLAMA_MODULES = {
    f"model.layers.{i}.self_attn.{p}": (32, 32) for i in range(2) for p in ("q_proj", "v_proj")
}


def write_peft_adapter(
    path: Path,
    modules: Mapping[str, tuple[int, int]] = LLAMA_MODULES,
    *,
    r: int = 4,
    alpha: float = 8,
    seed: int = 0,
    fmt: str = "safetensors",
    dtype: torch.dtype = torch.float32,
    extra_config: Mapping[str, Any] | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """A PEFT-layout adapter directory; ``modules`` maps module name -> (in, out)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (fin, fout) in modules.items():
        sd[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, fin, generator=g).to(dtype)
        sd[f"base_model.model.{name}.lora_B.weight"] = torch.randn(fout, r, generator=g).to(dtype)
    sd.update(tensors or {})
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules}),
        "base_model_name_or_path": "tiny/llama",
        "task_type": "CAUSAL_LM",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "some_future_key": {"kept": True},
        **(extra_config or {}),
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    if fmt == "safetensors":
        save_file(sd, str(path / "adapter_model.safetensors"))
    else:
        torch.save(sd, str(path / "adapter_model.bin"))
    return path


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, hidden_size: int = 32):
    """A 2-layer Llama (hidden size 32 unless told) made by transformers (test-only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def peft_adapter(model, out: Path, seed: int = 1, adapter_name: str = "default", **lora_kwargs):
    """Wrap ``model`` with a randomly initialised (non-zero) LoRA and save it to ``out``."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(init_lora_weights=False, **lora_kwargs)
    torch.manual_seed(seed)
    pm = get_peft_model(model, cfg, adapter_name=adapter_name)
    pm.save_pretrained(str(out))
    return pm


def cli_runner(home: Path):
    """``run(*args, code=0)``: ``lorahub --home HOME ARGS`` in this process, asserting the
    exit code and returning click's result (``.stdout``, ``.stderr``)."""
    from click.testing import CliRunner

    from lorahub.cli import cli

    runner = CliRunner()

    def run(*args: Any, code: int = 0):
        res = runner.invoke(cli, ["--home", str(home), *map(str, args)])
        assert res.exit_code == code, res.output + res.stderr
        return res

    return run
