"""Bucket planning and packing: order, sizes, alignment, and bit-exact round trips."""

import pytest
import torch

from r1kit.rollout.buckets import ALIGNMENT, pack_bucket, plan_buckets, unpack_bucket


def specs(tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    return [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]


def test_plan_keeps_order_and_respects_the_bucket_size() -> None:
    tensors = {f"w{i}": torch.zeros(100) for i in range(10)}  # 400 bytes each
    plan = plan_buckets(specs(tensors), bucket_bytes=1000)
    assert [slot.name for bucket in plan for slot in bucket.slots] == list(tensors)
    assert all(bucket.nbytes <= 1000 for bucket in plan)
    assert [len(bucket.slots) for bucket in plan] == [2] * 5  # 400, pad to 448, 848; a third would need 1296


def test_a_tensor_larger_than_a_bucket_gets_its_own() -> None:
    plan = plan_buckets(
        [("small", torch.float32, (4,)), ("big", torch.float32, (1000,)), ("tail", torch.int64, (2,))], 256
    )
    assert [[slot.name for slot in bucket.slots] for bucket in plan] == [["small"], ["big"], ["tail"]]
    assert plan[1].nbytes == 4000


def test_every_slot_is_aligned() -> None:
    plan = plan_buckets([("a", torch.bfloat16, (3,)), ("b", torch.float64, (5,)), ("c", torch.bool, (7,))], 10**6)
    assert all(slot.offset % ALIGNMENT == 0 for slot in plan[0].slots)


def test_round_trip_is_bit_exact_for_mixed_dtypes_and_views() -> None:
    base = torch.randn(4, 6, 8)
    tensors = {
        "expert_slice": base[2, :3],  # a non-contiguous view, as to_released yields
        "transposed": base[0].t(),
        "bf16": torch.randn(5, 3).to(torch.bfloat16),
        "scalar": torch.tensor(3.5),
        "ids": torch.arange(7),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }
    plan = plan_buckets(specs(tensors), bucket_bytes=300)
    received = {}
    for bucket in plan:
        names = [slot.name for slot in bucket.slots]
        buffer = pack_bucket(bucket, [tensors[n] for n in names], "cpu")
        assert buffer.dtype == torch.uint8 and buffer.numel() == bucket.nbytes
        received.update({name: t.clone() for name, t in unpack_bucket(bucket, buffer.clone())})
    assert received.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert received[name].dtype == tensor.dtype and received[name].shape == tensor.shape
        assert torch.equal(received[name], tensor), name


def test_bad_input_names_the_tensor() -> None:
    with pytest.raises(ValueError, match="'w' appears twice"):
        plan_buckets([("w", torch.float32, (2,)), ("w", torch.float32, (2,))], 1024)
    plan = plan_buckets([("w", torch.float32, (2,))], 1024)
    with pytest.raises(ValueError, match=r"tensor 'w' is torch\.float64"):
        pack_bucket(plan[0], [torch.zeros(2, dtype=torch.float64)], "cpu")
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets([], 8)
