"""State-dict conversion between our layout and DeepSeek-V3's released layout, and safetensors I/O.

Our layout (`DeepseekV3ForCausalLM.state_dict()`) equals transformers' in-memory
layout for the main model, plus the MTP modules under `mtp.{k}`:

    model.layers.{i}.mlp.experts.gate_up_proj        (E, 2I, H)   gate rows, then up rows
    model.layers.{i}.mlp.experts.down_proj           (E, H, I)
    mtp.{k}.enorm / hnorm / eh_proj / norm            mtp.{k}.block.<decoder layer>

The released layout (DeepSeek-V3 on the Hub, what transformers'
`save_pretrained` writes and what vLLM reads) stores experts one by one and MTP
module k as decoder layer L + k (L = num_hidden_layers) with its own copies of
the embedding and the output head:

    model.layers.{i}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight
    model.layers.{L+k}.{enorm,hnorm,eh_proj}.weight
    model.layers.{L+k}.shared_head.norm.weight       <- mtp.{k}.norm.weight
    model.layers.{L+k}.shared_head.head.weight       copy of lm_head.weight
    model.layers.{L+k}.embed_tokens.weight           copy of model.embed_tokens.weight
    model.layers.{L+k}.<self_attn, mlp, norms>       <- mtp.{k}.block.<...>

`to_released` yields views (no copies) so weight sync can stream them;
`from_released` accepts released, transformers-fused and our names in any mix,
checks that the MTP copies of embedding and head equal the shared ones, and
never drops a tensor: unknown names end up as unexpected keys that
`check_keys` reports.

Released FP8 checkpoints store most projections, per expert, as float8_e4m3fn
`X.weight` plus `X.weight_scale_inv` (one scale per weight block, declared by
config.json's quantization_config). `load_checkpoint` dequantises them
(policy/fp8_checkpoint.py) while reading, before the layout conversion, so
per-expert weights are fused and MTP layers mapped exactly as for BF16 ones.
An FP8 tensor in a checkpoint that declares no quantisation is an error.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from r1kit.policy.config import DeepseekV3Config
from r1kit.policy.fp8_checkpoint import dequantize_fp8_tensors

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"

logger = logging.getLogger(__name__)

_FUSED_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_OUR_MTP = re.compile(r"^mtp\.(\d+)\.(.*)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_MTP_OWN = ("enorm.weight", "hnorm.weight", "eh_proj.weight")


def to_released(state_dict: Mapping[str, torch.Tensor], config: DeepseekV3Config) -> Iterator[tuple[str, torch.Tensor]]:
    """Our state dict -> (released name, tensor) pairs; tensors are views of ours."""
    for name, tensor in state_dict.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        match = _OUR_MTP.match(name)
        if match is None:
            yield from _split_experts(name, tensor)
            continue
        depth, rest = int(match[1]), match[2]
        prefix = f"model.layers.{config.num_hidden_layers + depth}."
        if rest in _MTP_OWN:
            yield prefix + rest, tensor
        elif rest == "norm.weight":
            yield prefix + "shared_head.norm.weight", tensor
            yield prefix + "embed_tokens.weight", state_dict["model.embed_tokens.weight"]
            yield prefix + "shared_head.head.weight", _output_head(state_dict, config)
        elif rest.startswith("block."):
            yield from _split_experts(prefix + rest.removeprefix("block."), tensor)
        else:
            yield name, tensor


def _output_head(state_dict: Mapping[str, torch.Tensor], config: DeepseekV3Config) -> torch.Tensor:
    return state_dict["model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"]


def _split_experts(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    match = _FUSED_EXPERTS.match(name)
    if match is None:
        yield name, tensor
        return
    prefix, kind = match[1], match[2]
    for expert in range(tensor.shape[0]):
        if kind == "down_proj":
            yield f"{prefix}.{expert}.down_proj.weight", tensor[expert]
        else:
            gate, up = tensor[expert].chunk(2, dim=0)
            yield f"{prefix}.{expert}.gate_proj.weight", gate
            yield f"{prefix}.{expert}.up_proj.weight", up


def from_released(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    config: DeepseekV3Config,
    *,
    skip_extra_mtp: bool = False,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Released / transformers / our names -> (our state dict, names of skipped MTP tensors).

    MTP layers beyond `config.num_nextn_predict_layers` raise unless
    `skip_extra_mtp` (the caller switched MTP off on purpose); the skipped names
    are returned so the caller can log them.
    """
    ours: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    copies: list[tuple[str, str, torch.Tensor]] = []  # (checkpoint name, shared name, tensor)
    skipped: list[str] = []
    for name, tensor in named_tensors:
        target = _our_name(name, config)
        if target is None:
            if not skip_extra_mtp:
                raise ValueError(
                    f"checkpoint tensor {name!r} belongs to an MTP layer beyond num_nextn_predict_layers="
                    f"{config.num_nextn_predict_layers} (pass num_nextn_predict_layers=0 to drop MTP)"
                )
            skipped.append(name)
        elif target.startswith("="):
            copies.append((name, target[1:], tensor))
        elif match := _PER_EXPERT.match(target):
            experts[match[1]][match[3]][int(match[2])] = tensor
        else:
            ours[target] = tensor
    for prefix, projections in experts.items():
        ours.update(_fuse_experts(prefix, projections, config.n_routed_experts))
    for name, shared, tensor in copies:
        _check_copy(name, shared, tensor, ours, config)
    return ours, skipped


def _our_name(name: str, config: DeepseekV3Config) -> str | None:
    """Our name of a checkpoint name; "=<name>" for a copy of a shared tensor, None for an extra MTP layer."""
    match = _LAYER.match(name)
    if match is None or int(match[1]) < config.num_hidden_layers:
        return name
    depth, rest = int(match[1]) - config.num_hidden_layers, match[2]
    if depth >= config.num_nextn_predict_layers:
        return None
    if rest in _MTP_OWN:
        return f"mtp.{depth}.{rest}"
    if rest == "shared_head.norm.weight":
        return f"mtp.{depth}.norm.weight"
    if rest == "embed_tokens.weight":
        return "=model.embed_tokens.weight"
    if rest == "shared_head.head.weight":
        return "=model.embed_tokens.weight" if config.tie_word_embeddings else "=lm_head.weight"
    return f"mtp.{depth}.block.{rest}"


def _fuse_experts(
    prefix: str, projections: Mapping[str, Mapping[int, torch.Tensor]], num_experts: int
) -> dict[str, torch.Tensor]:
    """Per-expert 2-D weights -> our 3-D gate_up_proj (E, 2I, H) and down_proj (E, H, I)."""
    for kind in ("gate_proj", "up_proj", "down_proj"):
        missing = sorted(set(range(num_experts)) - set(projections.get(kind, {})))
        if missing:
            raise ValueError(f"checkpoint lacks {prefix}.{{{_ranges(missing)}}}.{kind}.weight")
        extra = sorted(set(projections[kind]) - set(range(num_experts)))
        if extra:
            raise ValueError(
                f"checkpoint has {prefix}.{{{_ranges(extra)}}}.{kind}.weight, beyond n_routed_experts={num_experts}"
            )
    stack = lambda kind: torch.stack([projections[kind][e] for e in range(num_experts)])
    return {
        f"{prefix}.gate_up_proj": torch.cat((stack("gate_proj"), stack("up_proj")), dim=1),
        f"{prefix}.down_proj": stack("down_proj"),
    }


def _check_copy(
    name: str, shared: str, tensor: torch.Tensor, ours: Mapping[str, torch.Tensor], config: DeepseekV3Config
) -> None:
    reference = ours.get(shared)
    if reference is None and shared == "lm_head.weight" and config.tie_word_embeddings:
        reference = ours.get("model.embed_tokens.weight")
    if reference is None:
        raise ValueError(f"checkpoint has {name!r} but not the {shared!r} it must copy")
    if reference.shape != tensor.shape or not torch.equal(reference, tensor.to(reference.dtype)):
        raise ValueError(
            f"checkpoint tensor {name!r} differs from {shared!r}; this model shares one embedding and "
            "one output head between the main model and the MTP modules"
        )


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    spans, start = [], numbers[0]
    for previous, current in zip(numbers, [*numbers[1:], None], strict=True):
        if current != previous + 1:
            spans.append(str(start) if start == previous else f"{start}-{previous}")
            start = current
    return ",".join(spans)


def check_keys(state_dict: Mapping[str, torch.Tensor], expected: Iterable[str]) -> list[str]:
    """Raises on unexpected and missing tensors, except for whole MTP modules; returns those modules' keys.

    A checkpoint without any tensor of MTP module k (transformers' DeepseekV3 never
    saves MTP) leaves that module to be initialised fresh; one with some of its
    tensors but not all is damaged and raises like any other missing tensor.
    """
    expected = set(expected)
    unexpected = sorted(set(state_dict) - expected)
    if unexpected:
        raise ValueError(f"checkpoint has {len(unexpected)} unexpected tensors: {_preview(unexpected)}")
    missing = sorted(expected - set(state_dict))
    saved_mtp_modules = {_mtp_module(key) for key in state_dict if _OUR_MTP.match(key)}
    fresh = [key for key in missing if _OUR_MTP.match(key) and _mtp_module(key) not in saved_mtp_modules]
    lacking = [key for key in missing if key not in fresh]
    if lacking:
        raise ValueError(f"checkpoint lacks {len(lacking)} tensors: {_preview(lacking)}")
    return fresh


def _mtp_module(key: str) -> int:
    """The module index k of a key `mtp.{k}.<rest>`."""
    return int(_OUR_MTP.match(key)[1])


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_checkpoint(
    model: torch.nn.Module,
    directory: str | os.PathLike,
    *,
    skip_extra_mtp: bool = False,
    fp8_block: tuple[int, int] | None = None,
) -> None:
    """Fills our causal LM from a checkpoint directory: every tensor placed, or a ValueError naming it.

    fp8_block: the weight block of an FP8-quantised checkpoint (config.json's
    quantization_config.weight_block_size); its FP8 weights are dequantised to
    the model's dtype. Dropped MTP layers (`skip_extra_mtp`) are logged; MTP
    modules the checkpoint has no weights for keep their fresh initialisation,
    with one warning naming them.
    """
    config = model.config
    named = read_safetensors(directory)
    if fp8_block is None:
        named = _refuse_fp8(named, directory)
    else:
        dtype = next(model.parameters()).dtype
        named = dequantize_fp8_tensors(named, dtype=dtype, block=fp8_block)
    tensors, skipped = from_released(named, config, skip_extra_mtp=skip_extra_mtp)
    if skipped:
        logger.warning("MTP switched off: left %d checkpoint tensors unused (%s, ...)", len(skipped), skipped[0])
    expected = [k for k in model.state_dict() if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    initialised = check_keys(tensors, expected)
    if initialised:
        modules = sorted({_mtp_module(key) for key in initialised})
        logger.warning(
            "%s has no weights for MTP module(s) %s; initialised %d MTP tensors fresh: %s "
            "(pass num_nextn_predict_layers=0 to build the model without MTP)",
            directory,
            ", ".join(map(str, modules)),
            len(initialised),
            ", ".join(initialised),
        )
    model.load_state_dict(tensors, strict=False)


def _refuse_fp8(
    named_tensors: Iterable[tuple[str, torch.Tensor]], directory: str | os.PathLike
) -> Iterator[tuple[str, torch.Tensor]]:
    """Passes tensors through; an 8-bit float (unscaled, it would load as garbage) raises."""
    for name, tensor in named_tensors:
        if tensor.is_floating_point() and tensor.element_size() == 1:
            raise ValueError(
                f"checkpoint tensor {name!r} in {directory} is {tensor.dtype}, but config.json declares no "
                "quantization_config (quant_method 'fp8' with weight_block_size) to dequantise it"
            )
        yield name, tensor


def read_safetensors(directory: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a (possibly sharded) safetensors checkpoint in `directory`."""
    directory = Path(directory)
    if (directory / SAFE_INDEX).is_file():
        index = json.loads((directory / SAFE_INDEX).read_text())
        files = sorted(set(index["weight_map"].values()))
    elif (directory / SAFE_WEIGHTS).is_file():
        files = [SAFE_WEIGHTS]
    else:
        raise FileNotFoundError(f"{directory} has neither {SAFE_WEIGHTS} nor {SAFE_INDEX}")
    for file in files:
        with safe_open(directory / file, framework="pt") as shard:
            for name in shard.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, shard.get_tensor(name)


def write_safetensors(
    directory: str | os.PathLike, named_tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int
) -> None:
    """Writes tensors as safetensors shards of at most `max_shard_bytes` (plus an index when sharded).

    Each file is written under a temporary name and renamed, so a crash never
    leaves a truncated shard under a final name.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = tensor
        sizes[-1] += nbytes
    names = (
        [SAFE_WEIGHTS]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for shard, file in zip(shards, names, strict=True):
        # clone: views of one parameter (per-expert slices) may not share storage in a safetensors file
        tensors = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in shard.items()}
        _atomic_write(directory / file, lambda path, tensors=tensors: save_file(tensors, path, {"format": "pt"}))
    if len(shards) > 1:
        weight_map = {name: file for shard, file in zip(shards, names, strict=True) for name in shard}
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        _atomic_write(directory / SAFE_INDEX, lambda path: Path(path).write_text(json.dumps(index, indent=2)))
    stale = [*directory.glob("model-*-of-*.safetensors"), directory / SAFE_INDEX, directory / SAFE_WEIGHTS]
    for path in stale:
        if path.exists() and path.name not in names and not (len(shards) > 1 and path.name == SAFE_INDEX):
            path.unlink()  # a previous save's files would shadow or contradict this one


def size_in_bytes(size: int | str) -> int:
    """5GB / 500MB / 10KB / an int -> bytes (decimal units, as transformers counts them)."""
    if isinstance(size, int):
        return size
    for unit, factor in {"GB": 10**9, "MB": 10**6, "KB": 10**3}.items():
        if size.upper().endswith(unit):
            return int(float(size[: -len(unit)]) * factor)
    raise ValueError(f"max_shard_size {size!r}: expected an int or a string like '5GB'")


def _atomic_write(path: Path, write) -> None:
    temporary = path.with_name(path.name + ".tmp")
    write(str(temporary))
    os.replace(temporary, path)
