"""Supervised fine-tuning on TRL's SFTTrainer, loss on completion tokens only.

The dataset has `prompt` and `completion` text columns; TRL appends the EOS
token to each completion and masks the prompt out of the loss (labels -100).

Our DeepSeek-V3 policy trains on its own loss, the next-token cross-entropy
plus the MoE sequence-wise balance loss and the multi-token-prediction loss,
instead of TRL's fused cross-entropy (which would drop both auxiliary terms);
its MoE routing bias is updated once per optimizer step, as in pre-training.
Any other model trains exactly as TRL trains it.

The learning rate follows `args.lr_scheduler_type`, or, given `lr_milestones`,
DeepSeek LLM's multi-step schedule (grpo/lr_schedules.py) with the same
warm-up, `args.warmup_steps`.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from transformers import PreTrainedTokenizerBase
from trl import SFTConfig, SFTTrainer

from r1kit.grpo.lr_schedules import Milestones, multi_step_schedule
from r1kit.policy.transformers_compat import ACTIVATION_CHECKPOINTING, disable_activation_checkpointing
from r1kit.sft.data import check_sft_dataset

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")


class ScheduledSFTTrainer(SFTTrainer):
    """SFTTrainer on DeepSeek LLM's multi-step learning-rate schedule when given `lr_milestones`, else TRL's."""

    def __init__(self, *args, lr_milestones: Milestones | None = None, **kwargs) -> None:
        self.lr_milestones = lr_milestones
        super().__init__(*args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer: Optimizer | None = None) -> LRScheduler:
        if self.lr_milestones is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        self.lr_scheduler = multi_step_schedule(
            optimizer or self.optimizer,
            total_steps=num_training_steps,
            warmup_steps=self.args.get_warmup_steps(num_training_steps),
            milestones=self.lr_milestones,
        )
        self._created_lr_scheduler = True  # as Trainer's: rebuilt if train() is called again
        return self.lr_scheduler


class PolicySFTTrainer(ScheduledSFTTrainer):
    """SFTTrainer whose loss is the policy's own `model(**inputs).loss` (CE + balance + MTP)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # the loss is a per-micro-batch mean: let Trainer scale it

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**{k: v for k, v in inputs.items() if k in MODEL_INPUTS}, use_cache=False)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


def run_sft(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: Dataset,
    args: SFTConfig,
    output_dir: str | Path,
    *,
    lr_milestones: Milestones | None = None,
) -> Path:
    """Fine-tune `model` in place on prompt/completion rows and save it with its tokenizer to `output_dir`.

    lr_milestones: train on DeepSeek LLM's multi-step schedule with these (fraction, multiplier)
        milestones instead of `args.lr_scheduler_type`.
    Returns the checkpoint directory, which `r1kit.policy.load_policy` and the GRPO recipes accept.
    """
    check_sft_dataset(train_dataset)
    trainer_class, callbacks = ScheduledSFTTrainer, []
    if hasattr(model, "update_routing_bias"):
        from r1kit.policy import RoutingBiasCallback

        trainer_class, callbacks = PolicySFTTrainer, [RoutingBiasCallback()]
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        lr_milestones=lr_milestones,
    )
    trainer.train()
    if getattr(args, ACTIVATION_CHECKPOINTING):  # the model goes on to generate with a KV cache
        disable_activation_checkpointing(model)
    output_dir = Path(output_dir)
    trainer.save_model(str(output_dir))  # the main process writes; every process waits for it
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(output_dir))
    trainer.accelerator.wait_for_everyone()
    return output_dir
