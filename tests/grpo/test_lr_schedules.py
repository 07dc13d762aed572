"""DeepSeek LLM's multi-step schedule: against the paper's rule, as a LambdaLR, in the config, GRPO and SFT."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from transformers import get_scheduler

from r1kit.grpo.config import GRPOConfig
from r1kit.grpo.lr_schedules import DEFAULT_MILESTONES, LR_SCHEDULES, multi_step_factor, multi_step_schedule
from r1kit.grpo.options import ConfigError
from r1kit.recipes import pipeline
from r1kit.recipes.arguments import RecipeArguments, parse_arguments
from r1kit.recipes.tasks.arithmetic import arithmetic_dataset
from r1kit.sft.trainer import PolicySFTTrainer

SIZES = [(1, 0), (3, 1), (10, 0), (10, 2), (37, 5), (70, 7), (123, 0), (1000, 100)]  # (total_steps, warmup_steps)


def paper_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """DeepSeek LLM, section 2.3, line by line; fractions of T in integer arithmetic so that they are exact."""
    if step < warmup_steps:
        return step / warmup_steps  # linear warm-up, transformers' convention
    elif 10 * step < 8 * total_steps:  # step < 0.8 T: the peak
        return 1.0
    elif 10 * step < 9 * total_steps:  # step < 0.9 T: 31.6% of the peak
        return 0.316
    else:  # 10% of the peak
        return 0.1


def sgd(lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=lr)


@pytest.mark.parametrize(("total_steps", "warmup_steps"), SIZES)
def test_factor_is_the_papers_rule_at_every_step(total_steps, warmup_steps):
    for step in range(total_steps + 3):
        expected = paper_factor(step, total_steps, warmup_steps)
        assert multi_step_factor(step, total_steps=total_steps, warmup_steps=warmup_steps) == expected, step


@pytest.mark.parametrize(("total_steps", "warmup_steps"), SIZES)
def test_lambda_lr_gives_peak_times_factor_at_every_step_and_survives_a_checkpoint(total_steps, warmup_steps):
    peak = 3e-4
    optimizer = sgd(peak)
    scheduler = multi_step_schedule(optimizer, total_steps=total_steps, warmup_steps=warmup_steps)
    halfway = total_steps // 2
    for step in range(total_steps + 3):
        expected = peak * paper_factor(step, total_steps, warmup_steps)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=0), step
        assert scheduler.get_last_lr() == [optimizer.param_groups[0]["lr"]]
        if step == halfway:
            buffer = io.BytesIO()
            torch.save(scheduler.state_dict(), buffer)
            state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
        optimizer.step()
        scheduler.step()

    resumed_optimizer = sgd(peak)
    resumed = multi_step_schedule(resumed_optimizer, total_steps=total_steps, warmup_steps=warmup_steps)
    resumed.load_state_dict(state)
    resumed_optimizer.step()
    resumed.step()
    expected = peak * paper_factor(halfway + 1, total_steps, warmup_steps)
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.parametrize("warmup_steps", [1, 4, 9])
def test_warm_up_is_transformers_constant_with_warmup(warmup_steps):
    constant = get_scheduler("constant_with_warmup", sgd(1.0), num_warmup_steps=warmup_steps).lr_lambdas[0]
    for step in range(warmup_steps + 1):
        assert multi_step_factor(step, total_steps=100, warmup_steps=warmup_steps) == constant(step)


def test_custom_milestones():
    def factors(milestones, total_steps=10, warmup_steps=0):
        return [
            multi_step_factor(s, total_steps=total_steps, warmup_steps=warmup_steps, milestones=milestones)
            for s in range(total_steps + 1)
        ]

    assert factors(()) == [1.0] * 11  # no milestone: constant after the warm-up
    assert factors(((0.5, 0.5),)) == [1.0] * 5 + [0.5] * 6
    assert factors(((0.7, 0.25), (1.0, 0.01))) == [1.0] * 7 + [0.25] * 3 + [0.01]
    assert factors(((0.55, 0.25),), total_steps=100) == [1.0] * 55 + [0.25] * 46  # 0.55 * 100 > 55 in floating point
    assert factors(((0.2, 0.5),), warmup_steps=4) == [0.0, 0.25, 0.5, 0.75] + [0.5] * 7  # the warm-up comes first


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"total_steps": 0}, r"total_steps must be >= 1, got 0"),
        ({"warmup_steps": -1}, r"warmup_steps must be >= 0, got -1"),
        ({"milestones": ((0.0, 0.5),)}, r"milestone fraction must be in \(0, 1\], got 0.0"),
        ({"milestones": ((1.5, 0.5),)}, r"milestone fraction must be in \(0, 1\], got 1.5"),
        ({"milestones": ((0.5, 0.0),)}, r"milestone multiplier must be in \(0, 1\], got 0.0"),
        ({"milestones": ((0.5, 2.0),)}, r"milestone multiplier must be in \(0, 1\], got 2.0"),
        ({"milestones": ((0.9, 0.1), (0.8, 0.316))}, r"strictly increasing, got \[0.9, 0.8\]"),
        ({"milestones": ((0.5, 0.5), (0.5, 0.1))}, r"strictly increasing, got \[0.5, 0.5\]"),
    ],
)
def test_bad_inputs_name_the_problem(kwargs, message):
    arguments = {"total_steps": 10, "warmup_steps": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        multi_step_factor(0, **arguments)
    with pytest.raises(ValueError, match=message):
        multi_step_schedule(sgd(1.0), **arguments)


def test_grpo_config_accepts_multi_step_and_rejects_bad_milestones():
    config = GRPOConfig(lr_schedule="multi_step")
    assert config.lr_milestones == [0.8, 0.316, 0.9, 0.1] and config.lr_milestone_pairs == DEFAULT_MILESTONES
    assert GRPOConfig(lr_milestones=[0.5, 0.2]).lr_milestone_pairs == ((0.5, 0.2),)
    with pytest.raises(
        ConfigError, match=r"unknown lr_schedule 'step'; known: \['constant', 'cosine', 'linear', 'multi_step'\]"
    ):
        GRPOConfig(lr_schedule="step")
    with pytest.raises(ConfigError, match=r"lr_milestones must be \(fraction, multiplier\) pairs, got \[0.8\]"):
        GRPOConfig(lr_milestones=[0.8])
    with pytest.raises(ConfigError, match=r"lr_milestones: milestone fractions must be strictly increasing"):
        GRPOConfig(lr_milestones=[0.9, 0.1, 0.8, 0.316])
    with pytest.raises(ConfigError, match=r"lr_milestones: milestone multiplier must be in \(0, 1\], got 0"):
        GRPOConfig(lr_milestones=[0.8, 0])


def test_schedule_and_milestones_from_flags_and_yaml(tmp_path):
    flags = "--lr_schedule multi_step --lr_milestones 0.5 0.3 0.75 0.05 --sft_lr_schedule multi_step"
    args, config = parse_arguments("grpo_math", flags.split())
    assert config.lr_schedule == "multi_step" and config.lr_milestone_pairs == ((0.5, 0.3), (0.75, 0.05))
    assert args.sft_lr_schedule == "multi_step"
    user_config = tmp_path / "my.yaml"
    user_config.write_text("lr_schedule: multi_step\nlr_milestones: [0.6, 0.5]\n")
    _, config = parse_arguments("grpo_math", ["--config", str(user_config)])
    assert config.lr_milestone_pairs == ((0.6, 0.5),)
    with pytest.raises(ConfigError, match="--sft_lr_schedule must be cosine, constant or multi_step, got 'step'"):
        RecipeArguments(sft_lr_schedule="step")


def test_grpo_trainer_follows_the_multi_step_schedule(make_trainer):
    trainer = make_trainer(lr_schedule="multi_step", warmup_steps=2, max_steps=5, beta=0.0, learning_rate=1e-2)
    trainer.train()
    metrics = (Path(trainer.config.output_dir) / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line)["lr"] for line in metrics]  # step k: the rate its update used
    assert logged == pytest.approx([1e-2 * paper_factor(k, 5, 2) for k in range(5)], rel=1e-12)
    assert logged == pytest.approx([0.0, 5e-3, 1e-2, 1e-2, 3.16e-3], rel=1e-12)


@pytest.mark.parametrize(
    ("name", "transformers_name"), [("constant", "constant_with_warmup"), ("cosine", "cosine"), ("linear", "linear")]
)
def test_constant_linear_and_cosine_are_transformers_schedules(name, transformers_name):
    ours = LR_SCHEDULES[name](sgd(1.0), total_steps=10, warmup_steps=2, milestones=DEFAULT_MILESTONES)
    theirs = get_scheduler(transformers_name, sgd(1.0), num_warmup_steps=2, num_training_steps=10)
    for step in range(12):
        assert ours.lr_lambdas[0](step) == theirs.lr_lambdas[0](step), step


def test_sft_follows_the_multi_step_schedule(debug_policy, arithmetic_tokenizer, sft_config):
    args = sft_config(
        steps=10, warmup_steps=2, learning_rate=1e-3, lr_scheduler_type="constant_with_warmup",
        per_device_train_batch_size=4,
    )  # fmt: skip
    trainer = PolicySFTTrainer(
        model=copy.deepcopy(debug_policy).train(),
        args=args,
        train_dataset=arithmetic_dataset(40, seed=1),
        processing_class=arithmetic_tokenizer,
        lr_milestones=DEFAULT_MILESTONES,
    )
    trainer.train()
    logged = {entry["step"]: entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry}
    assert sorted(logged) == list(range(1, 11))
    for step, lr in logged.items():  # Trainer logs the rate that update `step` (1-based) used
        assert lr == pytest.approx(1e-3 * paper_factor(step - 1, 10, 2), rel=1e-12), step


@pytest.mark.parametrize(
    ("schedule", "scheduler_type", "milestones"),
    [
        ("cosine", "cosine", None),
        ("constant", "constant_with_warmup", None),
        ("multi_step", "constant_with_warmup", ((0.5, 0.2),)),
    ],
)
def test_warm_start_passes_the_sft_schedule(schedule, scheduler_type, milestones, monkeypatch, tmp_path):
    calls = []

    def run_sft(model, tokenizer, train, sft_args, output_dir, *, lr_milestones):
        calls.append((sft_args, lr_milestones))

    monkeypatch.setattr(pipeline, "run_sft", run_sft)
    args = RecipeArguments(
        sft="always",
        embedded_preset="tiny-debug",
        sft_max_steps=5,
        sft_lr_schedule=schedule,
        cache_dir=str(tmp_path / "cache"),
    )
    config = GRPOConfig(lr_milestones=[0.5, 0.2], output_dir=str(tmp_path / "run"))
    pipeline.warm_start(args, config, arithmetic_dataset(40, seed=1), Accelerator(cpu=True))
    ((sft_args, lr_milestones),) = calls
    assert sft_args.lr_scheduler_type == scheduler_type and lr_milestones == milestones
