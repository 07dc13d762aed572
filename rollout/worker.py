"""A rollout worker: one engine served to one trainer at a time over an authenticated socket.

The worker answers the control messages of rollout/messages.py one at a time,
in order, so a weight update can never land in the middle of a batch. Weights
arrive over the weight-sync group bucket by bucket; the engine's
`policy_version` changes only after the last bucket is loaded. If an update
breaks off half way (the trainer died, a timeout), the worker refuses to
generate until a complete update arrives, so it never serves a mix of two
versions.

The same server hosts every engine through `HostedEngine`: the built-in torch
engine (`TorchHost`, one receiver rank) and vLLM (`r1kit.rollout.vllm_engine`, one
receiver rank per tensor-parallel rank).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Connection, Listener
from typing import Protocol

import torch

from r1kit.rollout.buckets import Bucket
from r1kit.rollout.engine import RolloutBatch, SamplingParams
from r1kit.rollout.messages import (
    Done,
    Failure,
    Generate,
    Generated,
    Hello,
    JoinSyncGroup,
    ReceiveWeights,
    WeightsLoaded,
    WorkerInfo,
)
from r1kit.rollout.sync_group import Rendezvous, WeightSyncGroup, local_address, receive_buckets
from r1kit.rollout.torch_engine import TorchRolloutEngine

HANDOVER_S = 2.0  # how long a new trainer waits for the previous one to disconnect


class PlanMismatch(ValueError):
    """The bucket plan names a tensor the engine lacks, or with another shape; no weight was changed."""


class HostedEngine(Protocol):
    """What a worker needs from the engine it serves."""

    engine_name: str
    device: torch.device
    num_receivers: int
    policy_version: int

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch: ...

    def join_weight_sync(self, rendezvous: Rendezvous, first_rank: int, local_host: str) -> None: ...

    def receive_weights(self, version: int, plan: list[Bucket]) -> None:
        """Receives every bucket of `plan` (staying in step with the trainer even after an error), loads
        them, then stamps `version`; raises PlanMismatch, having changed nothing, if the plan does not fit."""
        ...

    def leave_weight_sync(self) -> None: ...

    def close(self) -> None: ...


class TorchHost:
    """The built-in torch engine inside a worker; the worker process is its one receiver rank."""

    engine_name = "torch"
    num_receivers = 1

    def __init__(self, engine: TorchRolloutEngine) -> None:
        self.engine = engine
        self.device = engine.device
        self._group: WeightSyncGroup | None = None

    @property
    def policy_version(self) -> int:
        return self.engine.policy_version

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        return self.engine.generate(prompts, params)

    def join_weight_sync(self, rendezvous: Rendezvous, first_rank: int, local_host: str) -> None:
        self.leave_weight_sync()
        self._group = WeightSyncGroup(rendezvous, first_rank, device=self.device, local_host=local_host)

    def receive_weights(self, version: int, plan: list[Bucket]) -> None:
        if self._group is None:
            raise RuntimeError("no weight-sync group: the trainer must send JoinSyncGroup first")
        mismatch = _plan_mismatch(plan, self.engine.model.state_dict())
        for named_tensors in receive_buckets(self._group, plan, self.device):
            if mismatch is None:
                self.engine.load_weights(named_tensors)
        if mismatch is not None:
            raise PlanMismatch(mismatch)
        self.engine.policy_version = version

    def leave_weight_sync(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None

    def close(self) -> None:
        self.leave_weight_sync()
        self.engine.close()


def _plan_mismatch(plan: list[Bucket], state_dict: dict) -> str | None:
    """Why `plan` does not fit a model with this state dict, or None."""
    for bucket in plan:
        for slot in bucket.slots:
            target = state_dict.get(slot.name)
            if target is None:
                return f"the rollout model has no tensor named {slot.name!r}"
            if tuple(target.shape) != slot.shape:
                return f"{slot.name!r} has shape {slot.shape}, the rollout model expects {tuple(target.shape)}"
    return None


class RolloutWorker:
    """Serves `host` on `address` to one authenticated trainer at a time.

    exit_with_client: stop after the first trainer disconnects (workers a
    trainer launched itself); otherwise wait for the next trainer (workers
    started by hand).
    """

    def __init__(
        self,
        host: HostedEngine,
        *,
        model: str,
        authkey: bytes,
        address: tuple[str, int] = ("127.0.0.1", 0),
        exit_with_client: bool = False,
    ) -> None:
        self.host, self.model, self.exit_with_client = host, model, exit_with_client
        self.listener = Listener(address, family="AF_INET", authkey=authkey)
        self.address: tuple[str, int] = self.listener.address
        self._clients: queue.Queue[Connection] = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._partial_version: int | None = None  # set while (or after a failed) weight update is in progress
        self._stopping = False

    def serve(self) -> None:
        """Blocks for good (or, with exit_with_client, until the first trainer disconnects)."""
        threading.Thread(target=self._accept_loop, name="rollout-accept", daemon=True).start()
        try:
            while True:
                connection = self._clients.get()
                self._serve_client(connection)
                self._idle.set()
                if self.exit_with_client:
                    return
        finally:
            self._stopping = True
            self.listener.close()
            self.host.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                connection = self.listener.accept()
            except Exception as error:  # a wrong authkey, a peer that hung up mid-handshake, or the end
                if self._stopping:
                    return
                print(f"rollout worker: refused a connection: {error}", file=sys.stderr, flush=True)
                continue
            if not self._idle.wait(HANDOVER_S):  # a trainer that is disconnecting gets a moment to finish
                where = f"{self.address[0]}:{self.address[1]}"
                connection.send(Failure("busy", f"the worker at {where} serves another trainer"))
                connection.close()
                continue
            self._idle.clear()
            self._clients.put(connection)

    def _serve_client(self, connection: Connection) -> None:
        """Answers one trainer's requests until it disconnects."""
        local_host = local_address(connection)
        try:
            while True:
                try:
                    request = connection.recv()
                    connection.send(self._answer(request, local_host))
                except (EOFError, OSError):  # the trainer went away, possibly mid-request
                    return
        finally:
            self.host.leave_weight_sync()  # the group belongs to this trainer
            connection.close()

    def _answer(self, request: object, local_host: str) -> object:
        try:
            return self._dispatch(request, local_host)
        except Exception as error:
            traceback.print_exc(file=sys.stderr)
            return Failure(type(error).__name__, str(error))

    def _dispatch(self, request: object, local_host: str) -> object:
        host = self.host
        if isinstance(request, Hello):
            return WorkerInfo(
                engine=host.engine_name,
                model=self.model,
                device=str(host.device),
                num_receivers=host.num_receivers,
                policy_version=host.policy_version,
                pid=os.getpid(),
            )
        if isinstance(request, Generate):
            if self._partial_version is not None:
                raise RuntimeError(
                    f"the update to policy version {self._partial_version} broke off half way; "
                    "this worker serves no batch until a complete update arrives"
                )
            return Generated.from_batch(host.generate(request.prompts, request.params))
        if isinstance(request, JoinSyncGroup):
            host.join_weight_sync(request.rendezvous, request.first_rank, local_host)
            return Done()
        if isinstance(request, ReceiveWeights):
            return self._receive_weights(request)
        raise TypeError(f"unknown request {type(request).__name__}")

    def _receive_weights(self, request: ReceiveWeights) -> WeightsLoaded:
        self._partial_version = request.version
        try:
            self.host.receive_weights(request.version, request.plan)
        except PlanMismatch:
            self._partial_version = None  # nothing was loaded; the group stayed in step
            raise
        except BaseException:
            self.host.leave_weight_sync()  # a group that failed once is never reused
            raise
        self._partial_version = None
        return WeightsLoaded(self.host.policy_version)
