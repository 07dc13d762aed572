"""The standalone weight-sync group, with both ranks in one process (threads): exact transfer, bounded waits."""

import threading
import time
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist

from r1kit.rollout.buckets import pack_bucket, plan_buckets
from r1kit.rollout.sync_group import Rendezvous, SyncStore, WeightSyncGroup, receive_buckets


def in_threads(*calls: Callable[[], object]) -> list[object]:
    """Runs the calls concurrently; returns their results (or raised exceptions) in order."""
    results: list[object] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as error:
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


def make_group(world_size: int, timeout_s: float = 10.0) -> tuple[SyncStore, list[WeightSyncGroup]]:
    store = SyncStore("127.0.0.1", timeout_s)
    rendezvous = Rendezvous("127.0.0.1", store.port, world_size, "gloo", timeout_s, "test")
    groups = in_threads(
        *[
            (
                lambda r=rank: WeightSyncGroup(
                    rendezvous, r, device="cpu", local_host="127.0.0.1", store=store.store if r == 0 else None
                )
            )
            for rank in range(world_size)
        ]
    )
    assert all(isinstance(g, WeightSyncGroup) for g in groups), groups
    return store, groups


def test_buckets_reach_every_receiver_bit_exact() -> None:
    store, (sender, *receivers) = make_group(3)
    tensors = {"a": torch.randn(300), "b": torch.randn(7, 5).to(torch.bfloat16), "c": torch.arange(11)}
    plan = plan_buckets([(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], bucket_bytes=1024)
    assert len(plan) == 2

    def send() -> None:
        for bucket in plan:
            sender.broadcast(pack_bucket(bucket, [tensors[s.name] for s in bucket.slots], "cpu"))

    def receive(group: WeightSyncGroup) -> dict[str, torch.Tensor]:
        return {n: t.clone() for pairs in receive_buckets(group, plan, torch.device("cpu")) for n, t in pairs}

    results = in_threads(send, lambda: receive(receivers[0]), lambda: receive(receivers[1]))
    for got in results[1:]:
        assert got.keys() == tensors.keys()
        assert all(torch.equal(got[n], tensors[n]) for n in tensors)
    for group in (sender, *receivers):
        group.close()
    store.close()


def test_a_receiver_that_never_shows_up_fails_the_rendezvous_in_time() -> None:
    store = SyncStore("127.0.0.1", 1.0)
    rendezvous = Rendezvous("127.0.0.1", store.port, 2, "gloo", 1.0, "lonely")
    start = time.monotonic()
    with pytest.raises(dist.DistStoreError):
        WeightSyncGroup(rendezvous, 0, device="cpu", local_host="127.0.0.1", store=store.store)
    assert time.monotonic() - start < 10
    store.close()


def test_a_broadcast_nobody_receives_times_out() -> None:
    store, (sender, receiver) = make_group(2, timeout_s=1.0)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 1s"):
        sender.broadcast(torch.zeros(50_000_000, dtype=torch.uint8))  # larger than the socket buffers
    assert time.monotonic() - start < 10
    sender.close()
    receiver.close()
    with pytest.raises(RuntimeError, match="closed"):
        sender.broadcast(torch.zeros(4, dtype=torch.uint8))
    store.close()


def test_rendezvous_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="world_size=1"):
        Rendezvous("127.0.0.1", 1, 1, "gloo", 1.0, "g")
    with pytest.raises(ValueError, match="backend"):
        Rendezvous("127.0.0.1", 1, 2, "mpi", 1.0, "g")
