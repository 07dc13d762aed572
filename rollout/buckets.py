"""Weight buckets: many named tensors packed into a few flat byte buffers.

A weight update streams the policy's state dict as a sequence of buckets. The
plan (names, dtypes, shapes and byte offsets) is small and travels over the
control socket; the bucket bytes travel over the process group, one broadcast
per bucket, so a 671B model goes out in a few thousand collectives rather than
one per tensor, and no buffer is larger than `bucket_bytes` (except a single
tensor bigger than that, which gets a bucket of its own).

Tensors keep their dtype on the wire: the receiver gets bit-exact copies.
Every tensor starts at a multiple of `ALIGNMENT` bytes, so a byte slice can be
viewed as any dtype without copying.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

ALIGNMENT = 64  # bytes; a multiple of every dtype's element size


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives in its bucket: bytes [offset, offset + nbytes)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Bucket:
    """A flat buffer of `nbytes` bytes holding `slots` in order."""

    slots: tuple[TensorSlot, ...]
    nbytes: int


def tensor_nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel * dtype.itemsize


def plan_buckets(specs: Iterable[tuple[str, torch.dtype, Sequence[int]]], bucket_bytes: int) -> list[Bucket]:
    """Greedy, order-preserving packing of (name, dtype, shape) into buckets of at most `bucket_bytes`.

    A tensor larger than `bucket_bytes` gets a bucket of its own. Names must be unique.
    """
    if bucket_bytes < ALIGNMENT:
        raise ValueError(f"bucket_bytes must be >= {ALIGNMENT}, got {bucket_bytes}")
    buckets: list[Bucket] = []
    slots: list[TensorSlot] = []
    end = 0
    seen: set[str] = set()
    for name, dtype, shape in specs:
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice in the weight update")
        seen.add(name)
        nbytes = tensor_nbytes(dtype, shape)
        offset = _align(end)
        if slots and offset + nbytes > bucket_bytes:
            buckets.append(Bucket(tuple(slots), end))
            slots, offset = [], 0
        slots.append(TensorSlot(name, dtype, tuple(int(s) for s in shape), offset, nbytes))
        end = offset + nbytes
    if slots:
        buckets.append(Bucket(tuple(slots), end))
    return buckets


def _align(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def pack_bucket(bucket: Bucket, tensors: Sequence[Tensor], device: torch.device | str) -> Tensor:
    """Copies `tensors` (one per slot, in order) into a new (bucket.nbytes,) uint8 buffer on `device`."""
    if len(tensors) != len(bucket.slots):
        raise ValueError(f"bucket has {len(bucket.slots)} slots, got {len(tensors)} tensors")
    buffer = torch.zeros(bucket.nbytes, dtype=torch.uint8, device=device)
    for slot, tensor in zip(bucket.slots, tensors, strict=True):
        if tensor.dtype != slot.dtype or tuple(tensor.shape) != slot.shape:
            raise ValueError(
                f"tensor {slot.name!r} is {tensor.dtype} {tuple(tensor.shape)}, the plan says {slot.dtype} {slot.shape}"
            )
        _slot_view(buffer, slot).copy_(tensor.detach())
    return buffer


def unpack_bucket(bucket: Bucket, buffer: Tensor) -> list[tuple[str, Tensor]]:
    """(name, tensor) views into a received uint8 buffer; valid until the buffer is reused."""
    if buffer.dtype != torch.uint8 or buffer.numel() < bucket.nbytes:
        raise ValueError(f"bucket needs a uint8 buffer of {bucket.nbytes} bytes, got {buffer.dtype} {buffer.numel()}")
    return [(slot.name, _slot_view(buffer, slot)) for slot in bucket.slots]


def _slot_view(buffer: Tensor, slot: TensorSlot) -> Tensor:
    return buffer[slot.offset : slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)
