"""What the trainer needs from a policy sharded with FSDP2, with or without expert parallelism.

A sharded policy (`r1kit.policy.parallelize`, or any model under torch's
`fully_shard`) holds DTensor parameters: each rank keeps its slices and FSDP2
all-gathers a block's weights for its forward and reduce-scatters (averages)
its gradients. Such a model is not wrapped again by accelerate; the trainer
uses these instead:

- `is_sharded`: whether a module holds DTensor parameters;
- `shard_root`: the trainer's log-prob module becomes the FSDP2 root unit,
  around whose forward the parameters no block holds (embedding, final norm,
  output head, MTP projections) are gathered: that forward calls them piece by
  piece, never through the policy's own forward;
- `gradient_sync`: FSDP2's switch for accumulating micro-batches without
  reduce-scattering until the last;
- `full_tensors`: the full weights one tensor at a time, for the engine and
  for export, so that no rank ever materialises the whole state dict at once.

Every function here is a collective where it says so: every rank calls it in the same order.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of `module` is a DTensor (FSDP2 or expert parallelism)."""
    return any(isinstance(parameter, DTensor) for parameter in module.parameters())


def shard_root(module: nn.Module, policy: nn.Module) -> None:
    """`fully_shard` `module` (which calls `policy`'s pieces) on the mesh of `policy`'s sharded blocks.

    `policy` must not be an FSDP2 root itself: its root hooks run only around its own forward.
    """
    if isinstance(policy, FSDPModule):
        raise ValueError(
            "the policy is sharded at its root, whose parameters FSDP2 gathers only around policy.forward; the "
            "trainer calls decoder, head and MTP modules directly: shard it with parallelize(policy, mesh, "
            "shard_root=False) and the trainer roots its own forward"
        )
    mesh = next(p.device_mesh for p in policy.parameters() if isinstance(p, DTensor))
    fully_shard(module, mesh=mesh)  # its class becomes FSDP<class>
    # FSDP2 warns once per process that the module returns views (sliced log-prob grids), since an in-place op
    # on them would skip its pre-backward hook; the trainer only ever reads them out of place
    warnings.filterwarnings("ignore", f"FSDP2-wrapped module \\({type(module).__name__}\\) returned a view")


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Backward inside reduce-scatters gradients only when `enabled` (every FSDP2 block of `module`)."""
    blocks = [block for block in module.modules() if hasattr(block, "set_requires_gradient_sync")]
    for block in blocks:
        block.set_requires_gradient_sync(enabled, recurse=False)
    try:
        yield
    finally:
        for block in blocks:
            block.set_requires_gradient_sync(True, recurse=False)


def full_tensors(module: nn.Module, device: torch.device | str = "cpu") -> Iterator[tuple[str, Tensor]]:
    """(name, full tensor on `device`) for every entry of `module.state_dict()`, one at a time.

    A collective: every rank iterates to the end; DTensors are all-gathered as they come.
    """
    for name, tensor in module.state_dict().items():
        with _quiet_strided_gather():
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        yield name, full.detach().to(device)


@contextlib.contextmanager
def _quiet_strided_gather() -> Iterator[None]:
    """Gathering an expert weight sharded over "ep" and then "edp" takes two all-gathers, which torch logs as
    a warning on every rank about reduction order; an all-gather reduces nothing."""
    logger = logging.getLogger("torch.distributed.tensor._redistribute")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
