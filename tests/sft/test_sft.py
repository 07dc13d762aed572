"""SFT on TRL's trainer: TRL's data types, completion-only loss, our policy's own loss, routing-bias updates, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from r1kit.grpo.options import ConfigError
from r1kit.policy import load_policy
from r1kit.recipes.embedded import embedded_policy
from r1kit.recipes.tasks.arithmetic import arithmetic_dataset
from r1kit.sft.data import SFTFormat, check_sft_dataset
from r1kit.sft.trainer import PolicySFTTrainer, R1SFTTrainer, run_sft


def conversational(data: Dataset) -> Dataset:
    """Arithmetic rows as conversational prompt-completion: a user turn, then the assistant's reply."""
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p.strip()}] for p in data["prompt"]],
            "completion": [[{"role": "assistant", "content": c}] for c in data["completion"]],
        }
    )


def as_messages(data: Dataset) -> Dataset:
    rows = conversational(data)
    return Dataset.from_dict({"messages": [p + c for p, c in zip(rows["prompt"], rows["completion"], strict=True)]})


def test_our_policy_trains_on_its_own_loss_and_updates_routing_biases(
    debug_policy, arithmetic_tokenizer, sft_config, tmp_path
):
    data = arithmetic_dataset(64, seed=1)
    model = copy.deepcopy(debug_policy).train()
    out = run_sft(model, arithmetic_tokenizer, data, sft_config(), tmp_path / "sft")

    trainer = PolicySFTTrainer(model=model, args=sft_config(), train_dataset=data,
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


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_sft_lowers_the_loss(packing, debug_policy, arithmetic_tokenizer, sft_config, tmp_path):
    data = arithmetic_dataset(64, seed=1)
    model = copy.deepcopy(debug_policy).train()
    batch = arithmetic_tokenizer([p + c for p, c in zip(data["prompt"][:8], data["completion"][:8], strict=True)],
                                 return_tensors="pt", padding=True)  # fmt: skip
    loss = lambda: model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
    before = loss().item()
    # packed: 2-3 samples a row, so 4 rows a step see about as many samples as 8 unpacked
    args = sft_config(12, packing=True, per_device_train_batch_size=4) if packing else sft_config(12)
    run_sft(model, arithmetic_tokenizer, data, args, tmp_path / "sft")
    assert loss().item() < before - 0.3
    # transformers' Trainer turns the KV cache off while training; what is saved generates with it
    saved = load_policy(tmp_path / "sft")
    assert model.config.use_cache and saved.config.use_cache and saved.generation_config.use_cache


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_any_transformers_model_goes_through_trl(packing, arithmetic_tokenizer, tiny_llama, sft_config, tmp_path):
    tok = arithmetic_tokenizer
    out = run_sft(tiny_llama(tok), tok, arithmetic_dataset(32, seed=2), sft_config(2, packing=packing), tmp_path / "s")
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert AutoModelForCausalLM.from_pretrained(out).config.use_cache


@pytest.mark.parametrize("policy", [False, True], ids=["llama", "deepseek-v3"])
def test_conversational_prompt_completion_trains_on_the_reply_only(
    policy, chat_tokenizer, tiny_llama, sft_config, tmp_path
):
    tok, data = chat_tokenizer, arithmetic_dataset(16, seed=1)
    model = embedded_policy(tok, "tiny-debug") if policy else tiny_llama(tok)
    replies = {c + "<|im_end|>\n" for c in data["completion"]}  # the template's end of turn is trained on
    trainer_class = PolicySFTTrainer if policy else R1SFTTrainer
    trainer = trainer_class(model=model, args=sft_config(), train_dataset=conversational(data), processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        trained = labels != -100
        assert tok.decode(ids[trained]) in replies
        context = tok.decode(ids[~trained & mask.bool()])
        assert context.startswith("<|im_start|>user\nQuestion: ") and context.endswith("<|im_start|>assistant\n")
    out = run_sft(model, tok, conversational(data), sft_config(2), tmp_path / "sft")
    assert (out / "chat_template.jinja").exists()


def test_messages_rows_train_on_the_whole_conversation(chat_tokenizer, sft_config, tmp_path):
    tok, data = chat_tokenizer, as_messages(arithmetic_dataset(16, seed=1))
    model = embedded_policy(tok, "tiny-debug")
    trainer = PolicySFTTrainer(model=model, args=sft_config(), train_dataset=data, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    real = batch["attention_mask"].bool()
    assert batch["labels"][real].equal(batch["input_ids"][real])  # TRL's default for language modelling
    run_sft(model, tok, data, sft_config(2, packing=True), tmp_path / "sft")


def test_conversational_data_needs_a_chat_template(arithmetic_tokenizer, tiny_llama, sft_config, tmp_path):
    data = as_messages(arithmetic_dataset(4, seed=1))
    with pytest.raises(ConfigError, match=r"column\(s\) \['messages'\] hold chat messages, but the tokenizer has no"):
        run_sft(tiny_llama(arithmetic_tokenizer), arithmetic_tokenizer, data, sft_config(), tmp_path / "sft")


USER = [{"role": "user", "content": "1 + 1?"}]
REPLY = [{"role": "assistant", "content": "2"}]


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        ({"prompt": ["q"], "completion": ["a"]}, SFTFormat(("prompt", "completion"), conversational=False)),
        ({"prompt": [USER], "completion": [REPLY]}, SFTFormat(("prompt", "completion"), conversational=True)),
        ({"messages": [USER + REPLY]}, SFTFormat(("messages",), conversational=True)),
        ({"text": ["1 + 1 = 2"]}, SFTFormat(("text",), conversational=False)),
        ({"messages": [USER + REPLY], "text": ["x"]}, SFTFormat(("messages",), conversational=True)),
    ],
    ids=["prompt-completion", "conversational", "messages", "text", "messages-first"],
)
def test_every_trl_sft_type_is_recognised(columns, expected):
    assert check_sft_dataset(Dataset.from_dict(columns)) == expected


@pytest.mark.parametrize(
    ("columns", "error"),
    [
        ({"prompt": ["q"]}, r"missing column\(s\) \['completion'\]; it has \['prompt'\]"),
        ({"prompt": ["q", "r"], "completion": ["a", ""]}, "row 1: column 'completion' must be a non-empty string"),
        ({"prompt": ["q"], "completion": [7]}, "row 0: column 'completion' must be a non-empty string, got 7"),
        ({"question": ["q"], "answer": ["a"]}, r"columns \['question', 'answer'\]; expected TRL's prompt"),
        ({"prompt": [USER], "completion": ["2"]}, "row 0: column 'completion' must be a non-empty list of chat"),
        ({"messages": [USER, [{"role": "user"}]]}, "row 1: column 'messages' must be a non-empty list of chat"),
        ({"messages": [[]]}, "row 0: column 'messages' must be a non-empty list"),
        ({"text": []}, "SFT dataset is empty"),
    ],
    ids=["missing", "empty-string", "not-a-string", "unknown", "mixed", "no-content", "no-messages", "no-rows"],
)
def test_bad_sft_data_names_the_problem(columns, error):
    with pytest.raises(ConfigError, match=error):
        check_sft_dataset(Dataset.from_dict(columns))
