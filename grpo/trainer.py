"""The GRPO training loop.

One step: the `RolloutCollector` samples G completions for each of B prompts
through a RolloutEngine, scores them with a reward suite and turns the rewards
into group-relative advantages; `PolicyUpdate` runs `num_iterations` optimizer
updates on the clipped-ratio loss (with the k3 KL to a frozen reference when
beta > 0) and the MoE routing-bias update; the trainer pushes the new weights
to the engine, logs and checkpoints. The math lives in grpo/advantages.py and
grpo/loss.py; this file only orchestrates.
"""

from __future__ import annotations

import collections
import copy
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list
from datasets import Dataset
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from r1kit.grpo.adapters import AdapterDisabledReference, engine_weights, is_peft_model
from r1kit.grpo.batch import PolicyBatch, build_policy_batch
from r1kit.grpo.checkpoint import (
    MODEL_DIR,
    OPTIMIZER_DIR,
    list_checkpoints,
    load_sharded_model,
    load_training_state,
    save_checkpoint,
    save_model_atomic,
    save_optimizer,
    save_sharded_model,
)
from r1kit.grpo.collector import RewardScorer, RolloutCollector, ScoredRollout
from r1kit.grpo.config import GRPOConfig
from r1kit.grpo.data import PromptSampler, check_prompt_dataset, stop_token_ids
from r1kit.grpo.distributed import full_tensors, is_sharded, shard_root
from r1kit.grpo.logprobs import TokenLogprobModel
from r1kit.grpo.lr_schedules import LR_SCHEDULES
from r1kit.grpo.metrics import MetricsLogger, timed
from r1kit.grpo.options import ConfigError
from r1kit.grpo.plotting import plot_run, settings_summary
from r1kit.grpo.update import PolicyUpdate
from r1kit.policy.checkpoint import StreamedStateDict
from r1kit.policy.loading import load_policy
from r1kit.policy.modeling import DeepseekV3ForCausalLM
from r1kit.policy.moe import has_moe_layers
from r1kit.rollout.engine import RolloutEngine

# evaluate(step) -> metrics such as {"eval/accuracy": 0.5}
EvalHook = Callable[[int], dict[str, float]]
REFERENCE_DIR = "reference"  # beside the checkpoints: the start policy, when the trainer made the KL reference


class GRPOTrainer:
    """Trains `policy` with GRPO on the prompts of `train_dataset`.

    policy: a causal LM (ours or any transformers model); trained in place.
    engine: generates rollouts; receives the new weights after every step.
    rewards: the reward suite (see `RewardScorer`).
        With several processes (accelerate), only the main process needs an
        engine and a reward suite (pass None elsewhere): it collects the whole
        batch, and every process trains on its share of whole groups.
    reference: the frozen KL reference; defaults to a copy of `policy` at the
        start when beta > 0 (saved once, as `output_dir/reference`, with the
        first checkpoint, and restored from there by `resume`), and is never
        built when beta == 0. LoRA policies use their adapter-free base.
    accuracy_reward: name of the reward function reported as "accuracy".
    evaluate: called every `eval_steps` steps; its metrics are logged.
    """

    def __init__(
        self,
        config: GRPOConfig,
        policy: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        engine: RolloutEngine | None,
        rewards: RewardScorer | None,
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
        self.config, self.tokenizer, self.engine, self.evaluate = config, tokenizer, engine, evaluate
        self.accelerator = accelerator or Accelerator()
        world = self.accelerator.num_processes
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != world:
            raise ConfigError(
                f"{launched} processes were launched but they did not join one process group (each sees {world}): "
                "they would train separately and overwrite each other's outputs. On CPU, launch with "
                "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N` (accelerate's --cpu / "
                "use_cpu starts independent processes)."
            )
        if config.prompts_per_step % world:
            raise ConfigError(f"prompts_per_step ({config.prompts_per_step}) must be a multiple of the "
                              f"number of processes ({world}): groups are never split")  # fmt: skip
        if self.accelerator.is_main_process and (engine is None or rewards is None):
            raise ConfigError("the main process needs a rollout engine and a reward suite")
        torch.manual_seed(config.seed)
        if config.keep_routing and not has_moe_layers(policy):
            raise ConfigError(f"keep_routing needs a policy with DeepSeekMoE layers; {type(policy).__name__} has none")
        self.policy = policy.train()
        if hasattr(policy, "mtp") and not config.mtp_on_completions:
            policy.mtp.requires_grad_(False)  # untrained here; frozen so data-parallel sees no unused parameter
        model = TokenLogprobModel(
            policy,
            temperature=config.temperature,
            chunk_size=config.logprob_chunk_size,
            padding_free=config.padding_free,
            share_prompts=config.share_prompts,
        )
        self.sharded = is_sharded(policy)
        if self.sharded:  # before the optimizer: the root's parameters become DTensors
            self._check_sharded(policy, reference)
            shard_root(model, policy)
        optimizer = torch.optim.AdamW(
            [p for p in policy.parameters() if p.requires_grad],
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay,
        )
        # Not through accelerator.prepare, which steps a scheduler once per process per optimizer step:
        # every process takes each optimizer step of max_steps together, so the schedule steps once.
        self.scheduler = LR_SCHEDULES[config.lr_schedule](
            optimizer,
            total_steps=config.max_steps * config.num_iterations,
            warmup_steps=config.warmup_steps,
            milestones=config.lr_milestone_pairs,
        )
        if self.sharded:  # FSDP2 / expert parallelism applied by the caller: accelerate must not wrap it again
            self.model, self.optimizer = model, optimizer
        else:
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # the copy of the start policy this trainer made itself, which only its checkpoints can restore
        self.own_reference = config.beta > 0 and reference is None and not is_peft_model(policy)
        self.update = PolicyUpdate(config, self.model, policy, self.optimizer, self.scheduler, self.accelerator,
                                   self._reference_model(policy, reference))  # fmt: skip
        sampler = PromptSampler(train_dataset, config.prompts_per_step, config.seed)
        stop_ids = stop_token_ids(tokenizer, getattr(policy, "generation_config", None))
        self.collector = RolloutCollector(config, engine, rewards, tokenizer, sampler, prompt_column, accuracy_reward,
                                          stop_ids)  # fmt: skip
        self.logger = MetricsLogger(config.output_dir, self.accelerator)
        self.step = 0
        self.policy_version = 0

    def _check_sharded(self, policy: nn.Module, reference: nn.Module | None) -> None:
        """What a policy sharded by the caller (`r1kit.policy.parallelize`) needs from the other settings."""
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise ConfigError("a policy sharded with FSDP2 trains without DeepSpeed; launch without its config")
        if is_peft_model(policy):
            raise ConfigError("LoRA adapters on a sharded policy are not supported; train LoRA with data parallelism")
        if self.config.beta > 0 and reference is None:
            raise ConfigError("a sharded policy needs its KL reference passed as reference=, sharded the same way "
                              "(a copy on every process would hold the whole model), or beta=0")  # fmt: skip

    def _reference_model(self, policy: nn.Module, reference: nn.Module | None) -> nn.Module | None:
        """The frozen KL reference: none when beta == 0, the adapter-free base for LoRA, else a copy."""
        if self.config.beta == 0:
            return None
        if reference is None and is_peft_model(policy):
            return AdapterDisabledReference(self.model, policy)
        reference = reference if reference is not None else copy.deepcopy(policy)
        reference.requires_grad_(False).eval()
        wrapped = TokenLogprobModel(
            reference,
            temperature=self.config.temperature,
            chunk_size=self.config.logprob_chunk_size,
            padding_free=self.config.padding_free,
            share_prompts=self.config.share_prompts,
        )
        if self.sharded:
            shard_root(wrapped, reference)
            return wrapped
        return wrapped.to(self.accelerator.device)

    # ------------------------------------------------------------------ the loop
    def train(self) -> Path:
        """Run until `max_steps`; returns the directory of the final model."""
        config = self.config
        if self.step == 0:  # a fresh run in a reused output_dir starts a fresh metrics file
            self.logger.truncate_after(0)
        progress = tqdm(total=config.max_steps, initial=self.step, desc="GRPO", dynamic_ncols=True,
                        disable=not self.accelerator.is_main_process)  # fmt: skip
        try:
            while self.step < config.max_steps:
                metrics = self.training_step()
                self.step += 1
                if self.evaluate is not None and config.eval_steps and self.step % config.eval_steps == 0:
                    if self.accelerator.is_main_process:  # the engine lives there
                        metrics.update(self.evaluate(self.step))
                    self.accelerator.wait_for_everyone()
                if self.step % config.logging_steps == 0 or self.step == config.max_steps:
                    self.logger.log(self.step, metrics)
                if config.save_steps and self.step % config.save_steps == 0:
                    self.save_checkpoint()
                progress.update(1)
                progress.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics.get('kl', 0.0):.4f}")
        finally:
            progress.close()
            self.collector.close()
        return self.save_final()

    def training_step(self) -> dict[str, float]:
        """One GRPO step: rollouts, update, weight sync. Returns the step's metrics."""
        start = time.perf_counter()
        scored = self._collect()
        metrics = dict(scored.metrics, lr=self.scheduler.get_last_lr()[0])  # the rate of this step's (first) update
        self.logger.log_samples(self.step + 1, scored.samples)
        if scored.rows:  # dynamic sampling can leave no informative group
            batch = build_policy_batch(scored.rollout, self.tokenizer.pad_token_id)
            if self.config.mask_truncated_completions:
                batch.completion_mask *= (~batch.truncated).float().unsqueeze(1)
            batch = batch.to(self.accelerator.device)
            metrics.update(self.update(batch, scored.advantages.to(self.accelerator.device)))
            metrics.update(self._batch_shape_metrics(batch))
            metrics["policy_lag"] = self.policy_version - scored.rollout.policy_version
            with timed(metrics, "time/sync_s"):
                self._sync_engine()
        metrics.update({"time/generation_s": scored.generation_time, "time/step_s": time.perf_counter() - start})
        return metrics

    def _batch_shape_metrics(self, batch: PolicyBatch) -> dict[str, float]:
        """Mean trained completion length and truncated share over the whole batch, every process's share."""
        counts = torch.tensor([batch.completion_mask.sum().item(), len(batch), batch.truncated.sum().item()],
                              device=self.accelerator.device)  # fmt: skip
        tokens, rows, truncated = self.accelerator.reduce(counts, reduction="sum").tolist()
        return {"completion_length/mean": tokens / rows, "truncated_fraction": truncated / rows}

    def _collect(self) -> ScoredRollout:
        """The main process collects the whole batch; each process keeps its share of whole groups."""
        accelerator = self.accelerator
        scored = self.collector.collect(self.step) if accelerator.is_main_process else None
        if accelerator.num_processes == 1:
            return scored
        (scored,) = broadcast_object_list([scored], from_process=0)
        world = accelerator.num_processes
        usable = len(scored.rows) // world * world  # dynamic sampling may leave any number of groups
        return scored.select(list(range(usable))).shard(accelerator.process_index, world)

    def _full_state_dict(self) -> dict[str, Tensor] | None:
        """The policy's complete weights on the main process (None elsewhere), gathered when sharded.

        A collective: every process must call it. None for LoRA policies (adapters are merged instead).
        """
        if is_peft_model(self.policy):
            return None
        if self.sharded:  # tensor by tensor; only the main process keeps them
            gathered = full_tensors(self.policy)
            return dict(gathered) if self.accelerator.is_main_process else _drain(gathered)
        state = self.accelerator.get_state_dict(self.model)  # keys of the TokenLogprobModel: "model.<name>"
        return {name.removeprefix("model."): tensor for name, tensor in state.items()}

    def _sync_engine(self) -> None:
        """Push the policy's weights to the engine; a sharded policy streams them, one gathered tensor at a time."""
        self.policy_version += 1
        if self.sharded:
            weights = full_tensors(self.policy, self.accelerator.device)
            if self.accelerator.is_main_process:
                self.engine.update_weights(weights, self.policy_version)
            _drain(weights)  # what the engine left unread (on the other processes: everything)
            return
        state = self._full_state_dict()
        if self.accelerator.is_main_process:
            self.engine.update_weights(engine_weights(self.policy, state), self.policy_version)

    # -------------------------------------------------------------- checkpoints
    def _trainer_state(self) -> dict:
        return {"step": self.step, "policy_version": self.policy_version, "collector": self.collector.state_dict(),
                "config": self.config.to_dict()}  # fmt: skip

    def save_checkpoint(self) -> Path | None:
        """Write `checkpoint-{step}` (main process) and keep the newest `save_total_limit`; the trainer's own
        KL reference goes to `output_dir/reference` the first time."""
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise ConfigError("checkpoints of DeepSpeed runs are not supported (each rank holds a ZeRO partition "
                              "of the optimizer); train with DDP or FSDP2 to save and resume")  # fmt: skip
        state = None if self.sharded else self._full_state_dict()
        output_dir = Path(self.config.output_dir)
        # written by every process, then moved into the checkpoint
        optimizer_dir = output_dir / f".checkpoint-{self.step}.{OPTIMIZER_DIR}"
        model_dir = output_dir / f".checkpoint-{self.step}.{MODEL_DIR}" if self.sharded else None
        if self.accelerator.is_main_process:  # left by a run that stopped while saving
            for left in (optimizer_dir, model_dir):
                if left is not None:
                    shutil.rmtree(left, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        if model_dir is not None:  # a sharded policy: each process its own shard, nothing gathered
            save_sharded_model(self.policy, model_dir)
        save_optimizer(self.policy, self._optimizer, optimizer_dir)
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        reference = output_dir / REFERENCE_DIR
        if self.own_reference and not reference.exists():
            save_model_atomic(self.update.reference.model, self.tokenizer, reference)
        return save_checkpoint(output_dir, self.step, model=self.policy, tokenizer=self.tokenizer,
                               optimizer_dir=optimizer_dir, scheduler=self.scheduler, state_dict=state,
                               trainer_state=self._trainer_state(), keep_last=self.config.save_total_limit,
                               sharded_model_dir=model_dir)  # fmt: skip

    @property
    def _optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer itself, without accelerate's wrapper."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def resume(self, checkpoint: str | Path | None = None) -> int:
        """Restore the newest (or the given) checkpoint of `output_dir`; returns the step resumed at.

        A checkpoint of a sharded policy holds its weights as shards (`model/`),
        which this loads, into any sharding or none. Otherwise the policy's weights
        must already be loaded from the checkpoint's Hugging Face files (the recipes
        load the policy from it). This restores everything else, including the
        trainer's own KL reference (the run's start policy, from `reference` beside
        the checkpoint), and pushes the weights to the engine.
        """
        if checkpoint is None:
            found = list_checkpoints(self.config.output_dir)
            if not found:
                return 0
            checkpoint = found[-1]
        if self.own_reference:
            self._restore_reference(Path(checkpoint).parent / REFERENCE_DIR)
        if (Path(checkpoint) / MODEL_DIR).is_dir():
            load_sharded_model(self.policy, Path(checkpoint) / MODEL_DIR)
        state = load_training_state(checkpoint, self.policy, self._optimizer, self.scheduler)
        self.step, self.policy_version = state["step"], state["policy_version"] - 1
        self.collector.load_state_dict(state["collector"])
        self.logger.truncate_after(self.step)
        self._sync_engine()
        return self.step

    def _restore_reference(self, directory: Path) -> None:
        """Load the run's start policy, saved by its first checkpoint, into the reference copied at construction
        (a copy of the resumed weights, which would measure the KL from the checkpoint instead of the start)."""
        if not (directory / "config.json").exists():
            raise ConfigError(
                f"{directory} is missing: the KL reference (the policy this run started from) was not saved with "
                "its checkpoints; pass it as GRPOTrainer(reference=...) to resume"
            )
        start = load_policy(directory, dtype=next(self.policy.parameters()).dtype)
        self.update.reference.model.load_state_dict(start.state_dict())

    def save_final(self) -> Path:
        """The final model + tokenizer in `output_dir/final` and the PNG report; returns the model dir.

        A LoRA policy is saved twice: its adapter in `final/adapter`, then merged
        into the base weights (in place: training is over) as a full model in `final/`.
        """
        final = Path(self.config.output_dir) / "final"
        state = self._streamed_state_dict() if self._streams_export else self._full_state_dict()
        if not self._streams_export:
            self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            model = self.policy
            if is_peft_model(model):
                save_model_atomic(model, self.tokenizer, final.with_name("final-adapter"))
                model = model.merge_and_unload()
            save_model_atomic(model, self.tokenizer, final, state_dict=state)
            if is_peft_model(self.policy):
                final.with_name("final-adapter").rename(final / "adapter")
            if self.logger.path.exists():
                title = f"{Path(self.config.output_dir).resolve().name}: {settings_summary(self.config)}"
                plot_run(self.logger.path, Path(self.config.output_dir) / "report.png", title=title)
        self.accelerator.wait_for_everyone()
        return final

    @property
    def _streams_export(self) -> bool:
        """Whether the final weights stream to disk one gathered tensor at a time (a sharded DeepSeek-V3;
        other models' save_pretrained wants the whole state dict)."""
        return self.sharded and isinstance(self.policy, DeepseekV3ForCausalLM)

    def _streamed_state_dict(self) -> StreamedStateDict | None:
        """The sharded policy's weights for the main process's `save_pretrained`, gathered as it writes them;
        the other processes take part in each gather here (a collective) and return None."""
        gathered = full_tensors(self.policy)
        if not self.accelerator.is_main_process:
            _drain(gathered)
            return None
        return StreamedStateDict(gathered, self.policy.state_dict().keys())


def _drain(items: Iterator) -> None:
    """Run an iterator to its end (a collective every process must finish), keeping nothing."""
    collections.deque(items, maxlen=0)
