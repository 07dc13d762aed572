"""Padding-free micro-batches: the packing plan, and packed forwards equal to padded ones, gradients included.

Every equivalence test checks that rows really hold several sequences (fewer
token slots than the padded layout), so attention or routing across a sequence
boundary, or anything riding along at the wrong offset, would change the result.
"""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from r1kit.grpo.batch import PolicyBatch, build_policy_batch
from r1kit.grpo.logprobs import (
    TokenLogprobModel,
    TokenLogprobs,
    packed_rows_attention,
    shared_prefix_mask,
    takes_shared_prefix_mask,
)
from r1kit.grpo.packing import best_fit_decreasing, plan_packing, row_capacity, same_prompt_groups
from r1kit.policy import DeepseekV3ForCausalLM, preset_config
from r1kit.rollout.engine import RolloutBatch
from r1kit.rollout.token_sets import TokenSets
from tests.policy.conftest import randomize

PROMPT_LENGTHS = [3, 7, 5, 2, 6, 4, 7]
COMPLETION_LENGTHS = [1, 9, 4, 6, 2, 8, 3]  # a length-1 completion; the longest sets T


# ----------------------------------------------------------------------------- the plan


def random_lengths(seed: int, n: int = 40) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    return [rng.randint(1, 30) for _ in range(n)], [rng.randint(0, 50) for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_every_token_is_placed_once_within_its_rows_capacity_and_positions_restart(seed):
    prompts, completions = random_lengths(seed)
    width_p, width_t = max(prompts), max(completions)
    plan = plan_packing(prompts, completions, width_p, width_t)
    lengths = [p + c for p, c in zip(prompts, completions, strict=True)]
    assert max(lengths) <= plan.capacity <= 2 * max(lengths)
    assert plan.packed_index.unique().numel() == plan.packed_index.numel() == sum(lengths)
    assert plan.padded_index.unique().numel() == sum(lengths)
    assert plan.rows * plan.capacity < len(lengths) * (width_p + width_t)  # padding was removed

    # each sequence's tokens, tagged by (sequence, index in the sequence), land in order in one row
    width = width_p + width_t
    tags = torch.full((len(lengths), width), -1)
    for i, (p, length) in enumerate(zip(prompts, lengths, strict=True)):
        tags[i, width_p - p : width_p - p + length] = i * 1000 + torch.arange(length)
    packed = plan.pack(tags, -1)  # (R, C)
    rows_of = {}
    for r, row in enumerate(packed.tolist()):
        for column, tag in enumerate(row):
            if tag >= 0:
                sequence, index = divmod(tag, 1000)
                rows_of.setdefault(sequence, set()).add(r)
                assert plan.position_ids[r, column] == index  # positions restart at 0 for every sequence
    assert all(len(rows) == 1 for rows in rows_of.values()) and len(rows_of) == len(lengths)
    assert plan.attention_mask.equal((packed >= 0).long())
    # the padding after a row's sequences is a block of its own: positions 0, 1, ...
    for r in range(plan.rows):
        fill = int(plan.attention_mask[r].sum())
        assert plan.position_ids[r, fill:].tolist() == list(range(plan.capacity - fill))


def test_completion_tokens_are_scored_from_the_token_before_them():
    prompts, completions = random_lengths(7, n=12)
    width_p, width_t = max(prompts), max(completions)
    ids = torch.randint(0, 10_000, (len(prompts), width_p + width_t))
    plan = plan_packing(prompts, completions, width_p, width_t)
    packed = plan.pack(ids, -1).view(-1)
    grid = plan.unpack_completions(packed[plan.score_index + 1].float())  # (n, T)
    previous = plan.unpack_completions(packed[plan.score_index].float())
    for i, c in enumerate(completions):
        assert grid[i, :c].tolist() == ids[i, width_p : width_p + c].float().tolist()
        assert previous[i, :c].tolist() == ids[i, width_p - 1 : width_p + c - 1].float().tolist()
        assert not grid[i, c:].any()  # zeros on padding


def test_row_capacity_has_the_fewest_token_slots_among_its_candidates():
    for seed in range(5):
        lengths = [p + c for p, c in zip(*random_lengths(seed), strict=True)]
        longest = max(lengths)
        slots = {
            capacity: len(best_fit_decreasing(lengths, capacity)) * capacity
            for capacity in (longest + longest * k // 8 for k in range(9))
        }
        assert slots[row_capacity(lengths)] == min(slots.values())
        assert min(slots.values()) < slots[longest]  # rows of exactly the longest sequence waste more here
    assert row_capacity([5, 5, 5]) == 5  # nothing packs better: the shortest rows


def test_plans_refuse_what_they_cannot_lay_out():
    with pytest.raises(ValueError, match="shorter than the longest sequence"):
        plan_packing([3, 2], [4, 1], 3, 4, capacity=6)
    with pytest.raises(ValueError, match=r"prompt lengths must lie in 1\.\.3"):
        plan_packing([0, 2], [4, 1], 3, 4)
    with pytest.raises(ValueError, match=r"prompt group \[0, 1\] holds prompts of different lengths"):
        plan_packing([3, 2], [4, 1], 3, 4, prompt_groups=[[0, 1]])
    with pytest.raises(ValueError, match="sequence 1 is in more than one prompt group"):
        plan_packing([2, 2, 2], [4, 1, 1], 3, 4, prompt_groups=[[0, 1], [1, 2]])


@pytest.mark.parametrize("unit_limit", [10_000, 60, 1])
def test_grouped_sequences_place_their_prompt_once_per_unit_and_score_from_it(unit_limit):
    """Groups of 4 sequences with one prompt each: the prompt placed once per unit, every completion token
    at its position in its sequence and scored from the token before it there (the prompt's last for the
    first); a group longer than unit_limit is cut, a sequence without completion tokens stays alone."""
    rng = random.Random(3)
    groups = [list(range(start, start + 4)) for start in range(0, 24, 4)]
    prompts = [length for _ in groups for length in [rng.randint(1, 12)] * 4]
    completions = [rng.randint(0 if i % 7 == 0 else 1, 20) for i in range(24)]
    width_p, width_t = max(prompts), max(completions)
    ids = torch.randint(0, 10_000, (24, width_p + width_t))
    for group in groups:  # the group's prompt tokens are the same
        ids[group, :width_p] = ids[group[0], :width_p]
    plan = plan_packing(prompts, completions, width_p, width_t, prompt_groups=groups, unit_limit=unit_limit)
    assert plan.packed_index.unique().numel() == plan.packed_index.numel()
    width = width_p + width_t
    tags = torch.arange(24)[:, None] * 1000 + torch.arange(width) - (width_p - torch.tensor(prompts))[:, None]
    placed = [tag for tag in plan.pack(tags, -1).view(-1).tolist() if tag >= 0]
    leaders = {tag // 1000 for tag in placed if tag % 1000 < prompts[tag // 1000]}  # sequences placing a prompt
    assert len(placed) == sum(completions) + sum(prompts[s] for s in leaders)
    whole_groups = 6 + sum(c == 0 for c in completions)  # a sequence without completion tokens stays alone
    expected_units = {10_000: whole_groups, 1: 24}  # at most unit_limit tokens, at least one sequence a unit
    if unit_limit in expected_units:
        assert len(leaders) == expected_units[unit_limit]
    else:
        assert whole_groups < len(leaders) < 24
    packed = plan.pack(ids, -1).view(-1)
    positions = plan.position_ids.view(-1)
    scored_from = plan.unpack_completions(packed[plan.score_index].float())
    for i, c in enumerate(completions):
        assert scored_from[i, :c].tolist() == ids[i, width_p - 1 : width_p + c - 1].float().tolist()
    grid_positions = plan.unpack_completions(positions[plan.score_index].float() + 1)
    for i, c in enumerate(completions):
        assert grid_positions[i, :c].tolist() == [float(prompts[i] + j) for j in range(c)]


# ----------------------------------------------------------------------------- forwards


def rollout_batch(
    vocab_size: int, generator: torch.Generator, routing_shape: tuple[int, int, int] | None = None
) -> PolicyBatch:
    """A padded PolicyBatch of PROMPT_LENGTHS x COMPLETION_LENGTHS random tokens, with kept sets that hold
    the sampled token (every other position restricted) and, given (layers, experts, K), recorded routing
    with every third token left to the router (-1)."""
    prompts = [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]
    completions = [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in COMPLETION_LENGTHS]
    kept = []
    for completion in completions:
        mask = torch.rand(len(completion), vocab_size, generator=generator) < 0.5
        mask[torch.arange(len(completion)), torch.tensor(completion)] = True
        mask[1::2] = True
        kept.append(TokenSets.from_mask(mask))
    routing = None
    if routing_shape is not None:
        layers, experts, top_k = routing_shape
        routing = []
        for p, c in zip(PROMPT_LENGTHS, COMPLETION_LENGTHS, strict=True):
            tokens = layers * (p + c - 1)
            chosen = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
            chosen = chosen.view(layers, p + c - 1, top_k).to(torch.int16)
            chosen[:, ::3] = -1
            routing.append(chosen)
    rollout = RolloutBatch(
        prompt_ids=prompts,
        completion_ids=completions,
        completion_text=[""] * len(prompts),
        sampler_logprobs=[torch.zeros(n) for n in COMPLETION_LENGTHS],
        finish_reason=["stop"] * len(prompts),
        policy_version=0,
        routed_experts=routing,
        kept_tokens=kept,
    )
    return build_policy_batch(rollout, pad_token_id=0)


def forward_and_backward(
    model: torch.nn.Module,
    batch: PolicyBatch,
    padding_free: bool | TokenLogprobModel,
    with_mtp: bool = False,
    token_mean: bool = False,
):
    """(TokenLogprobs, gradients) of -sum logp (token_mean: -mean logp, as GRPO's losses scale it) + aux_loss
    + mtp_loss over the batch; padding_free may come as the wrapper of `model` to use."""
    wrapper = padding_free
    if not isinstance(wrapper, TokenLogprobModel):
        wrapper = TokenLogprobModel(model, padding_free=padding_free, temperature=0.8)
    model.zero_grad(set_to_none=True)
    out = wrapper(
        batch.input_ids,
        batch.attention_mask,
        batch.position_ids,
        batch.prompt_length,
        completion_mask=batch.completion_mask,
        with_mtp=with_mtp,
        routed_experts=batch.routed_experts,
        kept_tokens=batch.kept_tokens,
    )
    loss = -(out.logp * batch.completion_mask).sum()
    if token_mean:
        loss = loss / batch.completion_mask.sum()
    for auxiliary in (out.aux_loss, out.mtp_loss):
        if auxiliary is not None:
            loss = loss + auxiliary
    loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same(packed: TokenLogprobs, padded: TokenLogprobs, packed_grads: dict, padded_grads: dict, batch):
    assert packed.token_slots < packed.padded_token_slots == padded.token_slots  # rows hold several sequences
    real = batch.completion_mask.bool()
    torch.testing.assert_close(packed.logp[real], padded.logp[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.entropy[real], padded.entropy[real], rtol=1e-5, atol=1e-5)
    assert not packed.logp[~real].any() and not packed.entropy[~real].any()  # zeros on padding
    assert packed_grads.keys() == padded_grads.keys() and packed_grads
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def training_moe_policy() -> tuple[DeepseekV3ForCausalLM, tuple[int, int, int]]:
    """The tiny-debug DeepSeek-V3, random weights, balance loss on (alpha 0.1), in training mode, and its
    routing's shape (MoE layers, routed experts, experts per token)."""
    config = preset_config("tiny-debug", seq_balance_alpha=0.1)
    model = DeepseekV3ForCausalLM(config)
    randomize(model)
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    return model.train(), (moe_layers, config.n_routed_experts, config.num_experts_per_tok)


def test_deepseek_v3_training_forward_is_the_padded_one():
    """Balance loss, MTP on completions, keep routing with some tokens routed live, kept sets: all equal."""
    model, routing = training_moe_policy()
    batch = rollout_batch(model.config.vocab_size, torch.Generator().manual_seed(0), routing)
    assert batch.kept_tokens.sizes.any() and (batch.routed_experts == -1).any()
    results = {}
    for padding_free in (False, True):
        twin = copy.deepcopy(model)
        out, grads = forward_and_backward(twin, batch, padding_free, with_mtp=True)
        load = torch.stack([router.expert_load for router in twin.routers()])  # decoder and MTP layers
        results[padding_free] = out, grads, load
    (padded, padded_grads, padded_load), (packed, packed_grads, packed_load) = results[False], results[True]
    assert_same(packed, padded, packed_grads, padded_grads, batch)
    torch.testing.assert_close(packed.aux_loss, padded.aux_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(packed.mtp_loss, padded.mtp_loss, rtol=1e-5, atol=1e-7)
    assert padded.aux_loss > 0 and padded.mtp_loss > 0
    assert packed_load.sum() > 0 and torch.equal(packed_load, padded_load)  # padding counted by neither


def grouped_rollout_batch(
    vocab_size: int, generator: torch.Generator, routing_shape: tuple[int, int, int], group_size: int = 3
) -> PolicyBatch:
    """`rollout_batch`'s batch with each prompt repeated for `group_size` completions, as GRPO samples them:
    the same prompt tokens and prompt routing, each completion its own (7 prompts x 3, completions 1-9)."""
    layers, experts, top_k = routing_shape
    prompts, completions, kept, routing = [], [], [], []
    for p in PROMPT_LENGTHS:
        prompt = torch.randint(3, vocab_size, (p,), generator=generator).tolist()
        prompt_routes = torch.rand(layers, p, experts, generator=generator).argsort(dim=-1)[..., :top_k]
        for _ in range(group_size):
            c = int(torch.randint(1, 10, (), generator=generator))
            prompts.append(prompt)
            completions.append(torch.randint(3, vocab_size, (c,), generator=generator).tolist())
            mask = torch.rand(c, vocab_size, generator=generator) < 0.5
            mask[torch.arange(c), torch.tensor(completions[-1])] = True
            kept.append(TokenSets.from_mask(mask))
            own = torch.rand(layers, c - 1, experts, generator=generator).argsort(dim=-1)[..., :top_k]
            chosen = torch.cat((prompt_routes, own), dim=1).to(torch.int16)
            chosen[:, 1::4] = -1
            routing.append(chosen)
    rollout = RolloutBatch(
        prompt_ids=prompts,
        completion_ids=completions,
        completion_text=[""] * len(prompts),
        sampler_logprobs=[torch.zeros(len(c)) for c in completions],
        finish_reason=["stop"] * len(prompts),
        policy_version=0,
        routed_experts=routing,
        kept_tokens=kept,
    )
    return build_policy_batch(rollout, pad_token_id=0)


@pytest.mark.parametrize("keep_routing", [False, True], ids=["routed-live", "keep-routing"])
def test_shared_prompts_give_the_padded_forward_with_each_prompt_computed_once(keep_routing):
    """A prompt's completions after one copy of it: log-probs, gradients, balance loss and loads as padded."""
    model, routing = training_moe_policy()
    batch = grouped_rollout_batch(model.config.vocab_size, torch.Generator().manual_seed(3), routing)
    if not keep_routing:
        batch = dataclasses.replace(batch, routed_experts=None)
    results = {}
    for layout in ("padded", "packed", "shared"):
        twin = copy.deepcopy(model)
        wrapper = TokenLogprobModel(twin, padding_free=layout != "padded", share_prompts=layout == "shared")
        out, grads = forward_and_backward(twin, batch, wrapper, token_mean=True)
        results[layout] = out, grads, torch.stack([router.expert_load for router in twin.routers()])
    (padded, padded_grads, padded_load), (shared, shared_grads, shared_load) = results["padded"], results["shared"]
    assert_same(shared, padded, shared_grads, padded_grads, batch)
    prompt_tokens = sum(PROMPT_LENGTHS)
    real_tokens = int(batch.attention_mask.sum())
    assert shared.token_slots < results["packed"][0].token_slots  # fewer slots than whole sequences need
    assert shared.token_slots >= real_tokens - 2 * prompt_tokens  # each prompt held once
    torch.testing.assert_close(shared.aux_loss, padded.aux_loss, rtol=1e-5, atol=1e-7)
    assert padded.aux_loss > 0
    torch.testing.assert_close(shared_load, padded_load)  # prompt tokens counted once per completion
    assert shared_load.sum() == padded_load.sum() > 0


def test_prompts_routed_differently_are_not_shared():
    ids = torch.tensor([[4, 5], [4, 5], [4, 5]])
    routes = torch.tensor([[[1], [2]], [[1], [3]], [[1], [2]]])  # (n, P, K)
    assert same_prompt_groups(ids, torch.ones_like(ids), routes) == [[0, 2]]
    assert same_prompt_groups(ids, torch.ones_like(ids)) == [[0, 1, 2]]


TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)  # fmt: skip


def tiny_llama(attention: str) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(**TINY, attn_implementation=attention))


def tiny_qwen2(use_sliding_window: bool) -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM(Qwen2Config(**TINY, use_sliding_window=use_sliding_window, sliding_window=3))


def tiny_mistral(window: int) -> MistralForCausalLM:
    return MistralForCausalLM(MistralConfig(**TINY, sliding_window=window))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize(
    "build",
    [lambda: tiny_llama("sdpa"), lambda: tiny_llama("eager"), lambda: tiny_mistral(window=3)],
    ids=["llama-sdpa", "llama-eager", "mistral-sliding-window"],
)
def test_transformers_models_forward_is_the_padded_one(build, lora):
    torch.manual_seed(0)
    model = build()
    if lora:
        from peft import LoraConfig, get_peft_model

        adapter = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(model, adapter)
    assert packed_rows_attention(model) == "positions"
    batch = rollout_batch(64, torch.Generator().manual_seed(1))
    padded, padded_grads = forward_and_backward(model, batch, padding_free=False)
    packed, packed_grads = forward_and_backward(model, batch, padding_free=True)
    assert_same(packed, padded, packed_grads, padded_grads, batch)
    assert not lora or all("lora" in name for name in packed_grads)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize(
    "build, shares",
    [(lambda: tiny_llama("sdpa"), True), (lambda: tiny_llama("eager"), True),
     (lambda: tiny_qwen2(use_sliding_window=False), True), (lambda: tiny_mistral(window=3), False)],
    ids=["llama-sdpa", "llama-eager", "qwen2-full-attention", "mistral-sliding-window"],
)  # fmt: skip
def test_transformers_models_share_prompts_with_the_padded_forward(build, shares, lora):
    """Full attention in every layer: each prompt once for its completions, under the mask built for the rows;
    a sliding window packs whole sequences. Log-probs and gradients are the padded ones either way."""
    torch.manual_seed(0)
    model = build()
    if lora:
        from peft import LoraConfig, get_peft_model

        adapter = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(model, adapter)
    assert takes_shared_prefix_mask(model) == shares
    batch = grouped_rollout_batch(64, torch.Generator().manual_seed(4), (1, 4, 2))
    batch = dataclasses.replace(batch, routed_experts=None)
    padded, padded_grads = forward_and_backward(model, batch, padding_free=False)
    whole = TokenLogprobModel(model, padding_free=True, temperature=0.8)
    shared = TokenLogprobModel(model, padding_free=True, share_prompts=True, temperature=0.8)
    packed, packed_grads = forward_and_backward(model, batch, shared)
    assert_same(packed, padded, packed_grads, padded_grads, batch)
    with torch.no_grad():
        whole_slots = whole(batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_length).token_slots
    assert (packed.token_slots < whole_slots) == shares  # the prompt copies saved


def test_the_shared_prefix_mask_follows_the_attention_implementation():
    """sdpa takes the boolean mask, eager the additive one: the same entries allowed."""
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    position_ids = torch.tensor([[0, 1, 2, 2, 3, 2, 0]])  # a prompt of 2, completions of 1, 2 and 1, padding
    allowed = shared_prefix_mask(tiny_llama("sdpa"), attention_mask, position_ids)
    additive = shared_prefix_mask(tiny_llama("eager"), attention_mask, position_ids)
    assert allowed.dtype == torch.bool and additive.dtype == torch.float32
    assert torch.equal(additive == 0, allowed)
    assert allowed[0, 0].long().tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 1],
    ]


def test_models_that_cannot_take_packed_rows_run_padded():
    """Linear-attention layers carry state across a row: such a model falls back to padded batches."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    config = Qwen3NextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
    )
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(config).eval()
    assert packed_rows_attention(model) is None
    assert packed_rows_attention(tiny_llama("flex_attention")) is None
    batch = rollout_batch(64, torch.Generator().manual_seed(2))
    inputs = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_length)
    with torch.no_grad():
        fallback = TokenLogprobModel(model, padding_free=True)(*inputs)
        padded = TokenLogprobModel(model)(*inputs)
    assert fallback.token_slots == fallback.padded_token_slots == batch.input_ids.numel()
    assert torch.equal(fallback.logp, padded.logp)


# ----------------------------------------------------------------------------- one GRPO update


def shortened(rollout: RolloutBatch, lengths: list[int]) -> RolloutBatch:
    """The rollout with completion i cut to lengths[i] tokens, its recorded routing and kept sets with it."""
    return dataclasses.replace(
        rollout,
        completion_ids=[ids[:n] for ids, n in zip(rollout.completion_ids, lengths, strict=True)],
        sampler_logprobs=[logp[:n] for logp, n in zip(rollout.sampler_logprobs, lengths, strict=True)],
        routed_experts=[
            routing[:, : len(prompt) + n - 1]
            for routing, prompt, n in zip(rollout.routed_experts, rollout.prompt_ids, lengths, strict=True)
        ],
        kept_tokens=[kept.slice(0, n) for kept, n in zip(rollout.kept_tokens, lengths, strict=True)],
    )


@pytest.mark.parametrize("mtp", [True, False], ids=["mtp-whole-sequences", "shared-prompts"])
def test_one_grpo_update_is_the_same_with_and_without_padding(make_trainer, mtp):
    """Reference and old log-probs, two micro-batches, two optimizer steps (mu = 2), keep routing and keep
    sampling mask, with the MTP loss (whole sequences packed) or without (each prompt once for its
    completions): losses, statistics and the updated weights agree."""
    settings = dict(
        beta=0.1,
        num_iterations=2,
        micro_batch_size=8,
        mtp_on_completions=mtp,
        keep_routing=True,
        keep_sampling_mask=True,
        top_k=12,
        max_completion_length=8,
        learning_rate=1e-2,
    )
    trainers = {flag: make_trainer(padding_free=flag, **settings) for flag in (False, True)}
    assert trainers[True].model.packing == "mask" and trainers[False].model.packing is None
    # Adam moves a coordinate by lr * g / (|g| + eps): with the default eps = 1e-8, gradients of ~1e-9
    # that differ by fp32 rounding (summed in another order) move their weights by visibly different
    # fractions of a step; eps = 1e-6 keeps such moves under a hundredth of one
    for trainer in trainers.values():
        for group in trainer.optimizer.param_groups:
            group["eps"] = 1e-6
    scored = trainers[False].collector.collect(0)
    rollout = shortened(scored.rollout, [1 + i % 8 for i in range(len(scored.rollout))])
    stats = {}
    for flag, trainer in trainers.items():
        batch = build_policy_batch(rollout, trainer.tokenizer.pad_token_id)
        stats[flag] = trainer.update(batch, scored.advantages)
    assert stats[True]["padding_free/padding_removed"] > 0.1 and stats[False]["padding_free/padding_removed"] == 0
    keys = ["loss", "grad_norm", "kl", "entropy", "ratio", "aux_loss", "mismatch/abs_logp_diff"] + ["mtp_loss"] * mtp
    for key in keys:
        assert stats[True][key] == pytest.approx(stats[False][key], rel=1e-5, abs=1e-6), key
    # weights agree to a hundredth of an Adam step
    step_size = settings["learning_rate"]
    start = dict(trainers[False].update.reference.model.named_parameters())
    packed = dict(trainers[True].policy.named_parameters())
    for name, padded in trainers[False].policy.named_parameters():
        torch.testing.assert_close(packed[name], padded, rtol=1e-5, atol=step_size / 100, msg=name)
    assert any(not torch.equal(packed[name], start[name]) for name in start)
    routers = [trainers[flag].policy.routers() for flag in (False, True)]
    for padded, packed in zip(*routers, strict=True):  # the decoder's and MTP's routing biases, updated twice
        assert torch.equal(packed.e_score_correction_bias, padded.e_score_correction_bias)
