"""Learning-rate schedules, registered by name: constant, linear, cosine and DeepSeek LLM's multi-step.

Each is a multiplier of the peak rate at optimizer step s (0-based, as torch's
LambdaLR counts), with a linear warm-up over the first W steps in transformers'
convention (`get_constant_schedule_with_warmup`): factor s / W for s < W, so the
first step trains at rate 0 and step W reaches the peak.

DeepSeek LLM (DeepSeek-AI 2024, arXiv 2401.02954, section 2.3) trains with a
multi-step schedule over T steps: after the warm-up the rate stays at the peak,
drops to 31.6% of it at 80% of training and to 10% at 90%:

    factor(s) = s / W      if s < W
                1          if s < 0.8 T
                0.316      if s < 0.9 T
                0.1        otherwise

`milestones` generalises the two drops: (fraction, multiplier) pairs with
strictly increasing fractions; after the warm-up the factor is the multiplier
of the last milestone with s / T >= fraction, else 1. The default is the
paper's ((0.8, 0.316), (0.9, 0.1)). The paper places the drops by training
tokens; here they are placed by optimizer steps, the same at a fixed batch size.

Schedules are registered in `LR_SCHEDULES`:
`LR_SCHEDULES["multi_step"](optimizer, total_steps=T, warmup_steps=W, milestones=...)`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from r1kit.grpo.registry import Registry

Milestones = tuple[tuple[float, float], ...]  # (fraction of total_steps, multiplier of the peak rate)
DEFAULT_MILESTONES: Milestones = ((0.8, 0.316), (0.9, 0.1))

# fn(optimizer, *, total_steps, warmup_steps, milestones) -> scheduler stepped once per optimizer step
LR_SCHEDULES: Registry[Callable[..., LRScheduler]] = Registry("lr_schedule")


def check_milestones(milestones: Milestones) -> None:
    """Raise a ValueError unless fractions are strictly increasing in (0, 1] and multipliers are in (0, 1]."""
    previous = 0.0
    for fraction, multiplier in milestones:
        if not 0 < fraction <= 1:
            raise ValueError(f"milestone fraction must be in (0, 1], got {fraction}")
        if not 0 < multiplier <= 1:
            raise ValueError(f"milestone multiplier must be in (0, 1], got {multiplier}")
        if fraction <= previous:
            raise ValueError(f"milestone fractions must be strictly increasing, got {[f for f, _ in milestones]}")
        previous = fraction


def multi_step_factor(
    step: int, *, total_steps: int, warmup_steps: int, milestones: Milestones = DEFAULT_MILESTONES
) -> float:
    """Multiplier of the peak rate at 0-based optimizer step `step` (formula in the module docstring).

    >>> [multi_step_factor(s, total_steps=10, warmup_steps=2) for s in range(10)]
    [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.316, 0.1]
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    check_milestones(milestones)
    if step < warmup_steps:
        return step / warmup_steps
    factor = 1.0
    for fraction, multiplier in milestones:
        if step / total_steps >= fraction:  # not step >= fraction * total_steps: 0.55 * 100 is 55.00000000000001
            factor = multiplier
    return factor


@LR_SCHEDULES.register("multi_step")
def multi_step_schedule(
    optimizer: Optimizer, *, total_steps: int, warmup_steps: int, milestones: Milestones = DEFAULT_MILESTONES
) -> LambdaLR:
    """DeepSeek LLM's multi-step schedule; a `partial`, not a lambda, so that the scheduler pickles."""
    factor = partial(multi_step_factor, total_steps=total_steps, warmup_steps=warmup_steps, milestones=milestones)
    return LambdaLR(optimizer, factor)  # evaluates step 0, which validates the arguments


@LR_SCHEDULES.register("constant")
def constant_schedule(
    optimizer: Optimizer, *, total_steps: int, warmup_steps: int, milestones: Milestones = DEFAULT_MILESTONES
) -> LambdaLR:
    """Warm-up, then the peak rate; `total_steps` and `milestones` are unused."""
    return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps)


@LR_SCHEDULES.register("cosine")
def cosine_schedule(
    optimizer: Optimizer, *, total_steps: int, warmup_steps: int, milestones: Milestones = DEFAULT_MILESTONES
) -> LambdaLR:
    """Warm-up, then a half cosine from the peak to 0 at `total_steps`; `milestones` is unused."""
    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


@LR_SCHEDULES.register("linear")
def linear_schedule(
    optimizer: Optimizer, *, total_steps: int, warmup_steps: int, milestones: Milestones = DEFAULT_MILESTONES
) -> LambdaLR:
    """Warm-up, then a straight line from the peak to 0 at `total_steps` (transformers' default); `milestones`
    is unused."""
    return get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
