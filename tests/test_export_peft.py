"""Exported adapters load in PEFT and behave exactly like the originals."""

from __future__ import annotations

import pytest
import torch
from factories import peft_adapter, tiny_gpt2, tiny_llama


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    ("make", "lora"),
    [
        (tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"]}),
        (tiny_gpt2, {"r": 4, "lora_alpha": 16, "target_modules": ["c_attn"], "fan_in_fan_out": 1}),
    ],
    ids=["llama", "gpt2"],
)
def test_exported_dir_gives_the_same_logits(hub, tmp_path, make, lora):
    from peft import PeftModel

    src = tmp_path / "src"
    peft_adapter(make(), src, **lora)
    hub.add(src, name="a:v1")
    out = hub.export("a:v1", tmp_path / "exported")

    ids = torch.randint(0, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    base = make()
    plain = _logits(base, ids)
    original = _logits(PeftModel.from_pretrained(make(), str(src)).eval(), ids)
    exported = _logits(PeftModel.from_pretrained(make(), str(out)).eval(), ids)
    assert not torch.allclose(original, plain, atol=1e-4), "the adapter must change the output"
    torch.testing.assert_close(exported, original, rtol=0, atol=1e-6)
