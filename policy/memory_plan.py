"""Per-rank training memory of the policy under FSDP2 with expert parallelism: `python -m r1kit.policy.memory_plan`.

    python -m r1kit.policy.memory_plan --preset deepseek-v3 --dp 32 --ep 8 \\
        --device-memory 80GiB --micro-batch 1 --seq-len 4096

The model is built on the meta device (no memory) and its parameters counted by
category; the per-rank bytes follow from those counts and the options. Exit
status: 0 when the plan fits, 1 when it does not, 2 for bad input.

Mesh (torchtitan-style), `--dp D --ep E`: world = D * E ranks.

    routed experts   the N_r experts of every MoE layer (main and MTP) are split
                     N_r / ep per EP rank; each rank's experts are then sharded
                     by FSDP over the dp ranks holding the same experts:
                     numel / ep / dp elements per rank
    everything else  FSDP over the flattened mesh: numel / (dp * ep) per rank

So model state per rank is the same for any split of the world; ep only changes
what a rank all-gathers (its N_r / ep experts instead of all N_r). FSDP2 pads
dim 0 of a tensor to a multiple of its shard count; that padding (at most one
row per tensor) is not counted.

Bytes per parameter. Defaults are FSDP2's MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32) over fp32 sharded parameters with torch.optim.AdamW, as in
torchtitan:

    parameters   sharded, master dtype (fp32: 4 B), the master weights
    gradients    sharded, master dtype (fp32: 4 B): FSDP2 reduce-scatters in
                 reduce_dtype (taken equal to the master dtype) and keeps the
                 sharded gradient in the sharded parameter's dtype
    optimizer    AdamW exp_avg and exp_avg_sq, 2 x optimizer dtype (fp32: 8 B)
    => 16 B / (dp * ep) per parameter. Buffers (the fp32 routing bias, rotary
       frequencies: O(N_r) per layer) are not counted.

All-gather peak, transient, on top of the sharded state. FSDP units as in
torchtitan: the embedding, each decoder layer, each MTP module, and the final
norm with the output head. Unsharded on a rank, a unit holds its non-expert
parameters in full and the rank's N_r / ep routed experts, P_unit elements. In
backward FSDP2 holds the unit it computes, has the next one prefetched
(`--prefetch-blocks`, 1 by default) and holds the unit's unsharded gradients
until their reduce-scatter:

    peak = (1 + prefetch) * P_unit * p  +  P_unit * (p + r)        largest unit

p: bytes of the param (compute) dtype; r: of the master dtype, the fp32
reduce-scatter input the bf16 autograd gradient is copied into (r = 0 when the
two dtypes agree).

Activations, per rank, one micro-batch of N = b * s tokens; p bytes per element
of the compute dtype. What autograd keeps from our forward (policy/attention.py,
moe.py, layers.py, mtp.py, transformers' causal-LM loss), per token, O(1)-per-token
scalars and integer indices left out:

    norm(d)      (4 + 2p) d              an RMSNorm of width d: its fp32 input copy, the
                                         normalised value, its output (the next GEMM's input)
    MLA          norm(h) [+ norm(r_q) with query compression]
                 + (4 + p) c + p (c + d_r)   latent norm; its output goes into the
                                         entries [c_KV; k_R], which kv_b_proj keeps
                 + p n (2 d_qk + 2 d_vp + d_v) + 4 n   SDPA's q, k, v (padded to d_vp),
                                         output and fp32 log-sum-exp; o_proj's input
    dense MLP    norm(h) + 4 p I         gate, activation, up, product
    MoE          norm(h) + 4 h + 8 N_r   fp32 router input, fp32 scores and balance shares
                 + K p (h + 5 I)         routed rows, gate_up, activation, product, gated
                 + 4 p n_s I             shared experts
    head, loss   norm(h) + V (p + 4 + 4 D + 4)   logits, the fp32 log-softmax of the main
                                         loss and of each of the D MTP losses, one fp32
                                         logit gradient in backward
    MTP module   2 (4 + p) h + 2 p h + norm(h)   enorm and hnorm (their outputs are
                                         concatenated), eh_proj's input, its final norm

with d_qk = d_n + d_r and d_vp = max(d_v, d_qk) (v is zero-padded for the fused
kernel); each MoE layer also keeps an fp32 copy of its router weight (4 N_r h
bytes; the 4 h input copy and this one vanish when p = 4). Routed rows assume
balanced routing: under EP a rank receives N K rows on average, more on a
skewed step. Measured with torch's saved-tensor hooks on the CPU, these terms
are 98.9-99.6% of the bytes autograd keeps per decoder layer of a small model
(hidden 256, bf16 and fp32; tests/policy/test_memory_plan.py); rotary tables
and per-token scalars make up the rest.

Without activation checkpointing every decoder layer (main and MTP) keeps its
whole term. With full checkpointing (`gradient_checkpointing_enable()`, or
torchtitan's full AC: every decoder layer) a layer keeps its input only, p h per
token, and backward recomputes one layer at a time:

    none   sum_layers layer(N) + head + MTP modules
    full   (L + D) p h N + max_layers layer(N) + head + MTP modules

The head term is the model's own forward with labels (SFT); GRPO's chunked
log-probs (grpo/logprobs.py) hold one chunk of logits at a time instead. Not
modelled: backward temporaries other than the logit gradient, allocator
fragmentation, the CUDA context and NCCL buffers; `--reserved` (4 GiB by
default) stands for them. All terms are summed as if they peaked together, as
they nearly do when backward starts: every activation alive, the last unit
gathered.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from r1kit.policy.config import DeepseekV3Config
from r1kit.policy.modeling import DeepseekV3ForCausalLM
from r1kit.policy.presets import PRESETS, preset_config

CATEGORIES = (
    "embedding",
    "output_head",
    "attention",
    "dense_mlp",
    "shared_experts",
    "routed_experts",
    "router",
    "norms",
    "mtp",
)

# first match wins: MTP modules are one category whatever they hold, norms inside attention are norms
_CATEGORY_PATTERNS = (
    ("mtp", re.compile(r"^mtp\.")),
    ("embedding", re.compile(r"^model\.embed_tokens\.")),
    ("output_head", re.compile(r"^lm_head\.")),
    ("norms", re.compile(r"(layernorm|^model\.norm)\.weight$")),
    ("router", re.compile(r"\.mlp\.gate\.weight$")),
    ("routed_experts", re.compile(r"\.mlp\.experts\.")),
    ("shared_experts", re.compile(r"\.mlp\.shared_experts\.")),
    ("attention", re.compile(r"\.self_attn\.")),
    ("dense_mlp", re.compile(r"\.mlp\.(gate|up|down)_proj\.")),
)
_ROUTED_EXPERT = re.compile(r"\.mlp\.experts\.")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_MTP_MODULE = re.compile(r"^mtp\.(\d+)\.")

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
GIB = 2**30


def category_of(name: str) -> str:
    """The category (one of CATEGORIES) of parameter `name` of `DeepseekV3ForCausalLM`.

    >>> category_of("model.layers.3.mlp.experts.gate_up_proj")
    'routed_experts'
    """
    for category, pattern in _CATEGORY_PATTERNS:
        if pattern.search(name):
            return category
    raise ValueError(f"memory_plan: no category for parameter {name!r}")


def fsdp_unit_of(name: str) -> str:
    """The FSDP unit holding parameter `name`: "embedding", "layer i", "mtp k" or "output head"."""
    if name.startswith("model.embed_tokens."):
        return "embedding"
    if name.startswith(("lm_head.", "model.norm.")):
        return "output head"
    for pattern, unit in ((_LAYER, "layer"), (_MTP_MODULE, "mtp")):
        match = pattern.match(name)
        if match:
            return f"{unit} {match.group(1)}"
    raise ValueError(f"memory_plan: no FSDP unit for parameter {name!r}")


@dataclass(frozen=True)
class ParameterCount:
    """Parameter counts of one model, in elements.

    by_category: every name of CATEGORIES -> count (MTP modules whole under "mtp");
    units: FSDP unit -> (non-expert, routed-expert) counts, in model order;
    activated: the parameters one token of the main model multiplies with: all
    but the routed experts and the embedding table (a lookup reads one row),
    plus K of each MoE layer's N_r experts; MTP modules left out. This is how
    DeepSeek counts 37B of 671B for V3 and 2.4B of 15.7B for V2-Lite.
    """

    by_category: dict[str, int]
    units: dict[str, tuple[int, int]]
    activated: int

    @property
    def total(self) -> int:
        return sum(self.by_category.values())

    @property
    def routed(self) -> int:
        """Routed-expert parameters, main and MTP: the ones split over ep."""
        return sum(expert for _, expert in self.units.values())


def count_parameters(
    named_numels: Iterable[tuple[str, int]], experts_per_token: int, num_experts: int
) -> ParameterCount:
    """Counts (name, numel) pairs of `DeepseekV3ForCausalLM` parameters by category and FSDP unit."""
    by_category = dict.fromkeys(CATEGORIES, 0)
    units: dict[str, tuple[int, int]] = {}
    main_dense = main_routed = 0
    for name, numel in named_numels:
        category = category_of(name)
        by_category[category] += numel
        unit = fsdp_unit_of(name)
        dense, routed = units.get(unit, (0, 0))
        is_routed = bool(_ROUTED_EXPERT.search(name))  # main or MTP
        units[unit] = (dense, routed + numel) if is_routed else (dense + numel, routed)
        if category == "routed_experts":  # main model only: MTP parameters are category "mtp"
            main_routed += numel
        elif category not in ("mtp", "embedding"):
            main_dense += numel
    return ParameterCount(by_category, units, main_dense + main_routed * experts_per_token // num_experts)


def count_model_parameters(config: DeepseekV3Config) -> ParameterCount:
    """Builds `DeepseekV3ForCausalLM(config)` on the meta device and counts its parameters."""
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    named = ((name, parameter.numel()) for name, parameter in model.named_parameters())
    return count_parameters(named, config.num_experts_per_tok, config.n_routed_experts)


@dataclass(frozen=True)
class PlanConfig:
    """How the model is trained: mesh, batch, checkpointing, dtypes, device (see the module docstring)."""

    dp: int = 1  # FSDP degree of the routed experts; the mesh has dp * ep ranks
    ep: int = 1  # expert-parallel degree: each EP rank holds N_r / ep routed experts
    micro_batch: int = 1  # sequences per rank per forward
    seq_len: int = 4096  # tokens per sequence
    activation_checkpointing: bool = True  # full AC: every decoder layer recomputed in backward
    param_dtype: str = "bf16"  # compute and all-gather dtype (FSDP2 param_dtype)
    master_dtype: str = "fp32"  # sharded parameters and gradients, reduce-scatter dtype
    optimizer_dtype: str = "fp32"  # AdamW exp_avg and exp_avg_sq
    prefetch_blocks: int = 1  # units FSDP2 has gathered ahead of the one computing
    device_memory: int = 80 * GIB  # bytes per device
    reserved: int = 4 * GIB  # bytes kept for the CUDA context, NCCL and the allocator

    def __post_init__(self) -> None:
        for name in ("dp", "ep", "micro_batch", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"PlanConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("param_dtype", "master_dtype", "optimizer_dtype"):
            if getattr(self, name) not in DTYPE_BYTES:
                raise ValueError(f"PlanConfig.{name} must be one of {sorted(DTYPE_BYTES)}, got {getattr(self, name)!r}")
        for name in ("prefetch_blocks", "reserved"):
            if getattr(self, name) < 0:
                raise ValueError(f"PlanConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.device_memory <= 0:
            raise ValueError(f"PlanConfig.device_memory must be > 0 bytes, got {self.device_memory}")

    @property
    def world(self) -> int:
        return self.dp * self.ep

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


def check_mesh(num_experts: int, routed_params: int, ep: int) -> None:
    """Raises ValueError unless every EP rank can hold the same whole number of routed experts."""
    if ep > 1 and routed_params == 0:
        raise ValueError(f"ep={ep} needs routed experts, and this model has no MoE layer")
    if num_experts % ep:
        choices = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ValueError(
            f"ep={ep} does not divide the {num_experts} routed experts; every EP rank must hold the "
            f"same number of experts: choose ep among {choices}"
        )


def norm_bytes(width: int, p: int) -> int:
    """Bytes per token an RMSNorm of `width` and its consumer keep: fp32 input copy, normalised value, output."""
    return (4 + 2 * p) * width


def mla_bytes(config: DeepseekV3Config, p: int) -> int:
    """Bytes per token the expanded MLA forward keeps (input norm included)."""
    h, c, d_r, n = config.hidden_size, config.kv_lora_rank, config.qk_rope_head_dim, config.num_attention_heads
    d_qk = config.qk_nope_head_dim + d_r
    d_v = config.v_head_dim
    d_vp = max(d_v, d_qk)
    norms = norm_bytes(h, p) + (0 if config.q_lora_rank is None else norm_bytes(config.q_lora_rank, p))
    latent = (4 + p) * c + p * (c + d_r)
    return norms + latent + p * n * (2 * d_qk + 2 * d_vp + d_v) + 4 * n


def dense_mlp_bytes(config: DeepseekV3Config, p: int) -> int:
    """Bytes per token a dense SwiGLU layer keeps (its norm included)."""
    return norm_bytes(config.hidden_size, p) + 4 * p * config.intermediate_size


def moe_bytes(config: DeepseekV3Config, p: int) -> int:
    """Bytes per token a DeepSeekMoE layer keeps (its norm included), routing balanced."""
    h, inner, k = config.hidden_size, config.moe_intermediate_size, config.num_experts_per_tok
    router = (4 * h if p != 4 else 0) + 8 * config.n_routed_experts
    shared = 4 * p * config.n_shared_experts * inner
    return norm_bytes(h, p) + router + k * p * (h + 5 * inner) + shared


def layer_bytes(config: DeepseekV3Config, moe: bool, tokens: int, p: int) -> int:
    """Bytes one decoder layer keeps for `tokens` tokens without checkpointing."""
    if not moe:
        return tokens * (mla_bytes(config, p) + dense_mlp_bytes(config, p))
    router_weight = 4 * config.n_routed_experts * config.hidden_size if p != 4 else 0
    return tokens * (mla_bytes(config, p) + moe_bytes(config, p)) + router_weight


def activation_bytes(config: DeepseekV3Config, plan: PlanConfig) -> int:
    """Per-rank activation estimate in bytes for one micro-batch (formulas in the module docstring)."""
    p, tokens, h = DTYPE_BYTES[plan.param_dtype], plan.tokens, config.hidden_size
    depth = config.num_nextn_predict_layers
    kinds = [i >= config.first_k_dense_replace for i in range(config.num_hidden_layers)] + [True] * depth
    layers = [layer_bytes(config, moe, tokens, p) for moe in kinds]
    kept = len(layers) * p * h * tokens + max(layers) if plan.activation_checkpointing else sum(layers)
    head = tokens * (norm_bytes(h, p) + config.vocab_size * (p + 4 + 4 * depth + 4))
    mtp = depth * tokens * (2 * (4 + p) * h + 2 * p * h + norm_bytes(h, p))
    return kept + head + mtp


def gather_peak(counts: ParameterCount, plan: PlanConfig) -> tuple[str, float]:
    """(largest FSDP unit, its transient bytes): (1 + prefetch) unsharded params + unsharded grads."""
    p, master = DTYPE_BYTES[plan.param_dtype], DTYPE_BYTES[plan.master_dtype]
    grad_bytes = p + (master if plan.master_dtype != plan.param_dtype else 0)
    per_unit = {unit: dense + routed / plan.ep for unit, (dense, routed) in counts.units.items()}
    unit = max(per_unit, key=per_unit.get)
    return unit, per_unit[unit] * ((1 + plan.prefetch_blocks) * p + grad_bytes)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank of each part of the training state, the device's memory and the verdict."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    gather: float
    gather_unit: str
    reserved: float
    device_memory: float

    @property
    def total(self) -> float:
        parts = (self.parameters, self.gradients, self.optimizer, self.activations, self.gather, self.reserved)
        return sum(parts)

    @property
    def headroom(self) -> float:
        """device_memory - total; negative when the plan does not fit."""
        return self.device_memory - self.total

    @property
    def fits(self) -> bool:
        return self.headroom >= 0


def sharded_numel(counts: ParameterCount, dp: int, ep: int) -> float:
    """Parameter elements one rank holds: routed experts / ep / dp, everything else / (dp * ep)."""
    return (counts.total - counts.routed) / (dp * ep) + counts.routed / ep / dp


def plan_memory(config: DeepseekV3Config, counts: ParameterCount, plan: PlanConfig) -> MemoryPlan:
    """The per-rank memory of training `config` (counted as `counts`) as `plan` says; checks the mesh."""
    check_mesh(config.n_routed_experts, counts.routed, plan.ep)
    numel = sharded_numel(counts, plan.dp, plan.ep)
    master = DTYPE_BYTES[plan.master_dtype]
    unit, gather = gather_peak(counts, plan)
    return MemoryPlan(
        parameters=numel * master,
        gradients=numel * master,
        optimizer=numel * 2 * DTYPE_BYTES[plan.optimizer_dtype],
        activations=activation_bytes(config, plan),
        gather=gather,
        gather_unit=unit,
        reserved=plan.reserved,
        device_memory=plan.device_memory,
    )


def parse_size(text: str) -> int:
    """Bytes in a size such as "80GiB" (binary), "80GB" (decimal) or "1024" (bytes).

    >>> parse_size("80GiB") == 80 * 2**30
    True
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if unit not in _UNITS:
        raise ValueError(f"size {text!r} is not a number with an optional unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def format_count(count: float) -> str:
    """2.3M, 926.68M, 682.64B: parameters with a metric suffix."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}{suffix}"
    return f"{count:.0f}"


def format_counts(config: DeepseekV3Config, counts: ParameterCount, plan: PlanConfig) -> str:
    """The parameter table: count, share and per-rank count of each category, and how it is sharded."""
    lines = [f"{'parameters':<16}{'count':>10}{'share':>9}{'per rank':>11}  sharded over"]
    everywhere = f"dp*ep = {plan.world} rank{'s' if plan.world > 1 else ''}"
    experts = f"ep {plan.ep} ({config.n_routed_experts // plan.ep} experts each), then dp {plan.dp}"
    for category, count in counts.by_category.items():
        where = experts if category == "routed_experts" else everywhere
        if category == "mtp" and count:
            where += "; its routed experts as above"
        share = f"{100 * count / counts.total:.2f}%"
        lines.append(
            f"{category:<16}{format_count(count):>10}{share:>9}{format_count(count / plan.world):>11}  {where}"
        )
    lines.append(
        f"{'total':<16}{format_count(counts.total):>10}{'100%':>9}{format_count(counts.total / plan.world):>11}"
    )
    routed = f"{config.num_experts_per_tok} of {config.n_routed_experts} routed experts"
    lines.append(f"activated per token: {format_count(counts.activated)} (main model, {routed}, no embedding)")
    return "\n".join(lines)


def format_plan(plan: PlanConfig, memory: MemoryPlan) -> str:
    """The per-rank memory table and the verdict."""
    master, optim, p = plan.master_dtype, plan.optimizer_dtype, plan.param_dtype
    grads = p if master == p else f"{p}+{master}"
    checkpointing = "full AC" if plan.activation_checkpointing else "no AC"
    rows = (
        ("parameters", f"{master} master weights, 1/{plan.world}", memory.parameters),
        ("gradients", f"{master}, 1/{plan.world}", memory.gradients),
        ("optimizer", f"AdamW 2 x {optim}, 1/{plan.world}", memory.optimizer),
        ("activations", f"{checkpointing}, {plan.micro_batch} x {plan.seq_len} tokens", memory.activations),
        ("all-gather", f"{memory.gather_unit}: {1 + plan.prefetch_blocks} x {p} params + {grads} grads", memory.gather),
        ("reserved", "CUDA context, NCCL, allocator", memory.reserved),
        ("total", "", memory.total),
    )
    lines = [f"{'per rank':<13}{'':<46}{'GiB':>9}"]
    lines += [f"{name:<13}{detail:<46}{size / GIB:>9.2f}" for name, detail, size in rows]
    verdict = "FITS" if memory.fits else "DOES NOT FIT"
    share = 100 * memory.headroom / memory.device_memory
    headroom = f"headroom {memory.headroom / GIB:.2f} GiB ({share:.1f}%)"
    lines.append(f"device {memory.device_memory / GIB:.2f} GiB: {verdict}, {headroom}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m r1kit.policy.memory_plan",
        description="Per-rank training memory under FSDP2 + expert parallelism (formulas: the module docstring).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESETS), help="a named size (policy/presets.py)")
    source.add_argument("--config", help="a config.json, or a checkpoint directory holding one")
    parser.add_argument("--vocab-size", type=int, help="override the vocabulary size (the tiny preset needs it)")
    parser.add_argument("--dp", type=int, default=1, help="FSDP degree of the routed experts (world = dp * ep)")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel degree: N_r / ep experts per EP rank")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per rank per forward")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence")
    parser.add_argument("--activation-checkpointing", choices=("full", "none"), default="full")
    parser.add_argument("--param-dtype", choices=sorted(DTYPE_BYTES), default="bf16", help="compute/all-gather")
    parser.add_argument("--master-dtype", choices=sorted(DTYPE_BYTES), default="fp32", help="sharded params, grads")
    parser.add_argument("--optimizer-dtype", choices=sorted(DTYPE_BYTES), default="fp32", help="AdamW moments")
    parser.add_argument("--prefetch-blocks", type=int, default=1, help="FSDP units gathered ahead")
    parser.add_argument("--device-memory", default="80GiB", help="per device: 80GiB (binary) or 80GB (decimal)")
    parser.add_argument("--reserved", default="4GiB", help="kept back for the CUDA context, NCCL, allocator")
    return parser


def load_config(path: str, **overrides: Any) -> DeepseekV3Config:
    """The config of a config.json file or of a checkpoint directory holding one, with `overrides`; never the Hub."""
    file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path} is neither a config.json nor a directory holding one")
    return DeepseekV3Config(**{**DeepseekV3Config.from_json_file(file).to_dict(), **overrides})


def _model_config(args: argparse.Namespace) -> tuple[str, DeepseekV3Config]:
    overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
    if args.preset is not None:
        return args.preset, preset_config(args.preset, **overrides)
    return args.config, load_config(args.config, **overrides)


def main(argv: list[str] | None = None) -> int:
    """Prints the parameter table and the per-rank plan; 0 when it fits, 1 when not (2: bad input)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        name, config = _model_config(args)
        plan = PlanConfig(
            dp=args.dp,
            ep=args.ep,
            micro_batch=args.micro_batch,
            seq_len=args.seq_len,
            activation_checkpointing=args.activation_checkpointing == "full",
            param_dtype=args.param_dtype,
            master_dtype=args.master_dtype,
            optimizer_dtype=args.optimizer_dtype,
            prefetch_blocks=args.prefetch_blocks,
            device_memory=parse_size(args.device_memory),
            reserved=parse_size(args.reserved),
        )
        counts = count_model_parameters(config)
        memory = plan_memory(config, counts, plan)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    print(f"memory plan: {name}, mesh dp {plan.dp} x ep {plan.ep} = {plan.world} ranks")
    print(
        f"dtypes: {plan.param_dtype} compute and all-gather, {plan.master_dtype} master weights and gradients, "
        f"AdamW exp_avg + exp_avg_sq in {plan.optimizer_dtype}"
    )
    print()
    print(format_counts(config, counts, plan))
    print()
    print(format_plan(plan, memory))
    return 0 if memory.fits else 1


if __name__ == "__main__":
    sys.exit(main())
