"""Tiny, seeded models and adapters for tests, written straight to disk (no download)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from click.testing import Result

    from lorahub.adapter import LoraAdapter
    from lorahub.base import TensorInfo

LLAMA_MODULES = {
    f"model.layers.{i}.self_attn.{p}": (32, 32) for i in range(2) for p in ("q_proj", "v_proj")
}

# What safetensors calls the torch dtypes the tiny models use (tensor tables are written by hand
# here, so the tests do not read them back through lorahub's own dtype table).
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


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


def tiny_llama(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    hidden_size: int = 32,
    *,
    layers: int = 2,
    vocab: int = 128,
    intermediate: int = 64,
    bare: bool = False,
    **config: Any,
):
    """A Llama made by transformers (test-only): 2 layers, hidden size 32, vocabulary 128
    unless told. ``bare`` gives the ``LlamaModel`` without its head; ``config`` goes to
    ``LlamaConfig`` as is (``attention_bias=True``, ``max_position_embeddings=64``)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        **config,
    )
    return (LlamaModel if bare else LlamaForCausalLM)(cfg).to(dtype).eval()


def tiny_gpt2(seed: int = 0):
    """A 2-layer GPT-2: its Conv1D layers store [in, out], so its adapters are fan_in_fan_out."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_clip(seed: int = 0):
    """A 2-layer CLIP text encoder, the base of Stable Diffusion's text-encoder LoRAs."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(cfg).eval()


def tensor_table(tensors: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, TensorInfo]:
    """A state dict as the tensor table ``open_base`` reads from headers, names under ``prefix``."""
    from lorahub.base import TensorInfo

    return {
        prefix + n: TensorInfo(prefix + n, _SAFETENSORS_DTYPES[t.dtype], tuple(t.shape))
        for n, t in tensors.items()
    }


def peft_adapter(model, out: Path, seed: int = 1, adapter_name: str = "default", **lora_kwargs):
    """Wrap ``model`` with a LoRA and save it to ``out``; its weights are random (non-zero)
    unless ``init_lora_weights`` says otherwise."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(**{"init_lora_weights": False, **lora_kwargs})
    torch.manual_seed(seed)
    pm = get_peft_model(model, cfg, adapter_name=adapter_name)
    pm.save_pretrained(str(out))
    return pm


def load_model(path: Path):
    """A saved transformers model, in the dtype it was saved in."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()


def random_peft_adapter(base: Path, dest: Path, seed: int = 1, **lora_kwargs) -> Path:
    """A PEFT adapter of the model saved at ``base`` with every trainable tensor random (DoRA
    magnitudes, modules to save and LoRA biases too), so each part of a merge shows."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(load_model(base), LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:  # else m == ||W + sBA|| and DoRA is plain LoRA
                p.mul_(1 + 0.5 * torch.rand_like(p))
            elif "modules_to_save" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif "lora_B" in name and name.endswith("bias"):
                p.normal_(0, 0.5)
    pm.save_pretrained(dest)
    return dest


def read_adapter(path: Path) -> LoraAdapter:
    """A PEFT safetensors folder read back the way lorahub reads one."""
    from lorahub.adapter import LoraAdapter

    config = json.loads((path / "adapter_config.json").read_text())
    return LoraAdapter.from_state_dict(config, load_file(path / "adapter_model.safetensors"))


CliRun = Callable[..., "Result"]


def cli_runner(home: Path) -> CliRun:
    """``run(*args, code=0, input=None)``: ``lorahub --home HOME ARGS`` in this process, with
    ``input`` on stdin, asserting the exit code (unless ``code`` is None) and returning click's
    result (``.stdout``, ``.stderr``, ``.exit_code``)."""
    from click.testing import CliRunner

    from lorahub.cli import cli

    runner = CliRunner()

    def run(*args: Any, code: int | None = 0, input: str | None = None) -> Result:
        res = runner.invoke(cli, ["--home", str(home), *map(str, args)], input=input)
        if code is not None:
            assert res.exit_code == code, res.output + res.stderr
        return res

    return run


def fake_hf_cache(hf_home: Path, repo: str, model_dir: Path, sha: str = "c" * 40) -> Path:
    """``model_dir`` laid out as ``hf download repo`` leaves it in the Hugging Face cache:
    snapshot entries are links to blobs named by hash. Returns the snapshot folder."""
    storage = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    snap = storage / "snapshots" / sha
    snap.mkdir(parents=True)
    (storage / "blobs").mkdir()
    for i, f in enumerate(sorted(model_dir.iterdir())):
        (storage / "blobs" / f"{i:064x}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("..", "..", "blobs", f"{i:064x}"))
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(sha)
    return snap
