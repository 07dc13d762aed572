"""Run a function on several CPU processes joined in one gloo group, forked from a forkserver that imported
torch (and the caller's modules) once; a rank's failure fails the test with its traceback."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

PRELOAD = ("torch", "torch.distributed.fsdp", "torch.distributed.tensor", "r1kit.policy")


def forkserver(preload: Sequence[str] = ()) -> multiprocessing.context.ForkServerContext:
    """The forkserver context, its server importing torch, r1kit.policy and `preload` before any fork."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([*PRELOAD, *preload])
    return context


def _rank_main(rank: int, fn: Callable[..., None], world: int, init_file: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., None],
    world: int,
    tmp_path: Path,
    *args: object,
    preload: Sequence[str] = (),
    timeout_s: float = 180,
) -> None:
    """Runs fn(rank, world, *args) in `world` processes (fn and args must pickle: define fn at module level
    and name its module in `preload`)."""
    forkserver(preload)
    context = torch.multiprocessing.start_processes(
        _rank_main, (fn, world, str(tmp_path / "rendezvous"), args), nprocs=world, join=False,
        start_method="forkserver",
    )  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world} ranks did not finish within {timeout_s}s")
