"""Packed rows: attention one sequence at a time (SegmentLayout) against the dense block-diagonal mask.

The training forward + backward of our "tiny" DeepSeek-V3 (the embedded
default, random init, fp32, MTP loss on) over B packed rows of T tokens, each
row filled with samples of random lengths around `--sample-length` (uniform in
0.5x..1.5x, positions restarting at 0, the last one cut at the row's end), as
SFT packing lays them out:

    dense     every attention layer under `build_attention_mask`'s (B, 1, T, T)
              block-diagonal causal mask (cost ~ B T^2 per layer)
    segments  `attention_layout`, which takes `SegmentLayout` (each sample one
              batch entry over its own keys, cost ~ sum of length^2) wherever it
              models at most half the dense work, and the dense mask elsewhere:
              what the model does by default

"chosen" says which of the two `attention_layout` picks for those rows. Both
passes run in this process on the same model and inputs, taking turns; times
are medians of `--repeats` runs after one warm-up.

    python -m benchmarks.bench_segment_attention [--rows 4] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from unittest import mock

import torch

from r1kit.policy import modeling
from r1kit.policy.attention import attention_layout, build_attention_mask
from r1kit.policy.segment_attention import SegmentLayout
from r1kit.recipes.embedded import embedded_policy, task_tokenizer
from r1kit.recipes.tasks.arithmetic import arithmetic_dataset

SETTINGS = ((512, 64), (1024, 128), (1024, 256), (2048, 256), (400, 40))  # (row length T, mean sample length)


def packed_positions(rows: int, length: int, sample_length: int, rng: random.Random) -> torch.Tensor:
    """(rows, length) position ids of rows filled with samples of sample_length/2 .. 3 sample_length/2 tokens."""
    positions = []
    for _ in range(rows):
        row: list[int] = []
        while len(row) < length:
            row += range(min(rng.randint(sample_length // 2, 3 * sample_length // 2), length - len(row)))
        positions.append(row)
    return torch.tensor(positions)


def dense_only(attention_mask, past_length, query_length, position_ids=None, sequences=None):
    return build_attention_mask(attention_mask, past_length, query_length, position_ids, sequences)


def training_pass(model: modeling.DeepseekV3ForCausalLM, ids: torch.Tensor, positions: torch.Tensor) -> None:
    model(ids, position_ids=positions, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4, help="B: packed rows per forward")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = arithmetic_dataset(200, seed=0)
    torch.manual_seed(0)
    model = embedded_policy(task_tokenizer(rows)).train()
    print(
        f"tiny DeepSeek-V3 ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, fp32, training "
        f"forward + backward with MTP loss), {args.rows} packed rows; median of {args.repeats} runs, torch threads "
        f"{torch.get_num_threads()}, torch {torch.__version__}"
    )
    print(f"{'row length':>10} {'samples':>9} | {'dense':>8} | {'segments':>8} {'chosen':>9} | speed-up")
    rng = random.Random(0)
    for length, sample_length in SETTINGS:
        positions = packed_positions(args.rows, length, sample_length, rng)
        ids = torch.randint(3, model.config.vocab_size, positions.shape)
        chosen = "segments" if isinstance(attention_layout(None, 0, length, positions), SegmentLayout) else "dense"
        times: dict[str, list[float]] = {"dense": [], "segments": []}
        for round_ in range(args.repeats + 1):
            for name in times:
                layout = dense_only if name == "dense" else attention_layout
                with mock.patch.object(modeling, "attention_layout", layout):
                    start = time.perf_counter()
                    training_pass(model, ids, positions)
                    if round_ > 0:
                        times[name].append(time.perf_counter() - start)
        dense, segments = (statistics.median(times[name]) for name in ("dense", "segments"))
        print(
            f"{length:>10} {f'~{sample_length}':>9} | {dense:7.3f}s | {segments:7.3f}s {chosen:>9} | "
            f"{dense / segments:.2f}x"
        )


if __name__ == "__main__":
    main()
