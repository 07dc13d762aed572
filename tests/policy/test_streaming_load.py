"""Streaming, shard-aware loading (policy/streaming_load.py): the results of loading the whole checkpoint in
memory, about one model of host memory at the peak, and each rank of an FSDP2 model reading only its shards."""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from r1kit.policy import DeepseekV3Config, DeepseekV3ForCausalLM, streaming_load
from r1kit.policy.checkpoint import to_released, write_safetensors
from r1kit.policy.fp8_checkpoint import dequantize_fp8_state_dict, weight_block_size
from r1kit.policy.fp8_quant import quantize_blockwise
from r1kit.policy.moe import RoutedExperts
from r1kit.policy.streaming_load import load_into
from tests.gloo_ranks import forkserver, run_ranks
from tests.policy.conftest import randomize
from tests.policy.test_fp8_policy_checkpoint import write_released_fp8_checkpoint


def load_in_memory(directory: Path, dtype: torch.dtype = torch.float32) -> DeepseekV3ForCausalLM:
    """The loader before streaming: every tensor read (FP8 dequantised), converted by `from_released`
    (our `load_state_dict`) and copied into a model built and initialised on the CPU."""
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    config = json.loads((directory / "config.json").read_text())
    block = weight_block_size(config)
    if block is not None:
        tensors = dequantize_fp8_state_dict(tensors, dtype=dtype, block=block)
    config.pop("quantization_config", None)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**config)).to(dtype)
    result = model.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys and all(key.startswith("mtp.") for key in result.missing_keys)
    return model


def write(layout: str, model: DeepseekV3ForCausalLM, directory: Path) -> None:
    """The model's checkpoint in one of the layouts the loader reads."""
    if layout == "released":
        model.save_pretrained(directory)
    elif layout == "released, 40 KB files":
        model.save_pretrained(directory, max_shard_size="40KB")
    elif layout == "ours":
        model.config.save_pretrained(directory)
        write_safetensors(directory, model.state_dict().items(), max_shard_bytes=10**9)
    elif layout == "transformers, fused experts":  # transformers' in-memory names, no MTP
        model.config.save_pretrained(directory)
        main = {name: t.contiguous() for name, t in model.state_dict().items() if not name.startswith("mtp.")}
        save_file(main, directory / "model.safetensors")
    elif layout == "released FP8, 4 KB files":  # scales after all weights: pairs split across files
        write_released_fp8_checkpoint(model, directory, (16, 16))
    else:
        raise ValueError(f"unknown layout {layout!r}")


@pytest.fixture
def original(tiny_config) -> DeepseekV3ForCausalLM:
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(tiny_config(hidden_size=48, q_lora_rank=40, kv_lora_rank=40, vocab_size=127))
    randomize(model)
    return model.eval()


LAYOUTS = ["released", "released, 40 KB files", "ours", "transformers, fused experts", "released FP8, 4 KB files"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_streamed_load_equals_loading_the_whole_checkpoint(original, tmp_path, layout, dtype):
    write(layout, original, tmp_path)
    streamed = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=dtype).state_dict()
    expected = load_in_memory(tmp_path, dtype).state_dict()
    assert streamed.keys() == expected.keys()
    for name, tensor in expected.items():
        if layout.startswith("transformers") and name.startswith("mtp."):
            assert streamed[name].isfinite().all(), name  # initialised fresh
            continue
        assert streamed[name].dtype == tensor.dtype and torch.equal(streamed[name], tensor), name


def test_a_tied_head_shares_the_loaded_embedding(tiny_config, tmp_path):
    model = DeepseekV3ForCausalLM(tiny_config(tie_word_embeddings=True))
    randomize(model)
    model.save_pretrained(tmp_path)
    loaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_an_fp8_box_equals_that_box_of_the_whole_weight_dequantised(tmp_path):
    weight = quantize_blockwise(torch.randn(50, 70), (16, 16), amax_floor=1e-4)
    save_file({"w": weight.data, "w_scale_inv": weight.scale}, tmp_path / "model.safetensors")
    whole = weight.dequantize(torch.bfloat16)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        files = {"w": f, "w_scale_inv": f}
        shapes = {"w": (50, 70), "w_scale_inv": (4, 5)}
        reader = streaming_load._Reader(files, shapes, {"w": "w_scale_inv"}, (16, 16), torch.bfloat16)
        for rows, cols in [((0, 50), (0, 70)), ((3, 20), (17, 18)), ((25, 50), (0, 35)), ((48, 50), (64, 70))]:
            box = (slice(*rows), slice(*cols))
            assert torch.equal(reader.read("w", box), whole[box]), box


def test_a_damaged_checkpoint_fails_before_any_tensor_is_read(original, tmp_path, monkeypatch):
    original.save_pretrained(tmp_path)
    tensors = {name: t.clone() for name, t in to_released(original.state_dict(), original.config)}
    tensors["model.layers.1.mlp.experts.3.up_proj.weight"] = torch.zeros(16, 47)
    save_file(tensors, tmp_path / "model.safetensors")
    monkeypatch.setattr(streaming_load._Reader, "read", lambda *args: pytest.fail("read a tensor"))
    match = r"'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight' has shape \(16, 47\), but its place in "
    with pytest.raises(ValueError, match=match + r"'model\.layers\.1\.mlp\.experts\.gate_up_proj' \(8, 32, 48\)"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path)


def test_a_tensor_given_twice_is_refused(original, tmp_path):
    original.save_pretrained(tmp_path)
    tensors = {name: t.clone() for name, t in to_released(original.state_dict(), original.config)}
    tensors["model.layers.1.mlp.experts.down_proj"] = original.model.layers[1].mlp.experts.down_proj.detach()
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"experts of 'model\.layers\.1\.mlp\.experts' twice"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path)


# ---- processes forked from a forkserver that imported torch and the model once ----

TIMEOUT_S = 180


def _status(field: str) -> int:
    """A byte count of /proc/self/status, e.g. "VmRSS:" (resident now) or "VmHWM:" (its peak)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))


def measure_load(directory: str) -> dict[str, int]:
    """Peak growth of this process's resident memory while `from_pretrained` loads, and the model's bytes."""
    torch.set_num_threads(1)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the peak starts again from what is resident now
    before = _status("VmRSS:")
    model = DeepseekV3ForCausalLM.from_pretrained(directory)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"growth": _status("VmHWM:") - before, "model": model_bytes}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_loading_holds_one_model_not_two(tiny_config, tmp_path):
    # 149 MiB in fp32, 192 experts of 0.75 MiB; the whole-checkpoint loader peaked at 3.1 models more
    config = tiny_config(
        hidden_size=256, intermediate_size=512, moe_intermediate_size=256, n_routed_experts=64, num_hidden_layers=3
    )
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    model.to_empty(device="cpu")
    for tensor in model.state_dict().values():
        tensor.detach().zero_()  # fast to make; the values do not matter here
    model.save_pretrained(tmp_path)
    del model
    with ProcessPoolExecutor(1, mp_context=forkserver([__name__])) as pool:
        measured = pool.submit(measure_load, str(tmp_path)).result(timeout=TIMEOUT_S)
    assert 0.9 * measured["model"] < measured["growth"] < 1.25 * measured["model"], measured


# ---- two gloo ranks: FSDP2 over a 1-D mesh, and experts split over an "ep" mesh ----


def load_shards_on_each_rank(rank: int, world: int, directories: list[str]) -> None:
    mesh = init_device_mesh("cpu", (world,))
    ep_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    for directory in map(Path, directories):
        single = DeepseekV3ForCausalLM.from_pretrained(directory).eval()
        fresh_mtp = not any(name.endswith(".enorm.weight") for name in _stored_names(directory))
        check_fsdp_load(single, directory, mesh, rank, fresh_mtp)
        check_expert_parallel_load(single, directory, ep_mesh, rank, fresh_mtp)


def _stored_names(directory: Path) -> list[str]:
    names = []
    for file in directory.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            names += f.keys()
    return names


def check_fsdp_load(single: DeepseekV3ForCausalLM, directory: Path, mesh: DeviceMesh, rank: int, fresh_mtp: bool):
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(single.config)
    for block in (*model.model.layers, *(module.block for module in model.mtp)):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    model.init_buffers()
    load_into(model, directory)
    expected = single.state_dict()
    for name, tensor in model.state_dict().items():
        if fresh_mtp and name.startswith("mtp."):
            continue
        if isinstance(tensor, DTensor):  # FSDP2: torch.chunk's rows of the full tensor (127 = 64 + 63 rows)
            assert torch.equal(tensor.to_local(), expected[name].chunk(2)[rank]), name
            tensor = tensor.full_tensor()
        assert torch.equal(tensor, expected[name]), name
    if not fresh_mtp:
        ids = torch.randint(0, 127, (2, 7), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(ids).logits, single(ids).logits, rtol=0, atol=1e-6)


def check_expert_parallel_load(
    single: DeepseekV3ForCausalLM, directory: Path, ep_mesh: DeviceMesh, rank: int, fresh_mtp: bool
):
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(single.config)
    for experts in (module for module in model.modules() if isinstance(module, RoutedExperts)):
        for name, weight in list(experts.named_parameters()):  # this rank's block of E / 2 experts, Shard(0)
            local = torch.empty(weight.shape[0] // 2, *weight.shape[1:], device="meta")
            setattr(experts, name, nn.Parameter(DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)))
    model.to_empty(device="cpu")
    model.init_buffers()
    load_into(model, directory)
    expected = single.state_dict()
    for name, tensor in model.state_dict().items():
        if not (fresh_mtp and name.startswith("mtp.")):
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            assert isinstance(tensor, DTensor) == (".experts." in name), name
            wanted = expected[name].chunk(2)[rank] if isinstance(tensor, DTensor) else expected[name]
            assert torch.equal(local, wanted), name


def test_each_rank_loads_its_shards(original, tmp_path):
    directories = []
    for layout in ("released, 40 KB files", "released FP8, 4 KB files", "transformers, fused experts"):
        directories.append(tmp_path / layout.replace(" ", "_").replace(",", ""))
        write(layout, original, directories[-1])
    run_ranks(load_shards_on_each_rank, 2, tmp_path, [str(d) for d in directories], preload=[__name__])
