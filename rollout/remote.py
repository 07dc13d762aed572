"""`RemoteRolloutEngine`: the RolloutEngine a trainer uses to drive worker processes.

    engine = RemoteRolloutEngine.launch("out/init", num_workers=1)               # local workers
    engine = RemoteRolloutEngine.connect(["gpu-host:7301", "gpu-host:7302"])     # started by hand
    batch = engine.generate(prompt_ids, SamplingParams(n=8, max_new_tokens=512))
    engine.update_weights(policy.state_dict().items(), version=step)

Processes and channels (docs/rollout.md has the picture):

- control: one authenticated `multiprocessing.connection` socket per worker
  (prompts, completions, bucket plans, acknowledgements; never weights);
- weights: one standalone process group (rollout/sync_group.py), rank 0 the
  trainer, every worker's receivers after it; `update_weights` plans buckets
  of `bucket_mb`, tells every worker the plan, and broadcasts bucket by
  bucket; it returns once every worker has loaded the whole plan and stamped
  the new version.

Prompts are split across workers in contiguous shards (whole groups), the
shards run concurrently, and the batch comes back in prompt order with the
one policy version every shard was generated with. The engine serialises its
calls: a weight update requested while a batch is being generated waits for
it (so weights never change mid-batch) and then goes out.

Failures: every wait is bounded (start-up, generation, sync timeouts). A
worker that dies or hangs raises `RolloutWorkerDied` / `RolloutWorkerTimeout`
naming it, and the engine refuses further calls; with `max_restarts > 0` a
launched worker is killed, started again, given the last weights pushed
(the engine keeps a CPU copy of them for this) and the lost request is run
again. Only one trainer process (rank 0) talks to the workers.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from r1kit.rollout.buckets import Bucket, pack_bucket, plan_buckets
from r1kit.rollout.engine import RolloutBatch, SamplingParams, concat_rollouts
from r1kit.rollout.errors import RolloutWorkerDied, RolloutWorkerError, RolloutWorkerTimeout
from r1kit.rollout.launch import WorkerProcess
from r1kit.rollout.messages import AUTHKEY_ENV, Generate, JoinSyncGroup, ReceiveWeights, WeightsLoaded
from r1kit.rollout.serve import WorkerOptions
from r1kit.rollout.sync_group import Rendezvous, SyncStore, WeightSyncGroup, local_address
from r1kit.rollout.worker_handle import WorkerHandle

logger = logging.getLogger(__name__)

_RECOVERABLE = (RolloutWorkerDied, RolloutWorkerTimeout)


@dataclass
class RemoteEngineConfig:
    """How the trainer drives its workers.

    start_timeout_s: a worker's start-up (model load) and connection.
    generate_timeout_s: one `generate` call, all shards together.
    sync_timeout_s: one weight update, and every collective in it.
    bucket_mb: weight-sync bucket size in MB (10**6 bytes).
    sync_backend: "gloo", "nccl", or "auto" (NCCL when the trainer and every worker hold CUDA weights).
    sync_host: the trainer address workers reach its TCPStore on; default 127.0.0.1 for workers on
        this host, else the address the trainer reached the first worker from.
    sync_device: the trainer's GPU for NCCL (default: the current CUDA device).
    max_restarts: launched workers that may be restarted after dying or hanging (0: raise instead).
    poll_interval_s: how often a wait checks the worker's liveness.
    """

    start_timeout_s: float = 600.0
    generate_timeout_s: float = 3600.0
    sync_timeout_s: float = 600.0
    bucket_mb: float = 128.0
    sync_backend: Literal["auto", "gloo", "nccl"] = "auto"
    sync_host: str | None = None
    sync_device: str | None = None
    max_restarts: int = 0
    poll_interval_s: float = 0.1

    def __post_init__(self) -> None:
        for name in ("start_timeout_s", "generate_timeout_s", "sync_timeout_s", "bucket_mb", "poll_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RemoteEngineConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.sync_backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"RemoteEngineConfig.sync_backend must be auto, gloo or nccl, got {self.sync_backend!r}")
        if self.max_restarts < 0:
            raise ValueError(f"RemoteEngineConfig.max_restarts must be >= 0, got {self.max_restarts}")


class _SyncFailed(Exception):
    """Workers that died or hung during a weight update, by index."""

    def __init__(self, failures: dict[int, RolloutWorkerError]) -> None:
        super().__init__(next(iter(failures.values())))
        self.failures = failures


class RemoteRolloutEngine:
    """RolloutEngine over worker processes; build it with `launch` or `connect`."""

    def __init__(
        self,
        workers: list[WorkerHandle],
        config: RemoteEngineConfig,
        *,
        relaunch: Callable[[int], WorkerHandle] | None = None,
    ) -> None:
        self._workers, self.config, self._relaunch = workers, config, relaunch
        self._restarts_left = config.max_restarts if relaunch is not None else 0
        self._processes = [w.process for w in workers if w.process is not None]
        self._finalizer = weakref.finalize(self, _kill_all, self._processes)  # no orphans, even without close()
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._failure: BaseException | None = None
        self._store: SyncStore | None = None
        self._group: WeightSyncGroup | None = None
        self._groups_built = 0
        self._snapshot: tuple[int, list[Bucket], list[Tensor]] | None = None
        self.policy_version = max(w.info.policy_version for w in workers)
        try:
            self._backend, self._sync_device = self._choose_backend()
            self._sync_host = config.sync_host or self._default_sync_host()
            self._build_sync_group()
        except _SyncFailed as failed:
            self.close()
            raise next(iter(failed.failures.values())) from None
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ construction
    @classmethod
    def launch(
        cls,
        model_path: str | os.PathLike,
        num_workers: int = 1,
        *,
        options: WorkerOptions | None = None,
        config: RemoteEngineConfig | None = None,
        visible_devices: Sequence[str] | None = None,
    ) -> RemoteRolloutEngine:
        """Starts `num_workers` local workers serving the checkpoint at `model_path` and connects to them.

        visible_devices: CUDA_VISIBLE_DEVICES of each worker (e.g. ["1", "2,3"]); default: inherited.
        """
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if visible_devices is not None and len(visible_devices) != num_workers:
            raise ValueError(f"visible_devices has {len(visible_devices)} entries for {num_workers} workers")
        options, config = options or WorkerOptions(), config or RemoteEngineConfig()
        authkey = secrets.token_hex(16).encode()

        def start(index: int) -> WorkerHandle:
            process = WorkerProcess.start(
                str(model_path),
                options,
                name=f"rollout worker {index}",
                authkey=authkey,
                timeout_s=config.start_timeout_s,
                visible_devices=visible_devices[index] if visible_devices is not None else None,
            )
            try:
                return WorkerHandle.open(
                    index,
                    ("127.0.0.1", process.port),
                    authkey,
                    timeout_s=config.start_timeout_s,
                    poll_interval_s=config.poll_interval_s,
                    process=process,
                )
            except BaseException:
                process.kill()
                raise

        with ThreadPoolExecutor(num_workers) as pool:  # workers load their models in parallel
            futures = [pool.submit(start, index) for index in range(num_workers)]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            _kill_all([f.result().process for f in futures if f.exception() is None])
            raise errors[0]
        return cls([f.result() for f in futures], config, relaunch=start)

    @classmethod
    def connect(
        cls,
        addresses: Sequence[str],
        *,
        authkey: str | bytes | None = None,
        config: RemoteEngineConfig | None = None,
    ) -> RemoteRolloutEngine:
        """Connects to workers started by hand (`python -m r1kit.rollout.serve`), given as "host:port".

        authkey defaults to the R1KIT_ROLLOUT_AUTHKEY environment variable.
        """
        config = config or RemoteEngineConfig()
        authkey = authkey if authkey is not None else os.environ.get(AUTHKEY_ENV)
        if not authkey:
            raise ValueError(f"connect needs the workers' authkey: pass authkey= or set {AUTHKEY_ENV}")
        key = authkey.encode() if isinstance(authkey, str) else authkey
        workers: list[WorkerHandle] = []
        try:
            for index, address in enumerate(addresses):
                workers.append(
                    WorkerHandle.open(
                        index,
                        _parse_address(address),
                        key,
                        timeout_s=config.start_timeout_s,
                        poll_interval_s=config.poll_interval_s,
                    )
                )
        except BaseException:
            for worker in workers:
                worker.close()
            raise
        if not workers:
            raise ValueError("connect needs at least one worker address")
        return cls(workers, config)

    def _choose_backend(self) -> tuple[str, torch.device]:
        on_gpu = all(w.info.device.startswith("cuda") for w in self._workers) and torch.cuda.is_available()
        backend = self.config.sync_backend if self.config.sync_backend != "auto" else ("nccl" if on_gpu else "gloo")
        if backend == "gloo":
            return backend, torch.device("cpu")
        return backend, torch.device(self.config.sync_device or f"cuda:{torch.cuda.current_device()}")

    def _default_sync_host(self) -> str:
        if all(_is_loopback(w.address[0]) for w in self._workers):
            return "127.0.0.1"
        return local_address(self._workers[0].connection)

    # ------------------------------------------------------------------ the protocol
    @property
    def worker_names(self) -> list[str]:
        return [w.name for w in self._workers]

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the workers (as they report them), in worker order."""
        return [w.info.pid for w in self._workers]

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        """Samples `params.n` completions per prompt across the workers; rows are grouped by prompt."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt and no empty prompt")
        with self._lock:
            self._check_usable()
            shards = _shards(len(prompts), len(self._workers))
            requests = {
                index: Generate(
                    [list(p) for p in prompts[start:end]],
                    params if params.seed is None else dataclasses.replace(params, seed=params.seed + index),
                )
                for index, (start, end) in enumerate(shards)
            }
            replies = self._exchange(requests, self.config.generate_timeout_s, "generate")
        versions = {replies[index].policy_version for index in requests}
        if len(versions) != 1:
            raise RuntimeError(f"the workers served different policy versions {sorted(versions)}; push weights first")
        return concat_rollouts([replies[i].to_batch(requests[i].prompts, params.n) for i in sorted(requests)])

    def generate_async(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Future[RolloutBatch]:
        """`generate` on a background thread; a weight update waits for it to finish."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="remote-rollout")
        return self._executor.submit(self.generate, prompts, params)

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None:
        """Streams the tensors to every worker in buckets; returns once all serve `version`."""
        with self._lock:
            self._check_usable()
            named = list(named_tensors)
            plan = plan_buckets(
                ((name, t.dtype, tuple(t.shape)) for name, t in named), int(self.config.bucket_mb * 10**6)
            )
            keep = self._restarts_left > 0
            kept: list[Tensor] = []
            first_slot = _first_slots(plan)

            def bucket_buffer(k: int) -> Tensor:
                tensors = [t for _, t in named[first_slot[k] : first_slot[k] + len(plan[k].slots)]]
                buffer = pack_bucket(plan[k], tensors, self._sync_device)
                if keep:
                    kept.append(buffer.cpu())
                return buffer

            while True:
                kept.clear()
                try:
                    self._push(plan, bucket_buffer, version)
                    break
                except _SyncFailed as failed:
                    self._recover(failed.failures)
            self.policy_version = version
            if keep:
                self._snapshot = (version, plan, list(kept))

    def close(self) -> None:
        """Disconnects; launched workers exit (killed at once after a failure, or if they linger 10 s)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._drop_group()
        if self._store is not None:
            self._store.close()
            self._store = None
        for worker in self._workers:
            worker.close()
        if self._failure is None:  # healthy workers exit by themselves once disconnected
            for process in self._processes:
                if not process.wait(10.0):
                    logger.warning("rollout worker pid %d did not exit after disconnecting; killing it", process.pid)
        self._finalizer()  # kills and reaps every launched process group that is left
        if self._failure is None:
            self._failure = RuntimeError("the remote rollout engine was closed")

    def __enter__(self) -> RemoteRolloutEngine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ------------------------------------------------------------------ requests and recovery
    def _check_usable(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"the remote rollout engine cannot be used after: {self._failure}") from self._failure

    def _exchange(self, requests: dict[int, object], timeout_s: float, what: str) -> dict[int, object]:
        """Sends each worker its request and collects the replies, restarting workers that die (if allowed)."""
        replies: dict[int, object] = {}
        pending = dict(requests)
        while pending:
            failures: dict[int, RolloutWorkerError] = {}
            for index, request in pending.items():
                try:
                    self._workers[index].send(request)
                except RolloutWorkerDied as error:
                    failures[index] = error
            deadline = time.monotonic() + timeout_s
            for index in pending:
                if index in failures:
                    continue
                try:
                    replies[index] = self._workers[index].receive(deadline, what, timeout_s)
                except _RECOVERABLE as error:
                    failures[index] = error
                except RolloutWorkerError as error:  # the worker answered Failure: a bug, not a crash
                    self._abandon_others(pending, replies, failures, index)
                    raise error
            if failures:
                self._recover(failures)
            pending = {index: requests[index] for index in failures}
        return replies

    def _abandon_others(self, pending: dict, replies: dict, failures: dict, failed: int) -> None:
        for index in pending:
            if index != failed and index not in replies and index not in failures:
                self._workers[index].abandon()

    def _recover(self, failures: dict[int, RolloutWorkerError]) -> None:
        """Restarts the failed workers and restores the last weights, or marks the engine failed and raises."""
        while True:
            error = next(iter(failures.values()))
            if len(failures) > self._restarts_left:
                self._failure = error
                self._drop_group()
                raise error
            for index in failures:
                self._restart(index)
            try:
                self._build_sync_group()
                if self._snapshot is not None:
                    self._replay_snapshot()
                return
            except _SyncFailed as failed:  # another worker went down while recovering
                failures = failed.failures

    def _replay_snapshot(self) -> None:
        version, plan, buffers = self._snapshot
        self._push(plan, lambda k: buffers[k].to(self._sync_device), version)

    def _restart(self, index: int) -> None:
        old = self._workers[index]
        old.close()
        if old.process is not None:
            old.process.kill()
            self._processes.remove(old.process)
        new = self._relaunch(index)
        self._workers[index] = new
        self._processes.append(new.process)
        self._restarts_left -= 1
        logger.warning("%s failed; restarted as %s (%d restarts left)", old.name, new.name, self._restarts_left)

    # ------------------------------------------------------------------ weight sync
    def _build_sync_group(self) -> None:
        self._drop_group()
        if self._store is None:
            self._store = SyncStore(self._sync_host, self.config.sync_timeout_s)
        self._groups_built += 1
        rendezvous = Rendezvous(
            host=self._store.host,
            port=self._store.port,
            world_size=1 + sum(w.info.num_receivers for w in self._workers),
            backend=self._backend,
            timeout_s=self.config.sync_timeout_s,
            group_name=f"r1kit-weights-{self._groups_built}",
        )
        first_rank, failures = 1, {}
        for index, worker in enumerate(self._workers):
            try:
                worker.send(JoinSyncGroup(rendezvous, first_rank))
            except RolloutWorkerDied as error:
                failures[index] = error
            first_rank += worker.info.num_receivers
        if failures:
            raise _SyncFailed(failures)
        try:
            group = WeightSyncGroup(
                rendezvous, 0, device=self._sync_device, local_host=self._store.host, store=self._store.store
            )
        except Exception as error:
            raise RolloutWorkerError(
                "the weight-sync group",
                f"did not form within {self.config.sync_timeout_s:g}s ({error}); every worker must reach the "
                f"trainer at {self._store.host}:{self._store.port} (RemoteEngineConfig.sync_host)",
            ) from error
        self._group = group
        deadline = time.monotonic() + self.config.sync_timeout_s
        failures: dict[int, RolloutWorkerError] = {}
        for index, worker in enumerate(self._workers):
            try:
                worker.receive(deadline, "joining the weight-sync group", self.config.sync_timeout_s)
            except _RECOVERABLE as error:
                failures[index] = error
        if failures:
            self._drop_group()
            raise _SyncFailed(failures)

    def _drop_group(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None

    def _push(self, plan: list[Bucket], bucket_buffer: Callable[[int], Tensor], version: int) -> None:
        """One weight update over the sync group; raises _SyncFailed naming workers that died or hung."""
        if self._group is None:
            self._build_sync_group()
        failures: dict[int, RolloutWorkerError] = {}
        for index, worker in enumerate(self._workers):
            try:
                worker.send(ReceiveWeights(version, plan))
            except RolloutWorkerDied as error:
                failures[index] = error
        if failures:
            self._drop_group()
            raise _SyncFailed(failures)
        try:
            for k in range(len(plan)):
                self._group.broadcast(bucket_buffer(k))
        except (RuntimeError, TimeoutError) as error:
            self._drop_group()
            raise self._sync_failure(error) from error
        deadline = time.monotonic() + self.config.sync_timeout_s
        replies: dict[int, object] = {}
        refusals: list[RolloutWorkerError] = []
        for index, worker in enumerate(self._workers):
            try:
                replies[index] = worker.receive(deadline, "the weight update", self.config.sync_timeout_s)
            except _RECOVERABLE as error:
                failures[index] = error
            except RolloutWorkerError as error:  # it received every bucket but refused them (e.g. unknown names)
                refusals.append(error)
        if failures:
            self._drop_group()
            raise _SyncFailed(failures)
        if refusals:
            raise refusals[0]
        for index, reply in replies.items():
            if not isinstance(reply, WeightsLoaded) or reply.version != version:
                raise RolloutWorkerError(self._workers[index].name, f"acknowledged {reply} for version {version}")

    def _sync_failure(self, error: BaseException) -> Exception:
        """After a broadcast failed: _SyncFailed naming the workers that died (first) or went silent."""
        deadline = time.monotonic() + min(5.0, self.config.sync_timeout_s)
        died: dict[int, RolloutWorkerError] = {}
        silent: dict[int, RolloutWorkerError] = {}
        for index, worker in enumerate(self._workers):
            try:
                worker.receive(deadline, "the weight update", self.config.sync_timeout_s)
            except RolloutWorkerDied as failure:
                died[index] = failure
            except RolloutWorkerTimeout as failure:
                worker.abandon()
                silent[index] = failure
            except RolloutWorkerError:  # it answered (with a Failure): alive and in step
                pass
        if died or silent:
            return _SyncFailed({**died, **silent})
        return RolloutWorkerError("the weight-sync group", f"broadcast failed: {error}")


def _shards(num_prompts: int, num_workers: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) prompt ranges, sizes differing by at most one; empty ranges left out."""
    base, extra = divmod(num_prompts, num_workers)
    bounds, start = [], 0
    for index in range(num_workers):
        end = start + base + (1 if index < extra else 0)
        if end > start:
            bounds.append((start, end))
        start = end
    return bounds


def _first_slots(plan: list[Bucket]) -> list[int]:
    """Index of each bucket's first tensor in the flat, ordered list of tensors."""
    firsts, count = [], 0
    for bucket in plan:
        firsts.append(count)
        count += len(bucket.slots)
    return firsts


def _parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"worker address {address!r}: expected host:port")
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback


def _kill_all(processes: Iterable[WorkerProcess]) -> None:
    for process in list(processes):
        process.kill()
