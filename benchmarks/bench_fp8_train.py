"""FP8 versus FP32 training loss of the DeepSeek-V3 policy (`tiny` preset) on the arithmetic SFT task.

Trains pairs of runs on the same batches in the same order, the two runs of a pair from the same
initial weights:
- FP32: every GEMM in float32;
- FP8: `config.fp8` on (policy/fp8_policy.py): every projection and routed expert runs its three
  GEMMs (forward, input gradient, weight gradient) in block-scaled E4M3 (1 x 128 activation tiles,
  128 x 128 weight blocks), emulated exactly on CPU; embedding, output head, routers, norms,
  attention core and the MTP eh_proj stay in float32, as do master weights and AdamW state.
  `--no-dgrad-in-fp8` / `--no-wgrad-in-fp8` keep a backward GEMM in float32.
The first pair starts from the seeded initialisation (init 0), the `inits - 1` others from it
multiplied by (1 + 1e-3 N(0, 1)): their FP32 runs show how far two runs drift apart for reasons
that have nothing to do with FP8 (the resolution of the comparison), their FP8 runs whether the
FP8 gap holds from every start.
All optimise what SFT optimises (next-token cross-entropy on the solution tokens plus the MoE
balance loss and the MTP loss) with AdamW, warm-up + cosine decay, and the routing-bias update
after every optimizer step.

Prints the exact settings, the losses along the way and the relative loss error DeepSeek-V3
reports (< 0.25% for FP8 against BF16): (mean L - mean L_fp32) / mean L_fp32 over the last 10%
of steps (signed: + is a higher FP8 loss), and the largest per-step |L - L_fp32| / L_fp32 there.
Probes, on the first initialisation, split a gap into FP8 arithmetic and training drifting apart:
- same weights: the FP8 model's loss with the FP32 run's weights on the same batch, every
  `probe_every` steps (the FP8 forward alone);
- final weights: both trained models evaluated, without updates, on the last 10% of batches
  with the FP32 forward and with the FP8 forward, which splits the final gap into what the FP8
  forward costs and what FP8 training did to the weights.

    python3 -m benchmarks.bench_fp8_train [--steps 300 --batch 16 --lr 3e-4 --threads 1]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from r1kit.policy import DeepseekV3ForCausalLM, preset_config
from r1kit.policy.fp8_gemm import FP8Config, select_backend
from r1kit.recipes.embedded import task_tokenizer
from r1kit.recipes.tasks.arithmetic import arithmetic_splits

IGNORE = -100


@dataclass(frozen=True)
class TrainSettings:
    """One comparison, shared by all runs: model preset, data, optimiser, FP8 block, probes.

    lr: peak AdamW learning rate, reached after `warmup` (a fraction of the steps), then cosine
    decay to `final_lr_ratio` * lr. problems: distinct arithmetic problems, cycled in a seeded
    order. inits: FP32/FP8 pairs, from the seeded initialisation and `inits - 1` perturbed copies
    of it; perturbation: relative size of that initial-weight noise (the run-to-run probe).
    dgrad_in_fp8, wgrad_in_fp8: as in FP8Config (False keeps that backward GEMM in float32).
    """

    preset: str = "tiny"
    steps: int = 300
    batch: int = 16
    lr: float = 3e-4
    warmup: float = 0.05
    final_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    problems: int = 2000
    seed: int = 0
    block_size: int = 128
    perturbation: float = 1e-3
    inits: int = 3
    probe_every: int = 10
    dgrad_in_fp8: bool = True
    wgrad_in_fp8: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "problems", "block_size", "inits", "probe_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainSettings.{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and self.grad_clip > 0):
            raise ValueError(f"TrainSettings.lr and grad_clip must be > 0, got {self.lr}, {self.grad_clip}")

    def fp8_recipe(self) -> FP8Config:
        """DeepSeek-V3's recipe at `block_size`, with the backward GEMMs in FP8 as asked."""
        return FP8Config(block_size=self.block_size, dgrad_in_fp8=self.dgrad_in_fp8, wgrad_in_fp8=self.wgrad_in_fp8)


@dataclass
class Batch:
    """input_ids, attention_mask, labels (B, T); right-padded, labels IGNORE on prompt and padding."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def sft_batches(settings: TrainSettings) -> tuple[list[Batch], int]:
    """`settings.steps` batches of arithmetic problems in a seeded order, and the vocabulary size."""
    train, _ = arithmetic_splits(settings.problems, 1, seed=settings.seed)
    tokenizer = task_tokenizer(train)
    rows = []
    for prompt, completion in zip(train["prompt"], train["completion"], strict=True):
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = tokenizer(completion)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids))
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.cat([torch.randperm(len(rows), generator=generator) for _ in range(_epochs(settings))])
    batches = [
        _collate([rows[i] for i in order[step * settings.batch : (step + 1) * settings.batch].tolist()])
        for step in range(settings.steps)
    ]
    return batches, len(tokenizer)


def _epochs(settings: TrainSettings) -> int:
    return math.ceil(settings.steps * settings.batch / settings.problems)


def _collate(rows: list[tuple[list[int], list[int]]]) -> Batch:
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE)
    for i, (ids, targets) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, : len(ids)] = torch.tensor(targets)
    return Batch(input_ids, attention_mask, labels)


def initial_models(
    settings: TrainSettings, vocab_size: int, init: int = 0
) -> tuple[DeepseekV3ForCausalLM, DeepseekV3ForCausalLM]:
    """(FP32 model, FP8 model) with identical initial weights: the seeded initialisation for
    `init` 0, that initialisation times (1 + perturbation N(0, 1)) drawn with seed `seed + init` else."""
    torch.manual_seed(settings.seed)
    reference = DeepseekV3ForCausalLM(preset_config(settings.preset, vocab_size=vocab_size))
    if init:
        reference = perturbed(reference, settings.perturbation, settings.seed + init)
    fp8 = copy.deepcopy(reference)
    fp8.enable_fp8(settings.fp8_recipe())
    return reference, fp8


def perturbed(model: DeepseekV3ForCausalLM, scale: float, seed: int) -> DeepseekV3ForCausalLM:
    """A copy with every parameter multiplied by (1 + scale * N(0, 1)), drawn with `seed`."""
    copied = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in copied.parameters():
            parameter.mul_(1 + scale * torch.randn(parameter.shape, generator=generator))
    return copied


def step_loss(model: DeepseekV3ForCausalLM, batch: Batch) -> torch.Tensor:
    """The SFT objective: next-token CE on the solution tokens + balance loss + MTP loss."""
    return model(batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss


class SameWeightsProbe:
    """Every `every` steps, the FP8 model's loss on the batch of that step with the weights of the
    run being trained (loaded before its optimizer step): FP8 numerics without training divergence."""

    def __init__(self, fp8_model: DeepseekV3ForCausalLM, every: int) -> None:
        self.model, self.every = fp8_model, every
        self.losses: dict[int, float] = {}

    def __call__(self, step: int, model: DeepseekV3ForCausalLM, batch: Batch) -> None:
        if step % self.every == 0:
            self.model.load_state_dict(model.state_dict())
            self.losses[step] = mean_loss(self.model, [batch])


def train(
    model: DeepseekV3ForCausalLM,
    batches: list[Batch],
    settings: TrainSettings,
    before_step: Callable[[int, DeepseekV3ForCausalLM, Batch], None] | None = None,
) -> list[float]:
    """AdamW over `batches`; returns the loss of every step. Leaves the last step's gradients in place."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, settings))
    losses = []
    for step, batch in enumerate(batches):
        if before_step is not None:
            before_step(step, model, batch)
        loss = step_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        schedule.step()
        model.update_routing_bias()
        losses.append(loss.item())
    return losses


def lr_factor(step: int, settings: TrainSettings) -> float:
    """Linear warm-up over the first `warmup` of the steps, then cosine decay to `final_lr_ratio`."""
    warmup = max(1, round(settings.warmup * settings.steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, settings.steps - warmup)
    return settings.final_lr_ratio + (1 - settings.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def relative_errors(losses: Sequence[float], reference: Sequence[float]) -> tuple[float, float]:
    """Over the last 10% of steps: ((mean(losses) - mean(reference)) / mean(reference), signed,
    and the largest per-step |loss - reference| / reference)."""
    window = max(1, len(reference) // 10)
    ours, ref = losses[-window:], reference[-window:]
    mean_error = (sum(ours) - sum(ref)) / sum(ref)
    return mean_error, max(abs(a - b) / b for a, b in zip(ours, ref, strict=True))


def mean_loss(model: DeepseekV3ForCausalLM, batches: Sequence[Batch]) -> float:
    """The training objective averaged over `batches`, without gradients or updates."""
    model.train()
    with torch.no_grad():  # no gradients: no routing counts are recorded either
        return sum(step_loss(model, batch).item() for batch in batches) / len(batches)


def cross_evaluation(
    trained: dict[str, DeepseekV3ForCausalLM], batches: Sequence[Batch]
) -> dict[tuple[str, str], float]:
    """{(weights, forward): mean loss}: every trained model's final weights under every trained
    model's arithmetic (keys of `trained`, e.g. "fp32" and "fp8"), on `batches`."""
    forwards = {name: copy.deepcopy(model) for name, model in trained.items()}
    losses = {}
    for weights, weights_model in trained.items():
        for forward, forward_model in forwards.items():
            forward_model.load_state_dict(weights_model.state_dict())
            losses[(weights, forward)] = mean_loss(forward_model, batches)
    return losses


def main() -> None:
    settings, threads = parse_settings()
    if threads is not None:
        torch.set_num_threads(threads)
    batches, vocab_size = sft_batches(settings)
    tokens = sum(int((b.labels != IGNORE).sum()) for b in batches)
    print(f"settings: {settings}")
    print(f"vocab {vocab_size}, {tokens} target tokens over {settings.steps} steps, {torch.get_num_threads()} threads")
    losses: dict[tuple[str, int], list[float]] = {}
    for init in range(settings.inits):
        reference, fp8 = initial_models(settings, vocab_size, init)
        if init == 0:
            recipe = fp8.config.fp8_recipe()
            print(f"FP8 recipe {fp8.config.fp8}, back end {select_backend(recipe, torch.device('cpu'))}")
            probe, first = SameWeightsProbe(copy.deepcopy(fp8), settings.probe_every), (reference, fp8)
        for name, model in (("fp32", reference), ("fp8", fp8)):
            start = time.perf_counter()
            losses[(name, init)] = train(model, batches, settings, probe if (name, init) == ("fp32", 0) else None)
            print(f"trained {name} from init {init}: {time.perf_counter() - start:.0f} s", flush=True)
    window = batches[-max(1, settings.steps // 10) :]
    report(settings, losses, probe.losses, cross_evaluation(dict(zip(("fp32", "fp8"), first, strict=True)), window))


def parse_settings() -> tuple[TrainSettings, int | None]:
    """TrainSettings from the command line (one flag per field), and --threads."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in asdict(TrainSettings()).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = vars(parser.parse_args())
    threads = args.pop("threads")
    return TrainSettings(**args), threads


def report(
    settings: TrainSettings,
    losses: dict[tuple[str, int], list[float]],
    probed: dict[int, float],
    final: dict[tuple[str, str], float],
) -> None:
    """Loss table, FP8 and run-to-run relative errors over the last 10% of steps, the probes."""
    fp32 = losses[("fp32", 0)]
    print(
        "step" + "".join(f"{f'{name} init {init}':>16s}" for name, init in losses) + f"{'fp8 fwd, fp32 weights':>26s}"
    )
    for step in [*range(0, settings.steps, max(settings.steps // 10, 1)), settings.steps - 1]:
        probe = f"{probed[step]:.4f} ({(probed[step] - fp32[step]) / fp32[step]:+.2%})" if step in probed else ""
        print(f"{step:4d}" + "".join(f"{run[step]:16.4f}" for run in losses.values()) + f"{probe:>26s}")
    window = max(1, settings.steps // 10)
    print(f"relative loss error over the last {window} steps (of the mean loss, signed; largest at one step):")
    gaps = []
    for init in range(settings.inits):
        mean, worst = relative_errors(losses[("fp8", init)], losses[("fp32", init)])
        gaps.append(mean)
        print(f"  FP8 vs FP32, both from init {init}:{'':14s}{mean:+.3%}  {worst:.3%}  (DeepSeek-V3: < 0.25%)")
    for init in range(1, settings.inits):
        mean, worst = relative_errors(losses[("fp32", init)], fp32)
        print(f"  FP32 from init {init} vs FP32 from init 0:{'':7s}{mean:+.3%}  {worst:.3%}  (run-to-run noise)")
    if settings.inits > 1:
        spread = statistics.stdev(gaps)
        print(
            f"  FP8 vs FP32 over {settings.inits} inits: mean {statistics.mean(gaps):+.3%}, standard deviation "
            f"{spread:.3%}, standard error of the mean {spread / math.sqrt(settings.inits):.3%}"
        )
    errors = [(loss - fp32[step]) / fp32[step] for step, loss in probed.items()]
    print(
        f"same weights, FP8 vs FP32 forward on the FP32 run's weights every {settings.probe_every} steps: "
        f"mean {sum(errors) / len(errors):+.3%}, largest {max(errors, key=abs):+.3%}"
    )
    base = final[("fp32", "fp32")]
    print(f"final weights (init 0) on the last {window} batches, mean loss (relative to FP32 weights, FP32 forward):")
    print(f"  {'':22s}{'FP32 forward':>22s}{'FP8 forward':>22s}")
    for weights in ("fp32", "fp8"):
        cells = [f"{final[(weights, f)]:.5f} ({(final[(weights, f)] - base) / base:+.3%})" for f in ("fp32", "fp8")]
        print(f"  {weights.upper() + '-trained weights':22s}" + "".join(f"{cell:>22s}" for cell in cells))


if __name__ == "__main__":
    main()
