"""Parameter memory per rank under FSDP2 + expert parallelism against DDP (a full replica on every rank).

For N = 1, 2, 4 CPU processes over gloo, each layout in its own group of N fresh
processes: every rank builds our DeepSeek-V3 on the meta device, then either
`parallelize(model, build_mesh(ep=N))` (policy/parallelize.py: experts split over
all N ranks, everything else FSDP-sharded over them) or nothing, allocates its
tensors (`to_empty`), fills them with random values and, for DDP, wraps the model
in `DistributedDataParallel`. It then runs `--steps` training steps (forward on
its share of a batch, backward, AdamW) and reports, as the maximum over ranks:

    params/rank   bytes of the parameter storage the rank holds (its shards, or the replica)
    peak RSS      the process's peak resident set (ru_maxrss) above its RSS before the
                  model was built: parameters, gradients, AdamW state, activations,
                  FSDP's all-gathered layers and DDP's gradient buckets

"vs DDP" is FSDP2 + EP over DDP at the same N, measured in this run; the parameter
ratio should fall about as 1/N. Model: the "tiny" preset with `--experts` routed
experts of width `--moe-intermediate` (so that the experts hold most weights).

    python -m benchmarks.bench_sharding [--ranks 1 2 4] [--experts 16] [--moe-intermediate 256]
                                        [--tokens 64] [--steps 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from r1kit.policy import DeepseekV3Config, DeepseekV3ForCausalLM, preset_config
from r1kit.policy.parallelize import build_mesh, parallelize

LAYOUTS = ("DDP", "FSDP2 + EP")
VOCAB = 1024


def local_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameter storage this rank holds: a DTensor's local shard, a plain tensor whole."""
    locals_ = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    return sum(t.numel() * t.element_size() for t in locals_)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@torch.no_grad()
def fill(model: torch.nn.Module) -> None:
    """Random weights in this rank's shards (memory, not quality, is measured) and the derived buffers."""
    for parameter in model.parameters():
        (parameter.to_local() if isinstance(parameter, DTensor) else parameter).normal_(0.0, 0.02)
    model.init_buffers()


def rank_main(rank: int, world: int, layout: str, config: DeepseekV3Config, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    init = f"file://{out}.rendezvous"
    dist.init_process_group("gloo", init, rank=rank, world_size=world, timeout=timedelta(seconds=300))
    start_rss = peak_rss_bytes()
    torch.manual_seed(0)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config).train()
    if layout == "FSDP2 + EP":
        parallelize(model, build_mesh(ep=world))
    model.to_empty(device="cpu")
    fill(model)
    params = local_bytes(model)
    trained = DistributedDataParallel(model) if layout == "DDP" else model
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-4)
    batch = torch.randint(0, VOCAB, (world, args.tokens))[rank : rank + 1]  # one row per rank
    for _ in range(args.steps):
        trained(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    stats = torch.tensor([params, peak_rss_bytes() - start_rss], dtype=torch.float64)
    # DDP's reducer must not outlive the process group: freed after it, gloo's teardown can deadlock
    del trained, optimizer
    gc.collect()
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    if rank == 0:
        Path(out).write_text(json.dumps(stats.tolist()))
    dist.destroy_process_group()


def measure(world: int, layout: str, config: DeepseekV3Config, args: argparse.Namespace) -> tuple[float, float]:
    """(params bytes per rank, peak RSS above start) of `world` fresh processes, the maxima over ranks."""
    with tempfile.TemporaryDirectory() as directory:
        out = os.path.join(directory, "result.json")
        torch.multiprocessing.start_processes(
            rank_main, (world, layout, config, args, out), nprocs=world, start_method="spawn"
        )
        params, rss = json.loads(Path(out).read_text())
    return params, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="process counts N to measure")
    parser.add_argument("--experts", type=int, default=16, help="routed experts per MoE layer")
    parser.add_argument("--moe-intermediate", type=int, default=256, help="width of each routed expert")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per rank and step")
    parser.add_argument("--steps", type=int, default=2, help="training steps per run")
    args = parser.parse_args()
    if any(args.experts % n for n in args.ranks):
        raise SystemExit("--experts must be divisible by every --ranks value (experts split over all ranks)")

    config = preset_config(
        "tiny",
        vocab_size=VOCAB,
        n_routed_experts=args.experts,
        moe_intermediate_size=args.moe_intermediate,
        n_group=4,
        topk_group=2,
    )
    total = sum(p.numel() for p in DeepseekV3ForCausalLM(config).parameters())
    print(
        f"tiny DeepSeek-V3 with {args.experts} experts of width {args.moe_intermediate} ({total / 1e6:.2f}M "
        f"parameters, fp32), {args.tokens} tokens per rank, {args.steps} AdamW steps, gloo on CPU, "
        f"torch {torch.__version__}; maxima over ranks"
    )
    print(f"{'ranks':>5} {'layout':<11} | {'params/rank':>11} {'vs DDP':>7} | {'peak RSS':>9} {'vs DDP':>7}")
    for world in args.ranks:
        results = {layout: measure(world, layout, config, args) for layout in LAYOUTS}
        ddp_params, ddp_rss = results["DDP"]
        for layout, (params, rss) in results.items():
            print(
                f"{world:>5} {layout:<11} | {params / 2**20:>8.2f} MB {params / ddp_params:>6.2f}x "
                f"| {rss / 2**20:>6.0f} MB {rss / ddp_rss:>6.2f}x"
            )


if __name__ == "__main__":
    main()
