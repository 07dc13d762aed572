"""Best-fit packing: the packer, packed rows and batches, and packed SFT's per-sample loss equal to unpacked SFT's."""

from __future__ import annotations

import copy
import logging
import random

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from trl.data_utils import pack_dataset as trl_pack_dataset

from r1kit.grpo.options import ConfigError
from r1kit.policy.attention import packed_sequence_ids
from r1kit.recipes.tasks.arithmetic import arithmetic_dataset
from r1kit.sft.packing import PackedRowCollator, best_fit_decreasing, pack_rows, padding_fraction
from r1kit.sft.trainer import PolicySFTTrainer, R1SFTTrainer


def test_every_sample_lands_in_exactly_one_row_that_holds_it():
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(500)]
    rows = best_fit_decreasing(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    fills = [sum(min(lengths[i], 128) for i in row) for row in rows]
    assert max(fills) <= 128
    assert all(row == [i] for row in rows for i in row if lengths[i] >= 128)  # cut samples fill a row alone
    assert sum(fill <= 64 for fill in fills) <= 1  # a new row opens only when nothing fits: no two half-empty rows


def test_each_sample_goes_to_the_row_it_fits_most_tightly():
    # longest first: 8 -> row 0 (2 free), 5 -> row 1 (5 free), 4 -> row 1 (1 free), then the 1 fills row 1
    # exactly; first-fit would put it beside the 8 and leave two gaps of one token instead of one of two
    assert best_fit_decreasing([5, 8, 4, 1], 10) == [[1], [0, 2, 3]]
    assert best_fit_decreasing([3, 3, 3], 3) == [[0], [1], [2]]  # ties keep dataset order
    assert best_fit_decreasing([], 4) == []
    with pytest.raises(ValueError, match="sample 1 has no tokens"):
        best_fit_decreasing([2, 0], 4)


def test_padding_fraction_counts_cut_samples_at_the_row_length():
    assert padding_fraction([5, 8, 4, 1], [[1], [0, 2, 3]], 10) == pytest.approx(2 / 20)
    assert padding_fraction([15], [[0]], 10) == 0.0


def test_no_more_rows_than_trls_best_fit_decreasing():
    rng = random.Random(1)
    lengths = [rng.randint(20, 200) for _ in range(2500)]  # over TRL's 1,000-sample map batches
    trl_rows = trl_pack_dataset(Dataset.from_dict({"input_ids": [[1] * n for n in lengths]}), 256, strategy="bfd")
    assert len(best_fit_decreasing(lengths, 256)) <= len(trl_rows)


def test_rows_hold_samples_back_to_back_with_no_label_across_a_sample_start():
    ids = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11, 12]]
    labels = [[-100, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11, 12]]
    assert pack_rows(ids, labels, row_length=6, pad_token_id=0) == {
        "input_ids": [[6, 7, 8, 9, 10, 11], [1, 2, 3, 4, 5, 0]],  # the 7-token sample cut to 6
        "labels": [[-100, 7, 8, 9, 10, 11], [-100, 2, 3, -100, 5, -100]],
        "seq_lengths": [[6], [3, 2]],
    }


def test_positions_restart_for_every_sample_and_for_the_padding():
    row = {"input_ids": [1, 2, 3, 4, 5, 0, 0], "labels": [-100, 2, 3, -100, 5, -100, -100], "seq_lengths": [3, 2]}
    batch = PackedRowCollator(with_attention_mask=True)([row, row])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]] * 2
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0]] * 2
    assert "attention_mask" not in PackedRowCollator()([row])


def packed_batch(model, tokenizer, data, sft_config, **overrides) -> dict[str, torch.Tensor]:
    """The first training batch (4 rows of 128 tokens) of the trainer run_sft builds for `model`."""
    trainer_class = PolicySFTTrainer if hasattr(model, "update_routing_bias") else R1SFTTrainer
    args = sft_config(packing=True, per_device_train_batch_size=4, **overrides)
    trainer = trainer_class(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    return next(iter(trainer.get_train_dataloader()))


def sample_spans(batch: dict[str, torch.Tensor]) -> list[tuple[int, int, int]]:
    """(row, start, end) of every packed sample with loss tokens (padding blocks left out)."""
    spans = []
    for row, sequences in enumerate(packed_sequence_ids(batch["position_ids"])):
        for sequence in sequences.unique():
            start, end = (sequences == sequence).nonzero()[[0, -1], 0].tolist()
            if (batch["labels"][row, start : end + 1] != -100).any():
                spans.append((row, start, end + 1))
    return spans


def token_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """-log p of each labelled token given the tokens before it (B, T); 0 where the label is -100."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    losses = torch.zeros(batch["labels"].shape)
    losses[:, 1:] = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none")
    return losses


def per_sample_losses(model, batch, spans) -> torch.Tensor:
    losses = token_losses(model, batch)
    return torch.stack([losses[row, a:b].sum() for row, a, b in spans])


def separate_losses(model, batch, spans) -> torch.Tensor:
    """Each sample alone in a row of its own length: no packing, no padding."""
    alone = [{k: batch[k][row, a:b][None] for k in ("input_ids", "labels")} for row, a, b in spans]
    return torch.stack([token_losses(model, sample).sum() for sample in alone])


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Weights far from init, so that attention is far from uniform and a leak across samples is large."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1 + 0.1 * noise if "norm" in name else 0.3 * noise)
    return model.eval()


@pytest.fixture(params=["llama-sdpa", "llama-eager", "deepseek-v3"])
def any_model(request, tiny_llama, debug_policy, arithmetic_tokenizer):
    if request.param == "deepseek-v3":
        return randomize(copy.deepcopy(debug_policy))
    return randomize(tiny_llama(arithmetic_tokenizer, attention=request.param.removeprefix("llama-")))


@pytest.mark.parametrize("text_data", [False, True], ids=["prompt-completion", "text"])
def test_packed_loss_of_every_sample_equals_its_loss_alone(any_model, arithmetic_tokenizer, sft_config, text_data):
    data = arithmetic_dataset(24, seed=3)
    if text_data:  # language modelling: every token but a sample's first is a target
        data = Dataset.from_dict({"text": [p + c for p, c in zip(data["prompt"], data["completion"], strict=True)]})
    batch = packed_batch(any_model, arithmetic_tokenizer, data, sft_config)
    spans = sample_spans(batch)
    assert len(spans) > len(batch["input_ids"])  # several samples share a row
    packed = per_sample_losses(any_model, batch, spans)
    torch.testing.assert_close(packed, separate_losses(any_model, batch, spans), atol=1e-5, rtol=1e-5)

    row, a, b = spans[0]  # another first sample changes its own loss, and no other sample's
    perturbed = {k: v.clone() for k, v in batch.items()}
    perturbed["input_ids"][row, a:b] = torch.randint(3, len(arithmetic_tokenizer), (b - a,))
    after = per_sample_losses(any_model, perturbed, spans)
    assert (after[0] - packed[0]).abs() > 1e-2
    torch.testing.assert_close(after[1:], packed[1:], atol=1e-5, rtol=1e-5)


def test_trl_loss_on_a_packed_batch_is_the_mean_over_the_separate_samples(tiny_llama, arithmetic_tokenizer, sft_config):
    model = randomize(tiny_llama(arithmetic_tokenizer))
    args = sft_config(packing=True, per_device_train_batch_size=4)
    trainer = R1SFTTrainer(
        model=model, args=args, train_dataset=arithmetic_dataset(24, seed=3), processing_class=arithmetic_tokenizer
    )
    batch = next(iter(trainer.get_train_dataloader()))
    spans = sample_spans(batch)
    expected = separate_losses(model, batch, spans).sum() / (batch["labels"] != -100).sum()
    with torch.no_grad():
        assert trainer.compute_loss(model, dict(batch)).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("policy", [False, True], ids=["llama", "deepseek-v3"])
def test_packed_rows_train_on_completions_only(policy, tiny_llama, debug_policy, arithmetic_tokenizer, sft_config):
    tok = arithmetic_tokenizer
    model = copy.deepcopy(debug_policy) if policy else tiny_llama(tok)
    data = arithmetic_dataset(24, seed=3)
    eos = tok.eos_token
    completions = {p + c + eos: c + eos for p, c in zip(data["prompt"], data["completion"], strict=True)}
    batch = packed_batch(model, tok, data, sft_config)
    assert batch["input_ids"].shape == (4, 128)
    assert ("attention_mask" in batch) == policy
    spans = sample_spans(batch)
    for row, a, b in spans:
        ids, labelled = batch["input_ids"][row, a:b], batch["labels"][row, a:b] != -100
        assert tok.decode(ids[labelled]) == completions[tok.decode(ids)]
        assert batch["labels"][row, a:b][labelled].equal(ids[labelled])
    in_a_sample = torch.zeros_like(batch["labels"], dtype=torch.bool)
    for row, a, b in spans:
        in_a_sample[row, a:b] = True
    assert (batch["labels"][~in_a_sample] == -100).all()  # padding is never trained on


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_cut_samples_are_counted_in_one_warning(packing, arithmetic_tokenizer, tiny_llama, sft_config, caplog):
    tok = arithmetic_tokenizer
    data = arithmetic_dataset(8, seed=3)
    long_rows = {"prompt": ["Question: " + "1 + " * 40 + "1?\n"] * 2, "completion": ["<think> 41 </think>"] * 2}
    data = Dataset.from_dict({k: list(data[k]) + long_rows[k] for k in ("prompt", "completion")})
    with caplog.at_level(logging.WARNING, logger="r1kit.sft.data"):
        trainer = R1SFTTrainer(
            model=tiny_llama(tok), args=sft_config(packing=packing, max_length=64), train_dataset=data,
            processing_class=tok,
        )  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if r.name == "r1kit.sft.data"]
    assert len(warnings) == 1
    assert "2 of 10 samples are longer than max_length=64" in warnings[0]
    assert "2 of them lost every loss token and were dropped" in warnings[0]  # their prompts fill 64 tokens
    rows = trainer.train_dataset
    assert (sum(len(lengths) for lengths in rows["seq_lengths"]) if packing else len(rows)) == 8


def test_packing_settings_it_cannot_honour_are_refused(arithmetic_tokenizer, tiny_llama, sft_config):
    data = arithmetic_dataset(8, seed=3)
    for overrides, message in [
        (dict(packing_strategy="wrapped"), "packing_strategy='wrapped'"),
        (dict(max_length=None), "packing needs max_length"),
    ]:
        with pytest.raises(ConfigError, match=message):
            R1SFTTrainer(model=tiny_llama(arithmetic_tokenizer), args=sft_config(packing=True, **overrides),
                         train_dataset=data, processing_class=arithmetic_tokenizer)  # fmt: skip
