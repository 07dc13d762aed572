"""A standalone torch.distributed process group for weight sync between a trainer and its workers.

Rank 0 is the trainer (the only sender); ranks 1.. are the receivers (one per
torch worker, one per tensor-parallel rank of a vLLM worker). The group never
touches torch.distributed's default group, so the trainer may run under
accelerate / DDP / FSDP with its own: it is built directly from a backend class
(`ProcessGroupGloo` on CPU, `ProcessGroupNCCL` on GPUs) over its own TCPStore,
which is what works on torch 2.13 (`torch.distributed.new_group` needs the
default group; `torch.distributed._dist2.new_group` reads the rendezvous from
environment variables shared with the trainer's own group).

The store listens only on the address it is given (127.0.0.1 unless workers
run on other hosts): the trainer opens the listening socket itself and hands
its descriptor to `TCPStore`. Gloo binds to the address each process reached
its peer on. Every collective waits at most `timeout_s` and raises
`TimeoutError`; a peer that dies makes gloo raise at once ("Connection closed
by peer"). A group that failed once is closed and never reused: the trainer
builds a fresh one under a new store prefix.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from r1kit.rollout.buckets import Bucket, unpack_bucket

Backend = Literal["gloo", "nccl"]


@dataclass(frozen=True)
class Rendezvous:
    """Where and how the ranks of one weight-sync group meet.

    host, port: the trainer's TCPStore. world_size: 1 + number of receivers.
    group_name: store prefix, unique per group built on the same store.
    """

    host: str
    port: int
    world_size: int
    backend: Backend
    timeout_s: float
    group_name: str

    def __post_init__(self) -> None:
        if self.world_size < 2:
            raise ValueError(f"a weight-sync group needs a sender and a receiver, got world_size={self.world_size}")
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"Rendezvous.backend must be 'gloo' or 'nccl', got {self.backend!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"Rendezvous.timeout_s must be > 0, got {self.timeout_s}")


class SyncStore:
    """The trainer's TCPStore, listening on `host` only (an ephemeral port)."""

    def __init__(self, host: str, timeout_s: float) -> None:
        listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind((host, 0))
            listener.listen(128)
            self.host, self.port = host, listener.getsockname()[1]
            self.store = dist.TCPStore(
                host,
                self.port,
                None,
                True,
                timeout=datetime.timedelta(seconds=timeout_s),
                wait_for_workers=False,
                master_listen_fd=listener.fileno(),
            )
        except BaseException:
            listener.close()
            raise
        listener.detach()  # the store owns the descriptor now and closes it with itself

    def close(self) -> None:
        self.store = None


class WeightSyncGroup:
    """One rank of a weight-sync group; `broadcast` moves a buffer from rank 0 to every other rank.

    rank: 0 for the trainer, first_rank + i for a worker's i-th receiver.
    device: where this rank's buffers live (CPU for gloo, its GPU for NCCL).
    local_host: the local address gloo binds to (the one this process uses to reach its peer).
    store: the trainer passes its SyncStore's store; receivers connect to the rendezvous.
    """

    def __init__(
        self,
        rendezvous: Rendezvous,
        rank: int,
        *,
        device: torch.device | str,
        local_host: str,
        store: dist.Store | None = None,
    ) -> None:
        if not 0 <= rank < rendezvous.world_size:
            raise ValueError(f"rank {rank} outside the group of {rendezvous.world_size}")
        self.rendezvous, self.rank, self.device = rendezvous, rank, torch.device(device)
        self.timeout = datetime.timedelta(seconds=rendezvous.timeout_s)
        if store is None:
            store = dist.TCPStore(rendezvous.host, rendezvous.port, None, False, timeout=self.timeout)
        prefixed = dist.PrefixStore(rendezvous.group_name, store)
        if rendezvous.backend == "gloo":
            self._backend = _gloo_group(prefixed, rank, rendezvous.world_size, self.timeout, local_host)
        else:
            self._backend = _nccl_group(prefixed, rank, rendezvous.world_size, self.timeout, self.device)

    def broadcast(self, buffer: Tensor) -> None:
        """Rank 0 sends `buffer`; the others receive into theirs (same size and dtype). Raises on timeout."""
        if self._backend is None:
            raise RuntimeError("this weight-sync group was closed")
        options = dist.BroadcastOptions()
        options.rootRank = 0
        options.rootTensor = 0
        work = self._backend.broadcast([buffer], options)
        try:
            work.wait(self.timeout)
        except RuntimeError as error:
            if "timed out" in str(error).lower():
                raise TimeoutError(
                    f"weight-sync broadcast of {buffer.numel()} bytes did not finish within "
                    f"{self.rendezvous.timeout_s:g}s"
                ) from error
            raise
        if buffer.is_cuda:
            torch.cuda.current_stream(buffer.device).synchronize()

    def close(self) -> None:
        """Aborts pending work and releases the group's connections."""
        backend, self._backend = self._backend, None
        if backend is not None and hasattr(backend, "abort"):
            with contextlib.suppress(RuntimeError):  # already broken: nothing left to release
                backend.abort()


def _gloo_group(
    store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta, local_host: str
) -> dist.ProcessGroup:
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=local_host)]
    return dist.ProcessGroupGloo(store, rank, world_size, options)


def _nccl_group(
    store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta, device: torch.device
) -> dist.ProcessGroup:
    if not dist.is_nccl_available() or device.type != "cuda":
        raise RuntimeError(f"the NCCL weight-sync backend needs a CUDA device and an NCCL build of torch, got {device}")
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    with torch.cuda.device(device):  # without changing the caller's current device
        group = dist.ProcessGroupNCCL(store, rank, world_size, options)
        group.eager_connect_single_device(device)  # build the communicator now, so a bad peer fails here
    return group


def receive_buckets(
    group: WeightSyncGroup, plan: list[Bucket], device: torch.device
) -> Iterator[list[tuple[str, Tensor]]]:
    """Receives the buckets of `plan` in order; yields each one's (name, tensor) views.

    One buffer, sized for the largest bucket, is reused: load a bucket before
    asking for the next.
    """
    if not plan:
        return
    buffer = torch.empty(max(bucket.nbytes for bucket in plan), dtype=torch.uint8, device=device)
    for bucket in plan:
        received = buffer[: bucket.nbytes]
        group.broadcast(received)
        yield unpack_bucket(bucket, received)


def local_address(connection) -> str:
    """The local IP address of a multiprocessing connection's socket (the interface its peer reaches us on)."""
    with socket.socket(fileno=os.dup(connection.fileno())) as sock:
        return sock.getsockname()[0]
