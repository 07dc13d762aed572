"""Expert parallelism (EP) and FSDP2 for the DeepSeek-V3 policy, torchtitan's layout, beside the model.

Mesh. Every rank is data-parallel: it trains on its own share of the global
batch. `build_mesh(ep)` lays the W ranks out as a 2-D mesh (W / ep, ep) named
("edp", "ep"), which `parallelize` flattens into "dp" (torchtitan's
dp_shard_mod_ep, ep and dp_shard). Rank r sits at edp = r // ep, ep = r % ep.

    "dp"   all W ranks       non-expert weights are FSDP-sharded over it (Shard(0))
    "ep"   ep ranks          the routed experts are split over it: EP rank j holds
                             the contiguous block [j E/ep, (j+1) E/ep), Shard(0)
    "edp"  W / ep ranks      the ranks holding the same experts (same ep
                             coordinate); the experts' blocks are FSDP-sharded over it

A 1-D mesh (or ep = 1) means FSDP alone: the experts are sharded with the rest of
their decoder layer.

Expert parallel forward (`ExpertParallelExperts.expert_ffn`, the seam
`RoutedExperts.forward` calls between sorting the (token, expert) pairs by
expert and the gate-weighted combine, which stay as they are):

    counts (E,) -> (ep, E/ep)        rows for each EP rank's experts, contiguous once sorted
    all_to_all(counts)               (ep, E/ep): rows each rank sends to my experts
    all_to_all(rows), (scales)       uneven splits; some may be empty
    local grouped GEMMs              received rows re-sorted by local expert (`ExpertLayout`)
    all_to_all(out) back             reverse splits; the caller un-sorts and sums over k

The row all-to-alls are an autograd Function whose backward is the reverse
all-to-all, so input, gate and expert gradients flow across ranks.

Expert weights are DTensors `Shard(0)` over "ep" (global shape (E, 2I, H), as in
the checkpoint; the forward runs on `to_local()`). FSDP2 composes with that:
`fully_shard(experts, mesh=mesh["edp"])` shards each rank's block over "edp"
(placements (_StridedShard(0), Shard(0)) on the (edp, ep) mesh), so expert state
per rank is 1/W of the experts' like every other weight's, and `full_tensor()` and
`torch.distributed.checkpoint.state_dict` see the global (E, ...) tensors under the
single-device names. torch's `clip_grad_norm_` refuses gradients on two meshes
(experts' (edp, ep), the rest "dp"); use this module's `clip_grad_norm_`.

Gradients. FSDP averages non-expert gradients over "dp": when every rank's loss is
a mean over an equal share of the batch (as many target tokens and sequences per
rank, as with DDP), that is the gradient of one process's loss on the global
batch. An expert's gradient on its owner already sums the
contributions of every token sent to it by the ep ranks of its "ep" group; FSDP's
reduce over "edp" adds the other groups, and dividing that sum by W (not by
|edp|, `set_gradient_divide_factor`) gives the same mean over the global batch.

Routing statistics. The router stays replicated: every rank routes its own tokens
over all E experts, so `routing_load()` counts this rank's tokens per expert and
a sum over "dp" is the global count. The bias (an fp32 buffer, never sharded) is
identical on all ranks as long as they start from the same weights and each
applies `update_routing_bias` with the same summed load.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from r1kit.policy.modeling import DeepseekV3ForCausalLM
from r1kit.policy.moe import ExpertLayout, MoE, RoutedExperts

MESH_DIMS = ("edp", "ep")
FLAT_DIM = "dp"


def build_mesh(ep: int, device_type: str = "cpu") -> DeviceMesh:
    """The (W / ep, ep) mesh named ("edp", "ep") over the default process group (W ranks)."""
    world = dist.get_world_size()
    if ep < 1 or world % ep:
        raise ValueError(f"ep={ep} must divide the world size {world}")
    return init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=MESH_DIMS)


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` with uneven splits; the gradient goes back with the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], receive: list[int], group: dist.ProcessGroup) -> torch.Tensor:
        ctx.send, ctx.receive, ctx.group = send, receive, group
        out = x.new_empty(sum(receive), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), receive, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        out = grad.new_empty(sum(ctx.send), *grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.receive, group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, send: list[int], receive: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """x (sum(send), ...): send[j] rows to rank j -> (sum(receive), ...): receive[j] rows from rank j, by rank."""
    return _AllToAll.apply(x, send, receive, group)


def arrival_experts(received: torch.Tensor) -> torch.Tensor:
    """received (ep, E_local): rows from each rank for each local expert -> (sum,) the local expert of every
    received row, in arrival order (by source rank, then expert).

    >>> arrival_experts(torch.tensor([[1, 0], [2, 1]])).tolist()
    [0, 0, 0, 1]
    """
    ranks, local_experts = received.shape
    experts = torch.arange(local_experts, device=received.device).repeat(ranks)  # (ep * E_local,)
    return experts.repeat_interleave(received.flatten())


def expert_shard(weight: torch.Tensor, ep_mesh: DeviceMesh) -> nn.Parameter:
    """weight (E, ...) identical on every rank (or on the meta device) -> its `Shard(0)` DTensor over `ep_mesh`,
    holding a copy of this rank's contiguous block of E / ep experts (the full tensor can then be freed)."""
    ep, rank = ep_mesh.size(), ep_mesh.get_local_rank()
    if weight.shape[0] % ep:
        raise ValueError(f"{weight.shape[0]} experts do not split over {ep} expert-parallel ranks")
    block = weight.shape[0] // ep
    local = weight.detach()[rank * block : (rank + 1) * block].clone()
    return nn.Parameter(DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False))


class ExpertParallelExperts(RoutedExperts):
    """`RoutedExperts` whose experts are split over the ranks of `ep_mesh`; rows travel to their expert's rank.

    Built from the single-device module, keeping its parameter names (state dict keys
    are unchanged) and FP8 recipe; the weights become `Shard(0)` DTensors over `ep_mesh`.
    """

    def __init__(self, experts: RoutedExperts, ep_mesh: DeviceMesh) -> None:
        nn.Module.__init__(self)  # the single-device module's attributes, without allocating its full weights
        self.num_experts = experts.num_experts
        self.act_fn = experts.act_fn
        self.fp8 = experts.fp8
        self.ep_mesh = ep_mesh
        self.gate_up_proj = expert_shard(experts.gate_up_proj, ep_mesh)
        self.down_proj = expert_shard(experts.down_proj, ep_mesh)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ep={self.ep_mesh.size()}"

    def expert_ffn(
        self,
        rows: torch.Tensor,
        scale: torch.Tensor,
        layout: ExpertLayout,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
    ) -> torch.Tensor:
        """rows (M, hidden) and scale (M, 1) sorted by global expert -> (M, hidden) outputs in the same order.

        gate_up_proj (E, 2I, hidden) and down_proj (E, hidden, I) are the `Shard(0)` DTensors; each rank
        runs only its own experts, on the rows every rank of the EP group sends it.
        """
        group = self.ep_mesh.get_group()
        send_counts = layout.counts.view(self.ep_mesh.size(), -1)  # (ep, E_local): rows for each rank's experts
        receive_counts = torch.empty_like(send_counts)  # (ep, E_local): rows from each rank for my experts
        dist.all_to_all_single(receive_counts, send_counts, group=group)
        send, receive = send_counts.sum(dim=1).tolist(), receive_counts.sum(dim=1).tolist()
        received = all_to_all(rows, send, receive, group)  # (R, hidden) by source rank, then local expert
        received_scale = all_to_all(scale, send, receive, group)  # (R, 1)
        local = ExpertLayout.from_topk(arrival_experts(receive_counts).unsqueeze(1), receive_counts.shape[1])
        out = super().expert_ffn(
            received[local.token_index],
            received_scale[local.token_index],
            local,
            gate_up_proj.to_local(),
            down_proj.to_local(),
        )  # (R, hidden) sorted by local expert
        return all_to_all(out[local.inverse], receive, send, group)


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for gradients on several meshes; returns the global norm, a plain scalar.

    After `parallelize` the expert gradients are DTensors over the (edp, ep) mesh and the
    others over "dp"; DTensor ops refuse to mix meshes, so the norm is taken mesh by mesh
    (each reduced over its mesh with `full_tensor`), combined, and every gradient is
    scaled by min(1, max_norm / (norm + 1e-6)) as torch does.
    """
    by_mesh: dict[DeviceMesh | None, list[nn.Parameter]] = {}
    for parameter in parameters:
        if parameter.grad is not None:
            mesh = parameter.grad.device_mesh if isinstance(parameter.grad, DTensor) else None
            by_mesh.setdefault(mesh, []).append(parameter)
    norms = [_full(get_total_norm([p.grad for p in group], norm_type)) for group in by_mesh.values()]
    total = get_total_norm(norms, norm_type)
    for group in by_mesh.values():
        clip_grads_with_norm_(group, max_norm, total)
    return total


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def apply_expert_parallel(
    model: DeepseekV3ForCausalLM, edp_mesh: DeviceMesh, ep_mesh: DeviceMesh, dp_size: int
) -> None:
    """Splits every MoE layer's routed experts over `ep_mesh`, each block FSDP-sharded over `edp_mesh`.

    FSDP sums the expert gradients over "edp" and divides by `dp_size` (all data-parallel
    ranks), not by |edp|: each owner's gradient already sums its "ep" group's tokens.
    The experts are their own FSDP unit even when |edp| = 1: the decoder layer's unit
    over "dp" cannot take DTensors on a mesh that overlaps it.
    """
    for moe in [module for module in model.modules() if isinstance(module, MoE)]:  # decoder's, then MTP's
        moe.experts = ExpertParallelExperts(moe.experts, ep_mesh)
        fully_shard(moe.experts, mesh=edp_mesh)
        moe.experts.set_gradient_divide_factor(dp_size)
        # sum, then divide (gloo has no PREMUL_SUM); not on one rank, where torch 2.13 skips the
        # collective, divides, and with forced sums would divide a second time
        moe.experts.set_force_sum_reduction_for_comms(edp_mesh.size() > 1)


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D mesh of all data-parallel ranks: a 1-D `mesh` itself, else the flattening "dp" of `build_mesh`'s.

    A collective on first call for a 2-D mesh (it creates the process group of "dp").
    """
    if mesh.ndim == 1:
        return mesh
    if mesh.mesh_dim_names != MESH_DIMS:
        raise ValueError(f"want a 1-D mesh or one with the dims {MESH_DIMS} (build_mesh), got {mesh}")
    return mesh._flatten(FLAT_DIM)


def parallelize(model: DeepseekV3ForCausalLM, mesh: DeviceMesh, *, shard_root: bool = True) -> DeepseekV3ForCausalLM:
    """Applies expert parallelism and FSDP2 to `model` in place and returns it.

    mesh: from `build_mesh(ep)` (FSDP over "dp", experts split over "ep" and sharded over
    "edp"), or any 1-D mesh (FSDP alone). Every rank must hold the same weights (or the
    model on the meta device, then `to_empty`, `init_buffers` and loading after this call).
    Units: the routed experts of each MoE layer (over "edp", gradients divided by W),
    each decoder layer (the MTP modules' blocks included), and the root: embedding, final
    norm, head and the MTP modules' own norms and projection (`mtp_loss` calls the MTP
    norm outside the module's forward, so it must stay unsharded for the root's forward).
    shard_root=False leaves the root to the caller: a trainer that calls the model's pieces
    from its own module's forward shards that module instead, over `data_parallel_mesh(mesh)`.
    """
    dp_mesh = data_parallel_mesh(mesh)
    if mesh.ndim == 2 and mesh["ep"].size() > 1:
        apply_expert_parallel(model, mesh["edp"], mesh["ep"], dp_mesh.size())
    for block in (*model.model.layers, *(module.block for module in model.mtp)):
        fully_shard(block, mesh=dp_mesh)
    if shard_root:
        fully_shard(model, mesh=dp_mesh)
    return model


__all__ = [
    "ExpertParallelExperts",
    "all_to_all",
    "apply_expert_parallel",
    "build_mesh",
    "clip_grad_norm_",
    "data_parallel_mesh",
    "parallelize",
]
