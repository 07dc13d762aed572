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

`plan_load` does the same conversion from names and shapes alone: where each
checkpoint tensor goes in our state dict (a `Placement`: a target key and a box
in it, e.g. `experts.{e}.up_proj.weight` -> `gate_up_proj[e, I:2I]`), with every
check of `from_released` and `check_keys` made before a tensor is read. The
streaming loader (policy/streaming_load.py) reads a checkpoint by this plan.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from r1kit.policy.config import DeepseekV3Config

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"

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
        target = _route(name, config, skip_extra_mtp)
        if target is None:
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


@dataclass(frozen=True)
class Placement:
    """Where one checkpoint tensor goes: the box [offset, offset + shape) of our tensor `target`.

    shape is the checkpoint tensor's own, with a leading 1 when it is one expert of a fused
    (E, ., .) tensor. `copy_of` is set for an MTP module's copy of the embedding or the head: it
    is not written, but must equal the checkpoint tensor `copy_of`, the one that fills `target`.
    """

    target: str
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    copy_of: str | None = None


@dataclass(frozen=True)
class LoadPlan:
    """placements: by checkpoint name, in reading order; skipped: checkpoint tensors of MTP layers
    the model does not have (`skip_extra_mtp`); fresh: our keys of whole MTP modules the checkpoint lacks."""

    placements: dict[str, Placement]
    skipped: list[str]
    fresh: list[str]


def plan_load(
    shapes: Mapping[str, tuple[int, ...]],
    targets: Mapping[str, tuple[int, ...]],
    config: DeepseekV3Config,
    *,
    skip_extra_mtp: bool = False,
) -> LoadPlan:
    """Where every checkpoint tensor goes in our state dict, from names and shapes alone.

    shapes: checkpoint tensor name (released, transformers-fused or our names, in any mix) -> shape,
    in reading order. targets: our state-dict key -> full (unsharded) shape of each tensor to fill.
    Raises the ValueErrors of `from_released` and `check_keys`, and on a tensor that is given
    twice or whose shape does not fit its place, naming both.
    """
    plain: dict[str, str] = {}  # our key -> checkpoint name
    experts: dict[str, dict[str, dict[int, str]]] = defaultdict(lambda: defaultdict(dict))
    copies: list[tuple[str, str]] = []  # (checkpoint name, our key of the shared tensor)
    skipped: list[str] = []
    for name in shapes:
        target = _route(name, config, skip_extra_mtp)
        if target is None:
            skipped.append(name)
        elif target.startswith("="):
            copies.append((name, target[1:]))
        elif match := _PER_EXPERT.match(target):
            by_expert = experts[match[1]][match[3]]
            _refuse_twice(target, by_expert.get(int(match[2])), name)
            by_expert[int(match[2])] = name
        else:
            _refuse_twice(target, plain.get(target), name)
            plain[target] = name
    fused = [f"{prefix}.{kind}" for prefix in experts for kind in ("gate_up_proj", "down_proj")]
    for prefix, projections in experts.items():
        _check_experts(prefix, projections, config.n_routed_experts)
        if f"{prefix}.down_proj" in plain or f"{prefix}.gate_up_proj" in plain:
            raise ValueError(f"checkpoint holds the experts of {prefix!r} twice, per expert and fused")
    placements = {}
    for name, shared in copies:
        if shared not in plain:
            raise ValueError(f"checkpoint has {name!r} but not the {shared!r} it must copy")
        if shapes[name] != shapes[plain[shared]]:
            raise _copy_differs(name, shared)
        placements[name] = Placement(shared, (0,) * len(shapes[name]), shapes[name], copy_of=plain[shared])
    fresh = check_keys([*plain, *fused], targets)
    for target, name in plain.items():
        _check_fits(name, shapes[name], target, targets[target], targets[target])
        placements[name] = Placement(target, (0,) * len(shapes[name]), shapes[name])
    for prefix, projections in experts.items():
        placements.update(_expert_placements(prefix, projections, shapes, targets))
    return LoadPlan({name: placements[name] for name in shapes if name in placements}, skipped, fresh)


def _expert_placements(
    prefix: str,
    projections: Mapping[str, Mapping[int, str]],
    shapes: Mapping[str, tuple[int, ...]],
    targets: Mapping[str, tuple[int, ...]],
) -> Iterator[tuple[str, Placement]]:
    """Per-expert checkpoint tensors -> their rows of gate_up_proj (E, 2I, H) (gate rows [0, I), up rows
    [I, 2I)) and down_proj (E, H, I)."""
    gate_up, down = f"{prefix}.gate_up_proj", f"{prefix}.down_proj"
    rows = targets[gate_up][1] // 2
    for kind, names in projections.items():
        for expert, name in names.items():
            if kind == "down_proj":
                target, first_row, needed = down, 0, targets[down][1:]
            else:
                target, first_row, needed = gate_up, rows if kind == "up_proj" else 0, (rows, *targets[gate_up][2:])
            _check_fits(name, shapes[name], target, targets[target], needed)
            yield name, Placement(target, (expert, first_row, 0), (1, *shapes[name]))


def _refuse_twice(target: str, earlier: str | None, name: str) -> None:
    if earlier is not None:
        raise ValueError(f"checkpoint holds {target!r} twice, as {earlier!r} and {name!r}")


def _check_fits(
    name: str, shape: tuple[int, ...], target: str, target_shape: tuple[int, ...], needed: tuple[int, ...]
) -> None:
    if tuple(shape) != tuple(needed):
        place = repr(target) if tuple(needed) == tuple(target_shape) else f"its place in {target!r} {target_shape}"
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(shape)}, but {place} has shape {needed}")


def _route(name: str, config: DeepseekV3Config, skip_extra_mtp: bool) -> str | None:
    """`_our_name`, raising on an extra MTP layer unless `skip_extra_mtp` (then None)."""
    target = _our_name(name, config)
    if target is None and not skip_extra_mtp:
        raise ValueError(
            f"checkpoint tensor {name!r} belongs to an MTP layer beyond num_nextn_predict_layers="
            f"{config.num_nextn_predict_layers} (pass num_nextn_predict_layers=0 to drop MTP)"
        )
    return target


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
    _check_experts(prefix, projections, num_experts)
    stack = lambda kind: torch.stack([projections[kind][e] for e in range(num_experts)])
    return {
        f"{prefix}.gate_up_proj": torch.cat((stack("gate_proj"), stack("up_proj")), dim=1),
        f"{prefix}.down_proj": stack("down_proj"),
    }


def _check_experts(prefix: str, projections: Mapping[str, Collection[int]], num_experts: int) -> None:
    """Raises unless each of gate_proj, up_proj and down_proj comes for experts 0 .. num_experts - 1 exactly."""
    for kind in ("gate_proj", "up_proj", "down_proj"):
        missing = sorted(set(range(num_experts)) - set(projections.get(kind, {})))
        if missing:
            raise ValueError(f"checkpoint lacks {prefix}.{{{_ranges(missing)}}}.{kind}.weight")
        extra = sorted(set(projections[kind]) - set(range(num_experts)))
        if extra:
            raise ValueError(
                f"checkpoint has {prefix}.{{{_ranges(extra)}}}.{kind}.weight, beyond n_routed_experts={num_experts}"
            )


def _check_copy(
    name: str, shared: str, tensor: torch.Tensor, ours: Mapping[str, torch.Tensor], config: DeepseekV3Config
) -> None:
    reference = ours.get(shared)
    if reference is None and shared == "lm_head.weight" and config.tie_word_embeddings:
        reference = ours.get("model.embed_tokens.weight")
    if reference is None:
        raise ValueError(f"checkpoint has {name!r} but not the {shared!r} it must copy")
    check_copy(name, shared, tensor, reference)


def check_copy(name: str, shared: str, copy: torch.Tensor, reference: torch.Tensor) -> None:
    """Raises unless checkpoint tensor `name`, an MTP copy of our `shared`, equals `reference` (the
    checkpoint's `shared`, or the same part of both), compared in the reference's dtype."""
    if reference.shape != copy.shape or not torch.equal(reference, copy.to(reference.dtype)):
        raise _copy_differs(name, shared)


def _copy_differs(name: str, shared: str) -> ValueError:
    return ValueError(
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


def check_keys(keys: Collection[str], expected: Iterable[str]) -> list[str]:
    """Raises on unexpected and missing keys (ours), except for whole MTP modules; returns those modules' keys.

    A checkpoint without any tensor of MTP module k (transformers' DeepseekV3 never
    saves MTP) leaves that module to be initialised fresh; one with some of its
    tensors but not all is damaged and raises like any other missing tensor.
    """
    expected = set(expected)
    unexpected = sorted(set(keys) - expected)
    if unexpected:
        raise ValueError(f"checkpoint has {len(unexpected)} unexpected tensors: {_preview(unexpected)}")
    missing = sorted(expected - set(keys))
    saved_mtp_modules = {mtp_module(key) for key in keys if _OUR_MTP.match(key)}
    fresh = [key for key in missing if _OUR_MTP.match(key) and mtp_module(key) not in saved_mtp_modules]
    lacking = [key for key in missing if key not in fresh]
    if lacking:
        raise ValueError(f"checkpoint lacks {len(lacking)} tensors: {_preview(lacking)}")
    return fresh


def mtp_module(key: str) -> int:
    """The module index k of a key `mtp.{k}.<rest>`."""
    return int(_OUR_MTP.match(key)[1])


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def write_safetensors(
    directory: str | os.PathLike, named_tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int
) -> None:
    """Writes tensors as safetensors shards of at most `max_shard_bytes` (plus an index when sharded).

    Streams: a shard is written as soon as it is full, so besides the tensors the
    caller holds, at most one shard is in memory. Shards are written under
    temporary names and renamed at the end (their final names count them), so a
    crash never leaves a truncated shard under a final name.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for leftover in directory.glob(".shard-*.safetensors.tmp"):  # from a save that crashed
        leftover.unlink()
    written: list[tuple[Path, list[str]]] = []  # temporary file, the names in it
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        # clone: views of one parameter (per-expert slices) may not share storage in a safetensors file
        tensors = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in shard.items()}
        path = directory / f".shard-{len(written):05d}.safetensors.tmp"
        save_file(tensors, str(path), {"format": "pt"})
        written.append((path, list(shard)))

    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            shard, size = {}, 0
        shard[name] = tensor
        size += nbytes
        total += nbytes
    flush()
    count = len(written)
    names = [SAFE_WEIGHTS] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    for (path, _), file in zip(written, names, strict=True):
        os.replace(path, directory / file)
    if count > 1:
        weight_map = {name: file for (_, shard_names), file in zip(written, names, strict=True) for name in shard_names}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _atomic_write(directory / SAFE_INDEX, lambda path: Path(path).write_text(json.dumps(index, indent=2)))
    stale = [*directory.glob("model-*-of-*.safetensors"), directory / SAFE_INDEX, directory / SAFE_WEIGHTS]
    for path in stale:
        if path.exists() and path.name not in names and not (count > 1 and path.name == SAFE_INDEX):
            path.unlink()  # a previous save's files would shadow or contradict this one


class StreamedStateDict(Mapping[str, torch.Tensor]):
    """Our state dict, read once in order from a stream of (name, tensor) pairs, for `save_pretrained`.

    `items()` passes each tensor on as it arrives, so a whole model is never held:
    the stream may gather a sharded model's tensors one at a time, or read a
    distributed checkpoint. Only the embedding and the output head are kept, which
    `to_released` copies into every MTP module (they come before the MTP modules
    in our order). names: every key of the stream, in order.
    """

    KEPT = ("model.embed_tokens.weight", "lm_head.weight")

    def __init__(self, stream: Iterable[tuple[str, torch.Tensor]], names: Iterable[str]) -> None:
        self._stream, self._names, self._kept = iter(stream), list(names), {}

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._kept:
            raise KeyError(f"{name}: a streamed state dict serves only {self.KEPT} out of order, once read")
        return self._kept[name]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:  # type: ignore[override]
        for name, tensor in self._stream:
            if name in self.KEPT:
                self._kept[name] = tensor
            yield name, tensor


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
