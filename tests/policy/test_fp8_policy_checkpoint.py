"""Checkpoints and FP8: FP8-trained models save master weights and their recipe; released FP8
block-quantised checkpoints (`weight_scale_inv`) load into the policy, dequantised."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from r1kit.policy import DeepseekV3ForCausalLM, load_policy
from r1kit.policy.checkpoint import to_released, write_safetensors
from r1kit.policy.fp8_gemm import FP8Config, quantize_weight
from r1kit.policy.fp8_policy import fp8_layer_names
from r1kit.policy.fp8_quant import BlockQuantized, quantize_blockwise

RECIPE = FP8Config(block_size=16, backend="emulated")


def saved_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    return tensors


def test_fp8_trained_checkpoint_holds_master_weights_and_the_recipe(tiny_config, randomized, tmp_path):
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(tiny_config(fp8=RECIPE))
    randomized(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    model.save_pretrained(tmp_path)

    assert json.loads((tmp_path / "config.json").read_text())["fp8"] == model.config.fp8
    saved = saved_tensors(tmp_path)
    released = dict(to_released(model.state_dict(), model.config))
    assert saved.keys() == released.keys()  # no weight_scale_inv: nothing is stored in FP8
    assert all(
        torch.equal(saved[name], tensor) and saved[name].dtype == torch.float32 for name, tensor in released.items()
    )

    loaded = load_policy(tmp_path).eval()
    assert fp8_layer_names(loaded) == fp8_layer_names(model) and loaded.config.fp8 == model.config.fp8
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        plain = load_policy(tmp_path, fp8=False).eval()
        assert not fp8_layer_names(plain) and plain.config.fp8 is None
        assert not torch.equal(plain(ids).logits, model(ids).logits)


def is_quantised_in_release(name: str, tensor: torch.Tensor) -> bool:
    """What DeepSeek-V3's release stores in FP8: attention and MLP/expert projections. Embedding,
    head (and their MTP copies), norms, router gates and the MTP eh_proj stay in BF16."""
    projection = ".self_attn." in name or ".mlp." in name
    return projection and tensor.dim() == 2 and not name.endswith("mlp.gate.weight")


def released_fp8(model: DeepseekV3ForCausalLM, block: tuple[int, int]) -> dict[str, BlockQuantized]:
    """The model's weights quantised the way the release stores them (scale = amax / 448 per block)."""
    return {
        name: quantize_blockwise(tensor.detach(), block, amax_floor=1e-4)
        for name, tensor in to_released(model.state_dict(), model.config)
        if is_quantised_in_release(name, tensor)
    }


def write_released_fp8_checkpoint(model: DeepseekV3ForCausalLM, directory: Path, block: tuple[int, int]) -> None:
    """config.json with quantization_config, per-expert FP8 weights, the MTP layer at index num_hidden_layers.

    Scales are written after all weights in 4 KB shards, so weights and their scales sit in different shards.
    """
    model.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(block),
    }
    (directory / "config.json").write_text(json.dumps(config))
    quantised = released_fp8(model, block)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in to_released(model.state_dict(), model.config):
            yield name, quantised[name].data if name in quantised else tensor
        for name, weight in quantised.items():
            yield name + "_scale_inv", weight.scale

    write_safetensors(directory, tensors(), max_shard_bytes=4096)


@pytest.fixture
def original(tiny_config, randomized) -> DeepseekV3ForCausalLM:
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(tiny_config(hidden_size=48, q_lora_rank=40, kv_lora_rank=40))
    randomized(model)
    return model.eval()


@pytest.mark.parametrize("block", [(128, 128), (16, 16)])
def test_released_fp8_checkpoint_loads_dequantised(original, tmp_path, block):
    write_released_fp8_checkpoint(original, tmp_path, block)
    quantised = released_fp8(original, block)
    assert {name for name in quantised if ".mlp.experts." in name and name.startswith("model.layers.2.")}

    loaded = load_policy(tmp_path).eval()
    assert not hasattr(loaded.config, "quantization_config")  # its weights are no longer quantised
    dequantised = {
        name: quantised[name].dequantize() if name in quantised else tensor
        for name, tensor in to_released(original.state_dict(), original.config)
    }
    ours = dict(to_released(loaded.state_dict(), loaded.config))
    assert ours.keys() == dequantised.keys()
    assert all(torch.equal(ours[name], tensor) for name, tensor in dequantised.items())

    reference = DeepseekV3ForCausalLM(original.config).eval()
    reference.load_state_dict(dequantised)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits)
        assert not torch.equal(loaded(ids).logits, original(ids).logits)  # the weights did go through FP8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_training_from_a_released_checkpoint_starts_from_its_fp8_weights(original, tmp_path, dtype):
    # re-quantising the dequantised weights in the checkpoint's blocks gives back its FP8 bytes, and its
    # scales exactly in float32 (in bfloat16 up to the rounding of the dequantised weights)
    write_released_fp8_checkpoint(original, tmp_path, (16, 16))
    loaded = load_policy(tmp_path, fp8=RECIPE, dtype=dtype)
    assert loaded.dtype == dtype and loaded.config.fp8 == asdict(RECIPE)
    ours = dict(to_released(loaded.state_dict(), loaded.config))
    scale_tolerance = {"rtol": 0, "atol": 0} if dtype == torch.float32 else {"rtol": 2**-8, "atol": 0}
    for name, released in released_fp8(original, (16, 16)).items():
        weight = quantize_weight(ours[name], RECIPE)
        assert torch.equal(weight.data.view(torch.uint8), released.data.view(torch.uint8)), name
        torch.testing.assert_close(weight.scale, released.scale, **scale_tolerance, msg=name)


def edit_checkpoint(directory: Path, *, config=None, drop: str | None = None) -> None:
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config(json.loads((directory / "config.json").read_text()))))
    if drop is not None:
        tensors = saved_tensors(directory)
        del tensors[drop]
        for file in directory.glob("model*"):
            file.unlink()
        write_safetensors(directory, tensors.items(), max_shard_bytes=10**9)


def without_quantization(config: dict) -> dict:
    del config["quantization_config"]
    return config


def gptq(config: dict) -> dict:
    config["quantization_config"]["quant_method"] = "gptq"
    return config


KV_B = "model.layers.1.self_attn.kv_b_proj.weight"


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (dict(config=without_quantization), ValueError, r"'model\.layers\..*' .* is torch\.float8_e4m3fn, but"),
        (dict(config=gptq), ValueError, "quant_method is 'gptq'"),
        (dict(drop=KV_B + "_scale_inv"), KeyError, f"FP8 weight '{KV_B}' has no scale"),
        (dict(drop=KV_B), KeyError, f"'{KV_B}_scale_inv' has no float8_e4m3fn weight"),
    ],
)
def test_malformed_fp8_checkpoints_raise_errors_naming_the_key(original, tmp_path, edit, error, message):
    write_released_fp8_checkpoint(original, tmp_path, (16, 16))
    edit_checkpoint(tmp_path, **edit)
    with pytest.raises(error, match=message):
        load_policy(tmp_path)
