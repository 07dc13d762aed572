"""Expert parallelism and FSDP2 (policy/parallelize.py) on 2 and 4 CPU processes over gloo, against one process.

Every rank builds the same seeded model, computes the one-process reference on the
global batch itself, runs its share under the parallel layout and compares; a
failed comparison raises in that rank, and the test fails with its traceback.
The ranks are forked from a forkserver that imported torch and the model once.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from r1kit.policy import DeepseekV3ForCausalLM, preset_config
from r1kit.policy.modeling import DeepseekV3CausalLMOutput
from r1kit.policy.moe import MoE
from r1kit.policy.parallelize import (
    ExpertParallelExperts,
    arrival_experts,
    build_mesh,
    clip_grad_norm_,
    data_parallel_mesh,
    parallelize,
)
from tests import gloo_ranks
from tests.policy.conftest import randomize

PRELOAD = ["r1kit.policy.parallelize", __name__]


def run_ranks(fn: Callable[..., None], world: int, tmp_path: Path, *args: object) -> None:
    gloo_ranks.run_ranks(fn, world, tmp_path, *args, preload=PRELOAD, timeout_s=120)


def summed(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over all ranks of a plain tensor."""
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a plain tensor as it is)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """Equal to 1e-5 (fp32), naming the tensor when not."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=lambda message: f"{name}: {message}")


def test_arrival_experts_lists_received_rows_by_source_rank_then_expert() -> None:
    received = torch.tensor([[2, 0, 1], [0, 0, 0], [1, 3, 0]])  # (ranks, local experts)
    assert arrival_experts(received).tolist() == [0, 0, 2, 0, 1, 1, 1]
    assert arrival_experts(torch.zeros(2, 3, dtype=torch.long)).numel() == 0


# ---- one MoE layer: expert parallel alone (experts split over all ranks), gradients summed by hand ----

ROWS = {2: (3, 1), 4: (2, 1, 3, 1)}  # rows of the global batch on each rank: uneven
SEQ = 5


def moe_layer_matches(rank: int, world: int, replayed: bool) -> None:
    config = preset_config("tiny-debug", seq_balance_alpha=0.1)
    torch.manual_seed(0)
    reference = MoE(config).train()
    randomize(reference)
    layer = copy.deepcopy(reference)
    layer.experts = ExpertParallelExperts(layer.experts, init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)))

    rows, top_k = ROWS[world], config.num_experts_per_tok
    total = sum(rows)
    x = torch.randn(total, SEQ, config.hidden_size)
    weight = torch.randn(total, SEQ, config.hidden_size)
    # replayed: every token to experts 0 and 1, both on rank 0; the other ranks receive no row at all
    replay = torch.tensor([0, 1]).expand(total, SEQ, top_k) if replayed else None

    reference_x = x.clone().requires_grad_()
    expected = reference(reference_x, replay=replay)
    ((expected.hidden * weight).sum() + expected.aux_loss).backward()

    mine = slice(sum(rows[:rank]), sum(rows[: rank + 1]))
    local_x = x[mine].clone().requires_grad_()
    out = layer(local_x, replay=None if replay is None else replay[mine])
    aux_share = out.aux_loss * rows[rank] / total  # the balance loss averages over the global batch's sequences
    ((out.hidden * weight[mine]).sum() + aux_share).backward()

    assert_close(out.hidden, expected.hidden[mine])
    assert_close(local_x.grad, reference_x.grad[mine])
    assert_close(summed(aux_share), expected.aux_loss.detach())
    assert torch.equal(summed(out.load), expected.load)
    if replayed:
        assert expected.load[2:].sum() == 0
    for (name, parameter), (reference_name, expected_parameter) in zip(
        layer.named_parameters(), reference.named_parameters(), strict=True
    ):
        assert name == reference_name
        # an expert's owner holds the sum over every rank's tokens; replicated weights are summed here
        grad = parameter.grad.full_tensor() if isinstance(parameter, DTensor) else summed(parameter.grad)
        assert_close(grad, expected_parameter.grad, name)


@pytest.mark.parametrize("replayed", [False, True], ids=["routed", "replayed-to-rank-0"])
@pytest.mark.parametrize("world", [2, 4])
def test_an_expert_parallel_moe_layer_matches_one_process(tmp_path: Path, world: int, replayed: bool) -> None:
    run_ranks(moe_layer_matches, world, tmp_path, replayed)


# ---- one training step of the whole model under parallelize (FSDP2 + EP) ----

BATCH, TOKENS, MAX_NORM, LR = 4, 12, 1.0, 1e-3


class CallerRoot(nn.Module):
    """A caller's module around the policy, the FSDP2 root in place of the policy (`shard_root=False`)."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> DeepseekV3CausalLMOutput:
        return self.policy(input_ids, labels=labels)


def training_step_matches(rank: int, world: int, ep: int, caller_root: bool) -> None:
    config = preset_config("tiny-debug", seq_balance_alpha=0.01, router_bias_update_speed=0.01)
    torch.manual_seed(0)
    reference = DeepseekV3ForCausalLM(config).train()
    randomize(reference)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config).train()
    batch = torch.randint(0, config.vocab_size, (BATCH, TOKENS))
    initial = copy.deepcopy(reference.state_dict())

    expected = reference(batch, labels=batch)
    expected.loss.backward()
    expected_grads = {name: p.grad.clone() for name, p in reference.named_parameters()}
    expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM)
    expected_clipped = {name: p.grad.clone() for name, p in reference.named_parameters()}
    torch.optim.AdamW(reference.parameters(), lr=LR).step()
    expected_load = reference.update_routing_bias()

    # the meta-device flow: shard, allocate this rank's shards, then load the full weights into them
    mesh = build_mesh(ep) if ep > 1 else init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    parallelize(model, mesh, shard_root=not caller_root)
    step = CallerRoot(model) if caller_root else model
    if caller_root:
        fully_shard(step, mesh=data_parallel_mesh(mesh))
    model.to_empty(device="cpu")
    model.init_buffers()
    set_model_state_dict(model, initial, options=StateDictOptions(full_state_dict=True))
    share = BATCH // world
    mine = batch[rank * share : (rank + 1) * share]
    out = step(mine, labels=mine)
    out.loss.backward()
    assert_close(summed(out.loss) / world, expected.loss.detach())
    for name, parameter in model.named_parameters():
        assert_close(full(parameter.grad), expected_grads[name], name)
    assert_close(clip_grad_norm_(model.parameters(), MAX_NORM), expected_norm)
    assert expected_norm > MAX_NORM  # the gradients were scaled
    for name, parameter in model.named_parameters():
        assert_close(full(parameter.grad), expected_clipped[name], name)
    torch.optim.AdamW(model.parameters(), lr=LR).step()
    load = model.update_routing_bias(summed(model.routing_load()))

    assert torch.equal(load, expected_load)
    expected_parameters = dict(reference.named_parameters())
    for name, parameter in model.named_parameters():
        assert_close(full(parameter.detach()), expected_parameters[name].detach(), name)
    for router, expected_router in zip(model.routers(), reference.routers(), strict=True):
        assert torch.equal(router.e_score_correction_bias, expected_router.e_score_correction_bias)


@pytest.mark.parametrize(
    ("world", "ep", "caller_root"),
    [(2, 1, False), (2, 2, False), (4, 4, False), (4, 2, True)],
    ids=["2-ranks-fsdp", "2-ranks-ep2", "4-ranks-ep4", "4-ranks-ep2-caller-root"],
)
def test_a_training_step_under_parallelize_matches_one_process(
    tmp_path: Path, world: int, ep: int, caller_root: bool
) -> None:
    run_ranks(training_step_matches, world, tmp_path, ep, caller_root)
