"""The GRPO training loop.

One step: sample G completions for each of B prompts through a RolloutEngine,
score them with a reward suite, turn rewards into group-relative advantages,
run `num_iterations` optimizer updates on the clipped-ratio loss (with the k3 KL
to a frozen reference when beta > 0), update MoE routing biases, push the new
weights to the engine, then log and checkpoint. The math lives in
grpo/advantages.py and grpo/loss.py; this file only orchestrates.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from datasets import Dataset
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_scheduler

from grpo.advantages import compute_advantages, zero_std_groups
from grpo.batch import PolicyBatch, build_policy_batch
from grpo.checkpoint import list_checkpoints, load_training_state, save_checkpoint, save_model_atomic
from grpo.config import GRPOConfig
from grpo.data import PromptSampler, check_prompt_dataset, encode_prompt
from grpo.logprobs import TokenLogprobModel
from grpo.loss import grpo_loss, masked_mean
from grpo.metrics import MetricsLogger, nan_mean_std
from grpo.options import ConfigError
from grpo.plotting import plot_run
from rollout.engine import RolloutEngine, SamplingParams

# evaluate(step) -> metrics such as {"eval/accuracy": 0.5}
EvalHook = Callable[[int], dict[str, float]]


class RewardScores(Protocol):
    """What the trainer reads from a reward suite's result for N completions (see rewards.RewardResult).

    total: (N,) weighted sum of the reward functions.
    scores: name -> (N,) scores, NaN where a function gave None or failed.
    metrics(prefix): flat per-function statistics to log.
    """

    total: Tensor
    scores: dict[str, Tensor]

    def metrics(self, prefix: str = ...) -> dict[str, float]: ...


class RewardScorer(Protocol):
    """A reward suite: scores completions given their prompts and dataset columns (see rewards.RewardSuite)."""

    def score(self, prompts: list, completions: list[str], columns: dict[str, list]) -> RewardScores: ...


class GRPOTrainer:
    """Trains `policy` with GRPO on the prompts of `train_dataset`.

    policy: a causal LM (ours or any transformers model); trained in place.
    engine: generates rollouts; receives the new weights after every step.
    rewards: the reward suite (see `RewardScorer`).
    reference: the frozen KL reference; defaults to a copy of `policy` at the
        start when beta > 0, and is never built when beta == 0.
    accuracy_reward: name of the reward function reported as "accuracy".
    """

    def __init__(
        self,
        config: GRPOConfig,
        policy: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        engine: RolloutEngine,
        rewards: RewardScorer,
        train_dataset: Dataset,
        *,
        reference: nn.Module | None = None,
        accelerator: Accelerator | None = None,
        prompt_column: str = "prompt",
        accuracy_reward: str | None = "math_accuracy",
        evaluate: EvalHook | None = None,
    ) -> None:
        check_prompt_dataset(train_dataset, prompt_column)
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer needs pad and eos tokens")
        self.config, self.tokenizer, self.engine, self.rewards = config, tokenizer, engine, rewards
        self.prompt_column, self.accuracy_reward, self.evaluate = prompt_column, accuracy_reward, evaluate
        self.accelerator = accelerator or Accelerator()
        torch.manual_seed(config.seed)

        self.policy = policy.train()
        model = TokenLogprobModel(policy, temperature=config.temperature, chunk_size=config.logprob_chunk_size)
        optimizer = torch.optim.AdamW(
            [p for p in policy.parameters() if p.requires_grad],
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay,
        )
        scheduler = get_scheduler(
            "constant_with_warmup" if config.lr_schedule == "constant" else "cosine",
            optimizer,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=config.max_steps * config.num_iterations,
        )
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.reference = None
        if config.beta > 0:
            reference = reference if reference is not None else copy.deepcopy(policy)
            reference.requires_grad_(False).eval()
            self.reference = TokenLogprobModel(
                reference, temperature=config.temperature, chunk_size=config.logprob_chunk_size
            ).to(self.accelerator.device)

        self.sampler = PromptSampler(train_dataset, config.prompts_per_step, config.seed)
        self.logger = MetricsLogger(config.output_dir, self.accelerator)
        self.step = 0
        self.policy_version = 0

    # ------------------------------------------------------------------ the loop
    def train(self) -> Path:
        """Run until `max_steps`; returns the directory of the final model."""
        config = self.config
        progress = tqdm(
            total=config.max_steps,
            initial=self.step,
            desc="GRPO",
            dynamic_ncols=True,
            disable=not self.accelerator.is_main_process,
        )
        while self.step < config.max_steps:
            metrics = self.training_step()
            self.step += 1
            if self.evaluate is not None and config.eval_steps and self.step % config.eval_steps == 0:
                metrics.update(self.evaluate(self.step))
            if self.step % config.logging_steps == 0 or self.step == config.max_steps:
                self.logger.log(self.step, metrics)
            if config.save_steps and self.step % config.save_steps == 0:
                self.save_checkpoint()
            progress.update(1)
            progress.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.4f}")
        progress.close()
        return self.save_final()

    def training_step(self) -> dict[str, float]:
        """One GRPO step: rollout, score, advantages, update, sync. Returns the step's metrics."""
        config = self.config
        start = time.perf_counter()
        rows = self.sampler.next_batch()
        rollout = self.engine.generate(
            [encode_prompt(self.tokenizer, row[self.prompt_column]) for row in rows],
            SamplingParams(
                n=config.num_generations,
                temperature=config.temperature,
                top_p=config.top_p,
                max_new_tokens=config.max_completion_length,
                stop_token_ids=(self.tokenizer.eos_token_id,),
                seed=config.seed * 100_003 + self.step,
            ),
        )
        generation_time = time.perf_counter() - start

        repeat = lambda values: [v for v in values for _ in range(config.num_generations)]
        columns = {c: repeat([row[c] for row in rows]) for c in rows[0] if c != self.prompt_column}
        scores = self.rewards.score(repeat([row[self.prompt_column] for row in rows]), rollout.completion_text, columns)
        rewards = scores.total.view(len(rows), config.num_generations)
        advantages = compute_advantages(rewards, config.advantage_estimator, eps=config.advantage_eps).view(-1)

        batch = build_policy_batch(rollout, self.tokenizer.pad_token_id).to(self.accelerator.device)
        update_metrics = self._optimize(batch, advantages.to(self.accelerator.device))
        self._sync_engine()

        metrics = {
            **self._reward_metrics(scores, rewards),
            **update_metrics,
            "completion_length/mean": batch.completion_mask.sum(1).mean().item(),
            "completion_length/max": batch.completion_mask.sum(1).max().item(),
            "truncated_fraction": batch.truncated.float().mean().item(),
            "tokens_per_second": rollout.num_generated_tokens / max(generation_time, 1e-9),
            "time/generation_s": generation_time,
            "time/step_s": time.perf_counter() - start,
            "lr": self.scheduler.get_last_lr()[0],
        }
        return metrics

    # ---------------------------------------------------------------- the update
    def _micro_batches(self, n: int) -> list[slice]:
        size = self.config.micro_batch_size
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    @torch.no_grad()
    def _logprobs(self, model: nn.Module, batch: PolicyBatch) -> Tensor:
        """(N, T) completion log-probs of `model` without gradient, micro-batch by micro-batch."""
        chunks = []
        for rows in self._micro_batches(len(batch)):
            part = batch.rows(rows)
            logp = model(part.input_ids, part.attention_mask, part.position_ids, part.prompt_length).logp
            chunks.append(nn.functional.pad(logp, (0, batch.completion_mask.shape[1] - logp.shape[1])))
        return torch.cat(chunks)

    def _optimize(self, batch: PolicyBatch, advantages: Tensor) -> dict[str, float]:
        """`num_iterations` optimizer steps on this rollout batch; returns averaged statistics."""
        config = self.config
        reference_logp = self._logprobs(self.reference, batch) if self.reference is not None else None
        old_logp = self._logprobs(self.model, batch) if config.num_iterations > 1 else None
        totals: dict[str, float] = {}
        for _ in range(config.num_iterations):
            for key, value in self._optimizer_step(batch, advantages, old_logp, reference_logp).items():
                totals[key] = totals.get(key, 0.0) + value / config.num_iterations
        return totals

    def _optimizer_step(
        self, batch: PolicyBatch, advantages: Tensor, old_logp: Tensor | None, reference_logp: Tensor | None
    ) -> dict[str, float]:
        """Accumulate gradients over micro-batches, clip, step; returns statistics of this update."""
        config = self.config
        normalizers = {
            "num_sequences": float(len(batch)),
            "num_tokens": batch.completion_mask.sum().item(),
            "max_length": config.max_completion_length,
        }
        sums = {
            "loss": 0.0,
            "kl": 0.0,
            "clip/low": 0.0,
            "clip/high": 0.0,
            "entropy": 0.0,
            "sampler_logprob_diff": 0.0,
            "aux_loss": 0.0,
        }
        micro_batches = self._micro_batches(len(batch))
        for rows in micro_batches:
            part = batch.rows(rows)
            width = part.completion_mask.shape[1]
            out = self.model(part.input_ids, part.attention_mask, part.position_ids, part.prompt_length)
            loss_out = grpo_loss(
                out.logp,
                out.logp.detach() if old_logp is None else old_logp[rows, :width],
                advantages[rows],
                part.completion_mask,
                ref_logp=None if reference_logp is None else reference_logp[rows, :width],
                beta=config.beta,
                epsilon_low=config.epsilon,
                epsilon_high=config.upper_epsilon,
                objective=config.objective,
                aggregation=config.aggregation,
                **normalizers,
            )
            loss = loss_out.loss
            share = len(part) / len(batch)
            if out.aux_loss is not None:
                loss = loss + out.aux_loss * share
                sums["aux_loss"] += out.aux_loss.item() * share
            self.accelerator.backward(loss)
            sums["loss"] += loss.item()
            sums["kl"] += loss_out.kl.item() * share
            sums["clip/low"] += loss_out.clip_low.item() * share
            sums["clip/high"] += loss_out.clip_high.item() * share
            sums["entropy"] += masked_mean(out.entropy, part.completion_mask).item() * share
            sampler_gap = (out.logp.detach() - part.sampler_logprobs).abs()
            sums["sampler_logprob_diff"] += masked_mean(sampler_gap, part.completion_mask).item() * share
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums["grad_norm"] = float(grad_norm)
        sums.update(self._update_routing_bias())
        return sums

    def _update_routing_bias(self) -> dict[str, float]:
        """Once per optimizer step: the MoE routing-bias update from this step's expert load."""
        if not hasattr(self.policy, "update_routing_bias"):
            return {}
        load = self.accelerator.reduce(self.policy.routing_load(), reduction="sum")
        load = self.policy.update_routing_bias(load)  # (num_moe_layers, n_routed_experts)
        imbalance = load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-9)
        return {"moe/load_imbalance": imbalance.mean().item()}

    def _sync_engine(self) -> None:
        self.policy_version += 1
        state = self.accelerator.unwrap_model(self.model).model.state_dict()
        self.engine.update_weights(state.items(), self.policy_version)

    # ------------------------------------------------------------------ metrics
    def _reward_metrics(self, scores: RewardScores, rewards: Tensor) -> dict[str, float]:
        reward_mean, reward_std = nan_mean_std(scores.total)
        metrics = {
            "reward": reward_mean,
            "reward/std": reward_std,
            "zero_std_groups": zero_std_groups(rewards).float().mean().item(),
            **scores.metrics(prefix="rewards/"),
        }
        if self.accuracy_reward in scores.scores:
            metrics["accuracy"] = nan_mean_std(scores.scores[self.accuracy_reward])[0]
        return metrics

    # -------------------------------------------------------------- checkpoints
    def _trainer_state(self) -> dict:
        return {
            "step": self.step,
            "policy_version": self.policy_version,
            "sampler": self.sampler.state_dict(),
            "config": self.config.to_dict(),
        }

    def save_checkpoint(self) -> Path | None:
        """Write `checkpoint-{step}` (main process) and keep the newest `save_total_limit`."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        return save_checkpoint(
            self.config.output_dir,
            self.step,
            model=self.policy,
            tokenizer=self.tokenizer,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            trainer_state=self._trainer_state(),
            keep_last=self.config.save_total_limit,
        )

    def resume(self, checkpoint: str | Path | None = None) -> int:
        """Restore the newest (or the given) checkpoint of `output_dir`; returns the step resumed at.

        The policy's weights must already be loaded from the checkpoint (the
        recipes load the policy from it); this restores everything else.
        """
        if checkpoint is None:
            found = list_checkpoints(self.config.output_dir)
            if not found:
                return 0
            checkpoint = found[-1]
        state = load_training_state(checkpoint, self.optimizer, self.scheduler)
        self.step, self.policy_version = state["step"], state["policy_version"]
        self.sampler.load_state_dict(state["sampler"])
        self.logger.truncate_after(self.step)
        self._sync_engine()
        return self.step

    def save_final(self) -> Path:
        """The final model + tokenizer in `output_dir/final` and the PNG report; returns the model dir."""
        self.accelerator.wait_for_everyone()
        final = Path(self.config.output_dir) / "final"
        if self.accelerator.is_main_process:
            save_model_atomic(self.policy, self.tokenizer, final)
            if self.logger.path.exists():
                plot_run(self.logger.path, Path(self.config.output_dir) / "report.png")
        return final
