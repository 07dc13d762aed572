"""Streaming, shard-aware loading of our DeepSeek-V3 checkpoints: `load_into(model, directory)`.

`DeepseekV3ForCausalLM.from_pretrained` builds the model on the meta device (no memory, no
random init), materialises it with `to_empty` where it will live and calls `load_into`. A
sharded model loads the same way, after sharding, so that no rank ever holds the full model:

    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(DeepseekV3Config.from_pretrained(directory))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)            # FSDP2: Shard(0) DTensors over the mesh
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cuda")
    model.init_buffers()                         # rotary frequencies, routing-load counts
    load_into(model, directory)                  # each rank reads and writes only its shards

Plan, then read. The safetensors headers alone (names, shapes and dtypes of every file;
`model.safetensors.index.json` lists the files of a sharded checkpoint) are planned against
the model's state dict (`checkpoint.plan_load`): released, transformers-fused and our names in
any mix, FP8 weights paired with their scales when config.json declares FP8 quantisation
(`fp8_checkpoint.fp8_scales`). Every fault a checkpoint can have is raised there, naming the
tensors, before any weight is read: unexpected and missing tensors, missing or extra experts,
shapes that do not fit, an 8-bit float without a declared quantization_config, an FP8 weight
without its scale. The one exception is an MTP copy of the embedding or head that differs from
the shared tensor, found while reading. Then the tensors are read one at a time, in file
order, and each goes straight into its place: a released per-expert `experts.{e}.gate_proj.weight`
into `gate_up_proj[e, :I]`, `up_proj` into `gate_up_proj[e, I:]`, `down_proj` into
`down_proj[e]`, an FP8 weight dequantised (fp8 * weight_scale_inv in float32, then the model's
dtype) as it comes. The copy into the destination casts to its dtype, as `load_state_dict` does.

Shards. Where a destination is a DTensor (FSDP2's Shard(0) over a mesh; experts Shard(0) over
an "ep" mesh dimension, and under FSDP as well (_StridedShard(0), Shard(0)) over (edp, ep);
Replicate dimensions), this rank's local shard is one box [offset, offset + local shape) of the
full tensor, offsets from the DTensor's mesh and placements, as torch's distributed checkpoint
computes them. Only the part of each checkpoint tensor inside that box is read (safetensors'
`get_slice`; whole FP8 blocks for a quantised weight) and written into `to_local()`. The MTP
copies are compared with the shared tensor on the rows this rank holds, so every row is
checked by the rank that loads it. Nothing here communicates.

Memory. Besides the model, the loader holds one checkpoint tensor (or this rank's part of it),
an FP8 weight with its scale and their float32 product, or an MTP copy beside the shared
tensor. safetensors >= 0.8 reads with pread(2) into buffers of that size; older releases
memory-map the files (page cache, released when the load ends).

The buffers no checkpoint holds (rotary frequencies, routing-load counts) are the caller's:
`init_buffers()` after `to_empty`. An MTP module the checkpoint has no weights for (transformers'
DeepseekV3 saves none) is initialised fresh, with one warning naming its tensors.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors
import torch
from safetensors import safe_open
from torch import Tensor
from torch.distributed.tensor import DTensor, Partial
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from r1kit.policy.checkpoint import SAFE_INDEX, SAFE_WEIGHTS, LoadPlan, Placement, check_copy, mtp_module, plan_load
from r1kit.policy.fp8_checkpoint import fp8_scales, weight_block_size
from r1kit.policy.fp8_quant import BlockQuantized

if TYPE_CHECKING:
    from r1kit.policy.modeling import DeepseekV3ForCausalLM

logger = logging.getLogger(__name__)

# The dtype codes of safetensors headers (the format's specification), read before any tensor.
_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
# pread(2) into a buffer the size of what is read (safetensors >= 0.8); before, only memory mapping.
_OPEN_OPTIONS = {"backend": "pread"} if tuple(map(int, safetensors.__version__.split(".")[:2])) >= (0, 8) else {}


def load_into(model: DeepseekV3ForCausalLM, directory: str | os.PathLike, *, skip_extra_mtp: bool = False) -> None:
    """Fills our causal LM, plain or sharded, from a checkpoint directory, one tensor at a time.

    model: a DeepseekV3ForCausalLM with materialised tensors (after `to_empty` and
    `init_buffers` if built on the meta device), any of them DTensors; each rank fills the part
    it holds. Every tensor is placed, or an error names it before any is read (an MTP copy
    differing from the shared tensor: once read).
    skip_extra_mtp: drop (and log) checkpoint MTP layers beyond the model's, instead of raising.
    config.json's quantization_config, if any, declares the FP8 weights, which are dequantised
    into the model's dtype. On an error the model's contents are undefined.
    """
    directory = Path(directory)
    config = model.config
    targets = {
        key: tensor
        for key, tensor in model.state_dict(keep_vars=True).items()
        if not (key == "lm_head.weight" and config.tie_word_embeddings)
    }
    with ExitStack() as stack:
        files = _open_files(directory, stack)
        stored = {name: _header(name, file) for name, file in files.items()}
        shapes = {name: shape for name, (_, shape) in stored.items()}
        block, scales = _fp8_pairs(stored, directory)
        scale_names = set(scales.values())  # read with their weights
        plan = plan_load(
            {name: shape for name, shape in shapes.items() if name not in scale_names},
            {key: tuple(tensor.shape) for key, tensor in targets.items()},
            config,
            skip_extra_mtp=skip_extra_mtp,
        )
        _log(plan, directory)
        for depth in sorted({mtp_module(key) for key in plan.fresh}):
            model.mtp[depth].apply(model._init_weights)
        reader = _Reader(files, shapes, scales, block, next(model.parameters()).dtype)
        with torch.no_grad():
            for name, placement in plan.placements.items():
                _load(reader, name, placement, targets[placement.target])


def _open_files(directory: Path, stack: ExitStack) -> dict[str, safe_open]:
    """Every tensor name of a (possibly sharded) safetensors checkpoint -> its open file, file by file."""
    if (directory / SAFE_INDEX).is_file():
        index = json.loads((directory / SAFE_INDEX).read_text())
        names = sorted(set(index["weight_map"].values()))
    elif (directory / SAFE_WEIGHTS).is_file():
        names = [SAFE_WEIGHTS]
    else:
        raise FileNotFoundError(f"{directory} has neither {SAFE_WEIGHTS} nor {SAFE_INDEX}")
    files: dict[str, safe_open] = {}
    for file_name in names:
        file = stack.enter_context(safe_open(directory / file_name, framework="pt", **_OPEN_OPTIONS))
        for name in file.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if name in files:
                raise ValueError(f"checkpoint tensor {name!r} is in two files of {directory}")
            files[name] = file
    return files


def _header(name: str, file: safe_open) -> tuple[torch.dtype, tuple[int, ...]]:
    """(dtype, shape) of a stored tensor, from the file's header."""
    stored = file.get_slice(name)
    code = stored.get_dtype()
    if code not in _DTYPES:
        raise ValueError(f"checkpoint tensor {name!r} has safetensors dtype {code}, which this loader does not read")
    return _DTYPES[code], tuple(stored.get_shape())


def _fp8_pairs(
    stored: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], directory: Path
) -> tuple[tuple[int, int] | None, dict[str, str]]:
    """(weight block, {FP8 weight: its scale}) as config.json declares; an 8-bit float it does not declare raises."""
    config = directory / "config.json"
    block = weight_block_size(json.loads(config.read_text())) if config.is_file() else None
    if block is not None:
        return block, fp8_scales(stored, block=block)
    for name, (dtype, _) in stored.items():
        if dtype.is_floating_point and dtype.itemsize == 1:  # unscaled, it would load as garbage
            raise ValueError(
                f"checkpoint tensor {name!r} in {directory} is {dtype}, but config.json declares no "
                "quantization_config (quant_method 'fp8' with weight_block_size) to dequantise it"
            )
    return None, {}


def _log(plan: LoadPlan, directory: Path) -> None:
    if plan.skipped:
        logger.warning(
            "MTP switched off: left %d checkpoint tensors unused (%s, ...)", len(plan.skipped), plan.skipped[0]
        )
    if plan.fresh:
        logger.warning(
            "%s has no weights for MTP module(s) %s; initialised %d MTP tensors fresh: %s "
            "(pass num_nextn_predict_layers=0 to build the model without MTP)",
            directory,
            ", ".join(str(depth) for depth in sorted({mtp_module(key) for key in plan.fresh})),
            len(plan.fresh),
            ", ".join(plan.fresh),
        )


@dataclass(frozen=True)
class _Reader:
    """Reads boxes of checkpoint tensors: as stored, or, for an FP8 weight, dequantised to `dtype`."""

    files: Mapping[str, safe_open]
    shapes: Mapping[str, tuple[int, ...]]
    scales: Mapping[str, str]  # FP8 weight -> its scale
    block: tuple[int, int] | None
    dtype: torch.dtype

    def read(self, name: str, box: tuple[slice, ...]) -> Tensor:
        """The part `box` (one slice per dimension) of checkpoint tensor `name`."""
        scale = self.scales.get(name)
        if scale is None:
            return self._slice(name, box)
        rows, cols = box
        block_rows, block_cols = self.block
        first_row, first_col = rows.start // block_rows * block_rows, cols.start // block_cols * block_cols
        data = self._slice(name, (slice(first_row, rows.stop), slice(first_col, cols.stop)))  # whole blocks
        scale_box = (
            slice(first_row // block_rows, -(-rows.stop // block_rows)),
            slice(first_col // block_cols, -(-cols.stop // block_cols)),
        )
        weight = BlockQuantized(data, self._slice(scale, scale_box).float(), self.block).dequantize(self.dtype)
        return weight[rows.start - first_row :, cols.start - first_col :]

    def _slice(self, name: str, box: tuple[slice, ...]) -> Tensor:
        if all(part.start == 0 and part.stop == size for part, size in zip(box, self.shapes[name], strict=True)):
            return self.files[name].get_tensor(name)  # the whole tensor (a 0-d one too)
        return self.files[name].get_slice(name)[box]


def _load(reader: _Reader, name: str, placement: Placement, target: Tensor) -> None:
    """Copies the part of checkpoint tensor `name` that this rank holds into `target`, or checks an MTP copy."""
    local, local_offset = _local_part(placement.target, target)
    box = _overlap(placement, local_offset, tuple(local.shape))
    if box is None:
        return  # none of it lives on this rank
    lead = len(placement.shape) - len(reader.shapes[name])  # 1 for one expert of a fused tensor
    source = tuple(slice(s.start - o, s.stop - o) for s, o in zip(box, placement.offset, strict=True))[lead:]
    data = reader.read(name, source).reshape([s.stop - s.start for s in box])
    if placement.copy_of is not None:
        reference = reader.read(placement.copy_of, source).reshape(data.shape)
        check_copy(name, placement.target, data, reference)
        return
    local[tuple(slice(s.start - o, s.stop - o) for s, o in zip(box, local_offset, strict=True))].copy_(data)


def _local_part(key: str, tensor: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """The part of our tensor `key` this rank holds and its offset in the full tensor: all of it at 0,
    or a DTensor's local shard."""
    if not isinstance(tensor, DTensor):
        return tensor, (0,) * tensor.dim()
    if any(isinstance(placement, Partial) for placement in tensor.placements):
        raise ValueError(f"{key!r} is a DTensor with placements {tensor.placements}; a Partial one cannot be loaded")
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    local = tensor.to_local()
    if tuple(local.shape) != tuple(shape):
        raise ValueError(f"{key!r}: local shard of shape {tuple(local.shape)}, but its placements give {shape}")
    return local, tuple(offset)


def _overlap(placement: Placement, offset: tuple[int, ...], shape: tuple[int, ...]) -> tuple[slice, ...] | None:
    """The part of the placement's box inside [offset, offset + shape), in full-tensor coordinates; None if empty."""
    box = []
    for start, size, local_start, local_size in zip(placement.offset, placement.shape, offset, shape, strict=True):
        low, high = max(start, local_start), min(start + size, local_start + local_size)
        if low >= high:
            return None
        box.append(slice(low, high))
    return tuple(box)


__all__ = ["load_into"]
