"""FP8 GEMM error: DeepSeek-V3 block scaling versus per-tensor scaling, against float64.

For x (tokens, K) and w (N, K) it quantises both operands to E4M3 (x in 1 x 128 tiles, w in
128 x 128 blocks; or one scale per tensor), multiplies the dequantised operands and prints
  - the relative Frobenius error ||y_fp8 - y|| / ||y|| over the whole output, and
  - the median over tokens of the per-token relative error ||y_fp8[t] - y[t]|| / ||y[t]||,
which exposes tokens whose inputs fell below E4M3's normal range under a shared scale.

    python3 -m benchmarks.bench_fp8_error [--tokens 512 --k 2048 --n 512 --seed 0]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from r1kit.policy.fp8_quant import BlockQuantized, quantize_blockwise, quantize_tensorwise

FLOOR = 1e-12


def _block(pow2: bool) -> Callable[[torch.Tensor, torch.Tensor], tuple[BlockQuantized, BlockQuantized]]:
    return lambda x, w: (
        quantize_blockwise(x, (1, 128), amax_floor=FLOOR, power_of_two=pow2),
        quantize_blockwise(w, (128, 128), amax_floor=FLOOR, power_of_two=pow2),
    )


SCHEMES = {
    "block": _block(False),
    "block pow2": _block(True),
    "tensor": lambda x, w: (
        quantize_tensorwise(x, amax_floor=FLOOR),
        quantize_tensorwise(w, amax_floor=FLOOR),
    ),
}


def gemm_errors(x: torch.Tensor, w: torch.Tensor) -> dict[str, tuple[float, float]]:
    """{scheme: (relative Frobenius error, median per-token relative error)} of x @ w^T."""
    exact = x.double() @ w.double().t()
    errors = {}
    for name, quantize in SCHEMES.items():
        xq, wq = quantize(x, w)
        diff = (xq.dequantize() @ wq.dequantize().t()).double() - exact
        per_token = diff.norm(dim=1) / exact.norm(dim=1)
        errors[name] = ((diff.norm() / exact.norm()).item(), per_token.median().item())
    return errors


def scenarios(tokens: int, k: int) -> dict[str, Callable[[], torch.Tensor]]:
    """Activation (or gradient) matrices (tokens, K) with different outlier patterns."""

    def scaled(rows: torch.Tensor | None = None, cols: torch.Tensor | None = None, factor: float = 1.0):
        x = torch.randn(tokens, k)
        if rows is not None:
            x[rows] *= factor
        if cols is not None:
            x[:, cols] *= factor
        return x

    return {
        "gaussian, no outliers": lambda: scaled(),
        "4 channels x100": lambda: scaled(cols=torch.randperm(k)[:4], factor=1e2),
        "4 channels x1e4": lambda: scaled(cols=torch.randperm(k)[:4], factor=1e4),
        "2 tokens x1e3": lambda: scaled(rows=torch.randperm(tokens)[:2], factor=1e3),
        "2 tokens x1e5": lambda: scaled(rows=torch.randperm(tokens)[:2], factor=1e5),
        "rows spanning 1e-10..1 (gradient-like)": lambda: (
            torch.randn(tokens, k) * torch.logspace(-10, 0, tokens)[:, None]
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    w = torch.randn(args.n, args.k) * 0.02
    print(f"x ({args.tokens}, {args.k}) @ w ({args.n}, {args.k})^T, E4M3, errors vs float64")
    header = " ".join(f"{scheme:>12s}" for scheme in SCHEMES)
    print(f"{'input':40s} {'relative error, whole output':>38s}   {'median per-token relative error':>38s}")
    print(f"{'':40s} {header}   {header}")
    for name, make in scenarios(args.tokens, args.k).items():
        errors = gemm_errors(make(), w)
        whole = " ".join(f"{errors[s][0]:12.4f}" for s in SCHEMES)
        per_token = " ".join(f"{errors[s][1]:12.4f}" for s in SCHEMES)
        print(f"{name:40s} {whole}   {per_token}")


if __name__ == "__main__":
    main()
