"""The policy update of one GRPO step: log-probs, loss, gradients, optimizer.

Given a padded batch of completions and their advantages, `PolicyUpdate`:

1. computes reference log-probs (beta > 0) and, when the batch is reused
   (num_iterations > 1) or was sampled one step ago (overlap), the log-probs of
   the current weights before any update (pi_old, the proximal policy);
2. accumulates gradients of the GRPO loss over micro-batches, with normalisers
   of the whole batch so that the result equals one full-batch backward; adds
   the MoE balance loss and, optionally, the MTP loss on the completions;
3. corrects for the sampler (another process, engine or precision, or the
   previous step's weights) drawing tokens from a slightly different
   distribution than pi_old, with the importance correction named by
   `importance_correction` (grpo/importance.py; by default truncated weights
   min(pi_old / pi_sampler, cap) per token on the policy-gradient term) and,
   optionally, DeepSeek-V3.2's off-policy sequence mask (grpo/loss.py);
4. clips gradients, steps optimizer and scheduler, and updates the MoE routing
   biases once per optimizer step.

It always reports how far the sampler and the trainer disagree on the sampled
tokens (mean |logp_trainer - logp_sampler| and a k3 estimate of their KL).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from r1kit.grpo import distributed
from r1kit.grpo.adapters import is_peft_model
from r1kit.grpo.batch import PolicyBatch
from r1kit.grpo.config import GRPOConfig
from r1kit.grpo.importance import IS_CORRECTIONS
from r1kit.grpo.loss import grpo_loss, k3_kl, masked_mean
from r1kit.grpo.metrics import timed
from r1kit.policy.parallelize import clip_grad_norm_


class PolicyUpdate:
    """Optimizer steps on GRPO batches for a `TokenLogprobModel` prepared by accelerate."""

    def __init__(
        self,
        config: GRPOConfig,
        model: nn.Module,
        policy: nn.Module,
        optimizer,
        scheduler,
        accelerator: Accelerator,
        reference: nn.Module | None,
    ) -> None:
        self.config, self.model, self.policy = config, model, policy
        self.optimizer, self.scheduler, self.accelerator = optimizer, scheduler, accelerator
        self.reference = reference
        self.sharded = distributed.is_sharded(policy)  # FSDP2 / expert parallelism, not wrapped by accelerate
        self.use_mtp = config.mtp_on_completions and hasattr(policy, "mtp_loss")

    def __call__(self, batch: PolicyBatch, advantages: Tensor) -> dict[str, float]:
        """`num_iterations` optimizer steps on `batch`; returns statistics averaged over them, and the
        seconds spent on each phase (time/reference_s, time/old_logprobs_s: 0 when the phase is
        skipped; time/forward_backward_s, time/optimizer_s: over all iterations)."""
        config, times = self.config, {"time/reference_s": 0.0, "time/old_logprobs_s": 0.0}
        reference_logp = old_logp = None
        if self.reference is not None:  # beta > 0
            with timed(times, "time/reference_s"):
                reference_logp = self.logprobs(self.reference, batch)
        if config.num_iterations > 1 or config.overlap:  # otherwise pi_old is the policy's own forward
            with timed(times, "time/old_logprobs_s"):
                old_logp = self.logprobs(self.model, batch)
        totals: dict[str, float] = defaultdict(float)
        for _ in range(config.num_iterations):
            with timed(times, "time/forward_backward_s"):
                stats = self.accumulate_gradients(batch, advantages, old_logp, reference_logp)
            with timed(times, "time/optimizer_s"):
                stats.update(self.apply_gradients())
            for key, value in stats.items():
                totals[key] += value / config.num_iterations
        return {**totals, **times}

    @staticmethod
    def micro_batches(n: int, size: int) -> list[slice]:
        """Consecutive row slices of at most `size` of n rows."""
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    @torch.no_grad()
    def logprobs(self, model: nn.Module, batch: PolicyBatch) -> Tensor:
        """(N, T) completion log-probs of `model` without gradient, `logprob_micro_batch_size` rows at a time."""
        width, chunks = batch.completion_mask.shape[1], []
        size = self.config.logprob_micro_batch_size or self.config.micro_batch_size
        for rows in self.micro_batches(len(batch), size):
            part = batch.rows(rows)
            logp = model(part.input_ids, part.attention_mask, part.position_ids, part.prompt_length,
                         routed_experts=part.routed_experts, kept_tokens=part.kept_tokens).logp  # fmt: skip
            chunks.append(nn.functional.pad(logp, (0, width - logp.shape[1])))
        return torch.cat(chunks)

    def accumulate_gradients(
        self, batch: PolicyBatch, advantages: Tensor, old_logp: Tensor | None, reference_logp: Tensor | None
    ) -> dict[str, float]:
        """Backward of the full-batch loss, one micro-batch at a time; returns batch-level statistics.

        With several processes the normalisers are those of the global batch
        divided by the number of processes, so that DDP's gradient average is
        exactly the gradient of the global loss; statistics are averaged over processes.
        `padding_free/padding_removed`: 1 - token slots the forwards ran over / those of
        the padded micro-batches, over the step's micro-batches on every process.
        """
        config, accelerator = self.config, self.accelerator
        counts = torch.tensor([float(len(batch)), batch.completion_mask.sum().item()], device=accelerator.device)
        num_sequences, num_tokens = (accelerator.reduce(counts, reduction="sum") / accelerator.num_processes).tolist()
        normalizers = {"num_sequences": num_sequences, "num_tokens": num_tokens,
                       "max_length": config.max_completion_length}  # fmt: skip
        sums: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), device=accelerator.device))
        micro_batches = self.micro_batches(len(batch), config.micro_batch_size)
        for index, rows in enumerate(micro_batches):
            part = batch.rows(rows)
            width, share = part.completion_mask.shape[1], len(part) / len(batch)
            out = self.model(part.input_ids, part.attention_mask, part.position_ids, part.prompt_length,
                             completion_mask=part.completion_mask, with_mtp=self.use_mtp,
                             routed_experts=part.routed_experts, kept_tokens=part.kept_tokens)  # fmt: skip
            old = out.logp.detach() if old_logp is None else old_logp[rows, :width]
            correct = IS_CORRECTIONS[config.importance_correction]
            weights, keep = correct(old, part.sampler_logprobs, part.completion_mask,
                                    cap=config.importance_cap, bounds=tuple(config.importance_bounds))  # fmt: skip
            loss_out = grpo_loss(
                out.logp, old, advantages[rows], part.completion_mask * keep.unsqueeze(1),
                ref_logp=None if reference_logp is None else reference_logp[rows, :width],
                beta=config.beta, epsilon_low=config.epsilon, epsilon_high=config.upper_epsilon,
                sapo_temperature_pos=config.sapo_temperature_pos, sapo_temperature_neg=config.sapo_temperature_neg,
                objective=config.objective, aggregation=config.aggregation, kl_estimator=config.kl_estimator,
                importance_weights=weights, sampler_logp=part.sampler_logprobs,
                off_policy_threshold=config.off_policy_mask_threshold, **normalizers,
            )  # fmt: skip
            loss = loss_out.loss  # this micro-batch's part of the batch loss
            for name, auxiliary in (("aux_loss", out.aux_loss), ("mtp_loss", out.mtp_loss)):
                if auxiliary is not None:  # per-micro-batch means, weighted by the micro-batch's share
                    loss = loss + auxiliary * share
                    sums[name] += auxiliary.detach() * share
            with self.gradient_sync(index == len(micro_batches) - 1):
                accelerator.backward(loss)
            sums["loss"] += loss.detach()
            sums["padding_free/padded_token_slots"] += out.padded_token_slots
            sums["padding_free/token_slots"] += out.token_slots
            completion, sampler_gap = part.completion_mask, old - part.sampler_logprobs
            for key, value in (
                ("kl", loss_out.kl), ("clip/low", loss_out.clip_low), ("clip/high", loss_out.clip_high),
                ("ratio", loss_out.ratio), ("entropy", masked_mean(out.entropy, completion)),
                ("mismatch/abs_logp_diff", masked_mean(sampler_gap.abs(), completion)),
                ("mismatch/kl", masked_mean(k3_kl(part.sampler_logprobs, old), completion)),
                ("mismatch/masked_fraction", 1 - keep.mean()),
                ("off_policy/masked_fraction", loss_out.off_policy_masked),
            ):  # fmt: skip
                sums[key] += value * share
        names = sorted(sums)
        means = accelerator.reduce(torch.stack([sums[name] for name in names]), reduction="mean")
        stats = dict(zip(names, means.tolist(), strict=True))
        slots = stats.pop("padding_free/token_slots")
        stats["padding_free/padding_removed"] = 1 - slots / stats.pop("padding_free/padded_token_slots")
        return stats

    @contextlib.contextmanager
    def gradient_sync(self, sync: bool) -> Iterator[None]:
        """Backward inside this context all-reduces gradients (DDP, FSDP) and steps DeepSpeed's engine only
        when `sync`: the last micro-batch of an optimizer step. Accelerate's DeepSpeed backward reads
        `accelerator.sync_gradients`, which outside `accelerator.accumulate` is always True."""
        if self.sharded:
            with distributed.gradient_sync(self.model, sync):  # the root unit is the log-prob module
                yield
            return
        if sync:
            yield
            return
        accelerator, before = self.accelerator, self.accelerator.sync_gradients
        accelerator.sync_gradients = False
        try:
            with accelerator.no_sync(self.model):
                yield
        finally:
            accelerator.sync_gradients = before

    def apply_gradients(self) -> dict[str, float]:
        """Clip, optimizer and scheduler step, routing-bias update; returns grad norm and expert load."""
        clip = clip_grad_norm_ if self.sharded else self.accelerator.clip_grad_norm_
        grad_norm = clip(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(grad_norm), **self.update_routing_bias()}

    def update_routing_bias(self) -> dict[str, float]:
        """Once per optimizer step: the MoE routing-bias update from this step's expert load (all ranks).

        Skipped for LoRA policies: everything but the adapter is frozen, and the base
        (the KL reference) must stay the policy it was.
        """
        if not hasattr(self.policy, "update_routing_bias") or is_peft_model(self.policy):
            return {}
        load = self.accelerator.reduce(self.policy.routing_load(), reduction="sum")
        load = self.policy.update_routing_bias(load)  # (num_moe_layers, n_routed_experts)
        routed = load.sum(dim=1) > 0  # layers that saw tokens this step (MTP blocks may not)
        imbalance = load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-9)  # max / mean expert load
        metrics = {f"moe/load_imbalance/layer{i}": imbalance[i].item() for i in routed.nonzero().flatten().tolist()}
        if routed.any():
            metrics["moe/load_imbalance"] = imbalance[routed].mean().item()
        return metrics
