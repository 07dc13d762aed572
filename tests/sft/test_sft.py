"""SFT on TRL's trainer: completion-only loss, our policy's own loss, routing-bias updates, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM
from trl import SFTConfig

from r1kit.grpo.options import ConfigError
from r1kit.policy import load_policy
from r1kit.policy.transformers_compat import ACTIVATION_CHECKPOINTING
from r1kit.recipes.tasks.arithmetic import arithmetic_dataset
from r1kit.sft.data import check_sft_dataset
from r1kit.sft.trainer import PolicySFTTrainer, run_sft


def sft_args(tmp_path, steps=6) -> SFTConfig:
    return SFTConfig(output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=8,
                     learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                     max_length=128, disable_tqdm=True, **{ACTIVATION_CHECKPOINTING: False})  # fmt: skip


def test_our_policy_trains_on_its_own_loss_and_updates_routing_biases(debug_policy, arithmetic_tokenizer, tmp_path):
    data = arithmetic_dataset(64, seed=1)
    model = copy.deepcopy(debug_policy).train()
    out = run_sft(model, arithmetic_tokenizer, data, sft_args(tmp_path), tmp_path / "sft")

    trainer = PolicySFTTrainer(model=model, args=sft_args(tmp_path), train_dataset=data,
                               processing_class=arithmetic_tokenizer)  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        first = int((labels != -100).nonzero()[0])  # the loss starts exactly where the completion starts
        assert arithmetic_tokenizer.decode(ids[:first][mask[:first].bool()]).startswith("Question: ")
        assert arithmetic_tokenizer.decode(ids[:first]).endswith("?\n")
        assert arithmetic_tokenizer.decode(ids[first:]).startswith("<think>")
    with torch.no_grad():
        expected = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
        assert trainer.compute_loss(model, batch) == pytest.approx(expected.item())

    reloaded = load_policy(out)
    biases = [layer.mlp.gate.e_score_correction_bias for layer in reloaded.model.layers if hasattr(layer.mlp, "gate")]
    assert biases and any(b.abs().sum() > 0 for b in biases)  # moved once per optimizer step


def test_sft_lowers_the_loss(debug_policy, arithmetic_tokenizer, tmp_path):
    data = arithmetic_dataset(64, seed=1)
    model = copy.deepcopy(debug_policy).train()
    batch = arithmetic_tokenizer([p + c for p, c in zip(data["prompt"][:8], data["completion"][:8], strict=True)],
                                 return_tensors="pt", padding=True)  # fmt: skip
    loss = lambda: model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
    before = loss().item()
    run_sft(model, arithmetic_tokenizer, data, sft_args(tmp_path, steps=12), tmp_path / "sft")
    assert loss().item() < before - 0.3


def test_any_transformers_model_goes_through_trl(arithmetic_tokenizer, tmp_path):
    tok = arithmetic_tokenizer
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, pad_token_id=tok.pad_token_id,
                                         eos_token_id=tok.eos_token_id))  # fmt: skip
    out = run_sft(model, tok, arithmetic_dataset(32, seed=2), sft_args(tmp_path, steps=2), tmp_path / "sft")
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()


def test_bad_sft_data_names_the_problem():
    with pytest.raises(ConfigError, match=r"missing column\(s\) \['completion'\]"):
        check_sft_dataset(Dataset.from_dict({"prompt": ["q"]}))
    with pytest.raises(ConfigError, match="row 1: column 'completion' must be a non-empty string"):
        check_sft_dataset(Dataset.from_dict({"prompt": ["q", "r"], "completion": ["a", ""]}))
