"""A few steps of benchmarks/bench_fp8_train.py's FP32-versus-FP8 comparison at toy size."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from benchmarks.bench_fp8_train import (
    SameWeightsProbe,
    TrainSettings,
    cross_evaluation,
    initial_models,
    mean_loss,
    parse_settings,
    relative_errors,
    report,
    sft_batches,
    train,
)
from r1kit.policy.fp8_policy import fp8_layer_names

# 16-wide blocks so that the toy model's GEMMs span several tiles, as the tiny preset's do at 128
SETTINGS = TrainSettings(preset="tiny-debug", steps=8, batch=4, lr=3e-3, problems=40, block_size=16, probe_every=2)


def test_fp8_training_tracks_fp32_and_trains_every_fp8_layer():
    batches, vocab_size = sft_batches(SETTINGS)
    reference, fp8 = initial_models(SETTINGS, vocab_size)
    probe = SameWeightsProbe(copy.deepcopy(fp8), SETTINGS.probe_every)
    fp32_losses = train(reference, batches, SETTINGS, before_step=probe)
    fp8_losses = train(fp8, batches, SETTINGS)

    for losses in (fp32_losses, fp8_losses):
        assert all(math.isfinite(loss) for loss in losses)
        assert sum(losses[-3:]) < sum(losses[:3]) - 1.0  # it learns
    assert fp8_losses != fp32_losses  # the FP8 run did compute differently
    assert max(abs(a - b) / b for a, b in zip(fp8_losses, fp32_losses, strict=True)) < 0.02
    mean_error, step_error = relative_errors(fp8_losses, fp32_losses)
    assert abs(mean_error) <= step_error < 0.02
    # same weights, same batch: the FP8 forward alone moves the loss by far less than 1%
    assert sorted(probe.losses) == [0, 2, 4, 6]
    assert probe.losses[0] == fp8_losses[0]  # step 0: the FP8 run itself, before any update
    assert all(0 < abs(loss - fp32_losses[step]) / fp32_losses[step] < 3e-3 for step, loss in probe.losses.items())

    # final weights under both forwards: the diagonal is each trained model as it is
    final = cross_evaluation({"fp32": reference, "fp8": fp8}, batches[-2:])
    assert final[("fp32", "fp32")] == mean_loss(reference, batches[-2:])
    assert final[("fp8", "fp8")] == mean_loss(fp8, batches[-2:])
    assert final[("fp32", "fp8")] != final[("fp32", "fp32")] and final[("fp8", "fp32")] != final[("fp8", "fp8")]

    layers = fp8_layer_names(fp8)
    assert len(layers) == 26  # attention x3 layers, dense MLP, experts and shared experts x2
    for name in layers:
        for parameter_name, parameter in fp8.get_submodule(name).named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"{name}.{parameter_name}"


def test_command_line_sets_every_field_and_the_backward_gemms(monkeypatch):
    monkeypatch.setattr("sys.argv", ["bench", "--steps", "7", "--no-wgrad-in-fp8", "--threads", "1"])
    settings, threads = parse_settings()
    assert (settings.steps, settings.dgrad_in_fp8, settings.wgrad_in_fp8, threads) == (7, True, False, 1)
    assert settings.fp8_recipe().wgrad_in_fp8 is False and settings.fp8_recipe().block_size == 128
    with pytest.raises(ValueError, match=r"TrainSettings\.steps"):
        TrainSettings(steps=0)


def test_further_initialisations_are_small_perturbations_shared_by_the_pair():
    _, vocab_size = sft_batches(SETTINGS)
    first, _ = initial_models(SETTINGS, vocab_size)
    reference, fp8 = initial_models(SETTINGS, vocab_size, init=1)
    assert fp8.config.fp8 is not None and reference.config.fp8 is None
    for (name, weight), base, fp8_weight in zip(
        reference.state_dict().items(), first.state_dict().values(), fp8.state_dict().values(), strict=True
    ):
        assert torch.equal(weight, fp8_weight), name
        if weight.is_floating_point() and base.abs().sum() > 0:
            change = ((weight - base).norm() / base.norm()).item()
            assert 1e-4 < change < 1e-2, name


def test_report_prints_every_pair_and_the_spread_over_inits(capsys):
    settings = TrainSettings(steps=10, inits=2, probe_every=5)
    losses = {
        ("fp32", 0): [2.0] * 10,
        ("fp8", 0): [2.02] * 10,  # +1%
        ("fp32", 1): [1.99] * 10,
        ("fp8", 1): [2.0] * 10,  # +0.5025%
    }
    final = {(w, f): 1.0 for w in ("fp32", "fp8") for f in ("fp32", "fp8")}
    report(settings, losses, {0: 2.004, 5: 1.998}, final)
    out = capsys.readouterr().out
    assert "both from init 0:              +1.000%" in out and "both from init 1:              +0.503%" in out
    assert "FP32 from init 1 vs FP32 from init 0:       -0.500%" in out
    assert "over 2 inits: mean +0.751%" in out
    assert "mean +0.050%, largest +0.200%" in out
