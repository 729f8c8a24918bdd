"""The CUDA merge pipeline gives the float64 formula's weights, within 1 bf16 ulp."""

from __future__ import annotations

import pytest
import torch
from factories import random_peft_adapter, read_adapter, tiny_llama
from safetensors.torch import load_file
from test_merge import assert_within_ulp, float64_merge, raw

from lorahub.base import open_base
from lorahub.merge import iter_merged, merge_to_dir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_cuda_merge_matches_float64_formula(tmp_path):
    base_dir = tmp_path / "base"
    tiny_llama(seed=0, dtype=torch.bfloat16).save_pretrained(base_dir)
    # 2 layers x 4 modules: more merged tensors than the pipeline has slots, so each is reused.
    plain = random_peft_adapter(
        base_dir, tmp_path / "a", seed=1, r=4, target_modules=["q_proj", "v_proj", "gate_proj"]
    )
    dora = random_peft_adapter(
        base_dir, tmp_path / "b", seed=2, r=2, lora_alpha=5, target_modules=["v_proj", "down_proj"],
        use_dora=True,
    )  # fmt: skip
    weights = [1.0, 0.5]
    adapters = [read_adapter(plain), read_adapter(dora)]
    base = open_base(base_dir)

    result = merge_to_dir(base, adapters, weights, out=tmp_path / "out", device="cuda")
    assert result.device.startswith("cuda") and result.merged == 8

    exact = float64_merge(base_dir, [plain, dora], weights)
    base_sd = load_file(base_dir / "model.safetensors")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    for name, t in ours.items():
        if torch.equal(exact[name], base_sd[name].double()):
            assert raw(t) == raw(base_sd[name]), name
        else:
            assert_within_ulp(t, exact[name], name)
    for name, t in iter_merged(base, adapters, weights, device="cuda"):
        assert t.device.type == "cpu" and raw(t) == raw(ours[name]), name
