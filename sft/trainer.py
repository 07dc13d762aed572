"""Supervised fine-tuning on TRL's SFTTrainer: TRL's data types, completion-only loss, best-fit packing.

Data: any of TRL's SFT dataset types (sft/data.py): prompt-completion (text or
chat messages; loss on the completion only, TRL's default), `messages`, or
`text`. TRL tokenizes them (chat template for conversational rows) and appends
EOS to text completions. Samples longer than `args.max_length` are counted and
reported in one warning before they are cut to their first max_length tokens.

Packing (`args.packing`): best-fit-decreasing rows of exactly max_length tokens
(sft/packing.py), each sample with position ids restarting at 0 and no
attention to the other samples of its row, for transformers models and for our
DeepSeek-V3 alike. Only `packing_strategy="bfd"` (cut, never split) is taken.

Our DeepSeek-V3 policy trains on its own loss, the next-token cross-entropy
plus the MoE sequence-wise balance loss and the multi-token-prediction loss,
instead of TRL's fused cross-entropy (which would drop both auxiliary terms);
its MoE routing bias is updated once per optimizer step, as in pre-training.
Packed, a row is the balance loss's "sequence", as in DeepSeek-V3's
pre-training on packed documents. Any other model trains exactly as TRL trains it.

The learning rate follows `args.lr_scheduler_type`, or, given `lr_milestones`,
DeepSeek LLM's multi-step schedule (grpo/lr_schedules.py) with the same
warm-up, `args.warmup_steps`.
"""

from __future__ import annotations

import copy
from pathlib import Path

from datasets import Dataset
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from transformers import PreTrainedTokenizerBase
from trl import SFTConfig, SFTTrainer

from r1kit.grpo.lr_schedules import Milestones, multi_step_schedule
from r1kit.grpo.options import ConfigError
from r1kit.policy.transformers_compat import ACTIVATION_CHECKPOINTING, disable_activation_checkpointing
from r1kit.sft.data import check_sft_dataset, warn_cut_samples
from r1kit.sft.packing import PackedRowCollator, pack_dataset

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")


class R1SFTTrainer(SFTTrainer):
    """SFTTrainer that reports cut samples, packs best-fit rows (`args.packing`), and follows DeepSeek LLM's
    multi-step learning-rate schedule when given `lr_milestones` (else TRL's)."""

    packed_attention_mask = False  # transformers models see packed rows only through position_ids

    def __init__(self, *args, lr_milestones: Milestones | None = None, **kwargs) -> None:
        self.lr_milestones = lr_milestones
        super().__init__(*args, **kwargs)
        if self.args.packing:  # in place of TRL's padding-free collator, which would flatten the batch into one row
            self.data_collator = PackedRowCollator(with_attention_mask=self.packed_attention_mask)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """TRL tokenizes and labels whole samples; those over max_length are then counted and cut, by TRL
        (one sample per row) or into packed rows (`pack_dataset`)."""
        if packing != args.packing:  # one collator serves train and eval
            raise ConfigError(f"eval_packing={args.eval_packing} with packing={args.packing}: set them alike")
        if packing:
            check_packing(args, dataset)
        if args.max_length is None or not isinstance(dataset, Dataset):  # nothing to cut, or no lengths to count
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        whole = copy.copy(args)
        whole.max_length = None
        tokenized = super()._prepare_dataset(dataset, processing_class, whole, False, formatting_func, dataset_name)
        if packing:
            prepared, dropped = pack_dataset(tokenized, args.max_length, self._tokenizer.pad_token_id)
        else:  # TRL's cut, on the tokenized samples
            prepared = super()._prepare_dataset(tokenized, processing_class, args, False, None, dataset_name)
            dropped = len(tokenized) - len(prepared)
        warn_cut_samples([len(ids) for ids in tokenized["input_ids"]], args.max_length, dropped, dataset_name)
        return prepared

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


def check_packing(args: SFTConfig, dataset: object) -> None:
    """ConfigError unless packing can run: best-fit rows of max_length tokens over a datasets.Dataset."""
    if args.packing_strategy != "bfd":
        raise ConfigError(
            f"packing_strategy={args.packing_strategy!r}: r1kit packs best-fit rows and cuts samples longer than "
            "max_length (TRL's 'bfd'); set packing_strategy='bfd'"
        )
    if args.max_length is None:
        raise ConfigError("packing needs max_length, the length of a packed row")
    if not isinstance(dataset, Dataset):
        raise ConfigError(f"packing needs a datasets.Dataset (its samples are sorted by length), got {type(dataset)}")


class PolicySFTTrainer(R1SFTTrainer):
    """SFTTrainer whose loss is the policy's own `model(**inputs).loss` (CE + balance + MTP)."""

    packed_attention_mask = True  # the policy parts samples by position_ids and hides padding by attention_mask

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
    """Fine-tune `model` in place on `train_dataset` and save it with its tokenizer to `output_dir`.

    train_dataset: one of TRL's SFT types (sft/data.py); conversational rows need a
        tokenizer with a chat template.
    args: TRL's SFTConfig. Besides the Trainer's fields, run_sft reads max_length
        (samples cut there, with a warning; the row length when packing), packing
        (best-fit rows without cross-sample attention; packing_strategy must stay
        "bfd"), completion_only_loss (None: TRL's default, completion only for
        prompt-completion data), assistant_only_loss and dataset_text_field.
    lr_milestones: train on DeepSeek LLM's multi-step schedule with these (fraction, multiplier)
        milestones instead of `args.lr_scheduler_type`.
    Returns the checkpoint directory, which `r1kit.policy.load_policy` and the GRPO recipes accept.
    """
    data_format = check_sft_dataset(train_dataset, args.dataset_text_field)
    if data_format.conversational and not tokenizer.chat_template:
        raise ConfigError(
            f"SFT dataset column(s) {list(data_format.columns)} hold chat messages, but the tokenizer has no "
            "chat template to render them"
        )
    trainer_class, callbacks = R1SFTTrainer, []
    if hasattr(model, "update_routing_bias"):
        from r1kit.policy import RoutingBiasCallback

        trainer_class, callbacks = PolicySFTTrainer, [RoutingBiasCallback()]
    use_cache = getattr(model.config, "use_cache", None)  # transformers' Trainer sets it to args.use_cache (False)
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
    if use_cache is not None:  # saved as it came: `generate` on the checkpoint uses its KV cache again
        model.config.use_cache = use_cache
    output_dir = Path(output_dir)
    trainer.save_model(str(output_dir))  # the main process writes; every process waits for it
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(output_dir))
    trainer.accelerator.wait_for_everyone()
    return output_dir
