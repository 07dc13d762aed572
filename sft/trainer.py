"""Supervised fine-tuning on TRL's SFTTrainer, loss on completion tokens only.

The dataset has `prompt` and `completion` text columns; TRL appends the EOS
token to each completion and masks the prompt out of the loss. For our
DeepSeek-V3 policy the MoE routing bias is updated once per optimizer step
through a callback, as in pre-training.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset
from torch import nn
from transformers import PreTrainedTokenizerBase
from trl import SFTConfig, SFTTrainer

from sft.data import check_sft_dataset


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
    callbacks = []
    if hasattr(model, "update_routing_bias"):
        from policy import RoutingBiasCallback

        callbacks.append(RoutingBiasCallback())
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer, callbacks=callbacks
    )
    trainer.train()
    output_dir = Path(output_dir)
    trainer.save_model(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    return output_dir
