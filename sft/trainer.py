"""Supervised fine-tuning on TRL's SFTTrainer, loss on completion tokens only.

The dataset has `prompt` and `completion` text columns; TRL appends the EOS
token to each completion and masks the prompt out of the loss (labels -100).

Our DeepSeek-V3 policy trains on its own loss, the next-token cross-entropy
plus the MoE sequence-wise balance loss and the multi-token-prediction loss,
instead of TRL's fused cross-entropy (which would drop both auxiliary terms);
its MoE routing bias is updated once per optimizer step, as in pre-training.
Any other model trains exactly as TRL trains it.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset
from torch import nn
from transformers import PreTrainedTokenizerBase
from trl import SFTConfig, SFTTrainer

from policy.transformers_compat import ACTIVATION_CHECKPOINTING, disable_activation_checkpointing
from sft.data import check_sft_dataset

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")


class PolicySFTTrainer(SFTTrainer):
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
) -> Path:
    """Fine-tune `model` in place on prompt/completion rows and save it with its tokenizer to `output_dir`.

    Returns the checkpoint directory, which `policy.load_policy` and the GRPO recipes accept.
    """
    check_sft_dataset(train_dataset)
    trainer_class, callbacks = SFTTrainer, []
    if hasattr(model, "update_routing_bias"):
        from policy import RoutingBiasCallback

        trainer_class, callbacks = PolicySFTTrainer, [RoutingBiasCallback()]
    trainer = trainer_class(
        model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer, callbacks=callbacks
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
