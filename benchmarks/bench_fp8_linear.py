"""FP8 versus BF16 time of DeepSeek-V3-sized linear layers, routed experts and a policy training step.

On a CUDA GPU: BF16 nn.Linear against FP8Linear (all three GEMMs block-scaled FP8, CUDA back
end where the GPU supports it), both with BF16 weights and activations, and the routed-expert
GEMM (fp8_grouped_linear against a BF16 per-expert loop), forward+backward. Then one training
step (forward, backward, AdamW) of the policy at DeepSeek-V3 width (d = 7168, 128 heads, MLA
ranks 1536/512) cut to one dense and one MoE layer with 16 routed experts (top-8) and a 32k
vocabulary, BF16 against `enable_fp8`. Prints milliseconds and the speed-up BF16 time / FP8 time.
On a machine without a GPU it says so, runs the step on the `tiny` preset, and prints the cost
of the exact CPU emulation relative to FP32: an emulation overhead, not a speed claim.

    python3 -m benchmarks.bench_fp8_linear [--tokens N --repeats R]   (GPU: 8192 and 20, CPU: 256 and 3)
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch
from torch import nn

from r1kit.policy import DeepseekV3ForCausalLM, preset_config
from r1kit.policy.fp8_gemm import FP8Config, select_backend
from r1kit.policy.fp8_grouped import fp8_grouped_linear
from r1kit.policy.fp8_linear import FP8Linear

# (name, in_features, out_features) of DeepSeek-V3 projections (d = 7168, q/kv LoRA ranks 1536/512,
# 128 heads of 128 value dims, MoE intermediate size 2048).
LINEAR_SHAPES = [
    ("q_a_proj 7168->1536", 7168, 1536),
    ("kv_a_proj 7168->576", 7168, 576),
    ("o_proj 16384->7168", 16384, 7168),
    ("expert down 2048->7168", 2048, 7168),
    ("expert gate/up 7168->2048", 7168, 2048),
]
EXPERTS = 8  # routed experts on one GPU under expert parallelism (256 experts over 32 GPUs)


def timed(step: Callable[[], None], repeats: int, device: torch.device) -> float:
    """Median milliseconds of `step` after two warm-up calls."""
    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def linear_step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(dy)

    return step


def expert_step(grouped: Callable, x: torch.Tensor, weight: torch.Tensor, counts, dy) -> Callable[[], None]:
    def step() -> None:
        weight.grad = x.grad = None
        grouped(x, weight, counts).backward(dy)

    return step


def bf16_expert_loop(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return torch.cat([chunk @ w.t() for chunk, w in zip(x.split(counts.tolist()), weight, strict=True)])


def run(tokens: int, repeats: int, device: torch.device) -> None:
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    config = FP8Config()
    print(f"device {device}, FP8 back end: {select_backend(config, device)}, tokens {tokens}, baseline {dtype}")
    print(f"{'layer':28s} {'baseline ms':>12s} {'fp8 ms':>10s} {'ratio':>8s}")
    for name, k, n in LINEAR_SHAPES:
        linear = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        fp8 = FP8Linear.from_linear(linear, config)
        x = torch.randn(tokens, k, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(tokens, n, device=device, dtype=dtype)
        base_ms = timed(linear_step(linear, x, dy), repeats, device)
        fp8_ms = timed(linear_step(fp8, x, dy), repeats, device)
        print(f"{name:28s} {base_ms:12.2f} {fp8_ms:10.2f} {_ratio(base_ms, fp8_ms, on_gpu):>8s}")

    counts = torch.full((EXPERTS,), tokens // EXPERTS, device=device)
    x = torch.randn(int(counts.sum()), 7168, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(EXPERTS, 2048, 7168, device=device) * 0.02).to(dtype).requires_grad_()
    dy = torch.randn(x.shape[0], 2048, device=device, dtype=dtype)
    base_ms = timed(expert_step(bf16_expert_loop, x, weight, counts, dy), repeats, device)

    def fp8_experts(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return fp8_grouped_linear(x, w, c, config)

    fp8_ms = timed(expert_step(fp8_experts, x, weight, counts, dy), repeats, device)
    label = f"{EXPERTS} experts 7168->2048"
    print(f"{label:28s} {base_ms:12.2f} {fp8_ms:10.2f} {_ratio(base_ms, fp8_ms, on_gpu):>8s}")
    base_ms, fp8_ms, label = policy_step_times(tokens, repeats, device, dtype)
    print(f"{label:28s} {base_ms:12.2f} {fp8_ms:10.2f} {_ratio(base_ms, fp8_ms, on_gpu):>8s}")
    if on_gpu:
        print("ratio = BF16 time / FP8 time (above 1: FP8 is faster)")
    else:
        print(
            "No CUDA GPU is present: no FP8 kernel ran. 'ratio' is the emulation overhead, FP8 emulation "
            "time / FP32 nn.Linear time on this CPU. It is not a speed claim."
        )


def policy_step_times(tokens: int, repeats: int, device: torch.device, dtype: torch.dtype) -> tuple[float, float, str]:
    """Milliseconds of one training step (forward, backward, AdamW) without and with FP8, and a label."""
    if device.type == "cuda":
        shape = dict(num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=16, n_group=8)
        config = preset_config("deepseek-v3", vocab_size=32000, num_nextn_predict_layers=0, **shape)
        label, seq = "policy step, V3 width", 4096
    else:
        config, label, seq = preset_config("tiny", vocab_size=512), "policy step, tiny", 128
    with torch.device(device):
        torch.manual_seed(0)
        baseline = DeepseekV3ForCausalLM(config).to(dtype)
    fp8 = copy.deepcopy(baseline)
    fp8.enable_fp8(FP8Config())
    ids = torch.randint(0, config.vocab_size, (max(tokens // seq, 1), seq), device=device)
    times = []
    for model in (baseline, fp8):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step(model: DeepseekV3ForCausalLM = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            model(ids, labels=ids).loss.backward()
            optimizer.step()

        times.append(timed(step, repeats, device))
    return times[0], times[1], label


def _ratio(base_ms: float, fp8_ms: float, on_gpu: bool) -> str:
    return f"{base_ms / fp8_ms:.2f}x" if on_gpu else f"{fp8_ms / base_ms:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=None, help="default: 8192 on a GPU, 256 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="default: 20 on a GPU, 3 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    tokens = args.tokens or (8192 if on_gpu else 256)
    repeats = args.repeats or (20 if on_gpu else 3)
    run(tokens, repeats, device)


if __name__ == "__main__":
    main()
