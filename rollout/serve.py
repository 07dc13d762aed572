"""`python -m r1kit.rollout.serve`: start a rollout worker, by hand or from a trainer.

    export R1KIT_ROLLOUT_AUTHKEY=<a shared secret>
    CUDA_VISIBLE_DEVICES=1 python -m r1kit.rollout.serve --model out/checkpoint --port 7301 --device cuda
    CUDA_VISIBLE_DEVICES=2,3 python -m r1kit.rollout.serve --model out/checkpoint --port 7302 \\
        --engine vllm --tensor_parallel_size 2 --host 0.0.0.0

The worker loads the checkpoint directory (config.json, safetensors and the
tokenizer files, as `save_pretrained` writes them), then listens on
host:port (127.0.0.1 by default; `--host 0.0.0.0` to accept trainers on
other hosts) and serves one trainer at a time; the trainer connects with
`RemoteRolloutEngine.connect(["host:7301", "host:7302"])` and the same
authkey. The trainer pushes its weights on every update, so the checkpoint
only has to have the right architecture and tokenizer.

A trainer that launches its workers itself (`RemoteRolloutEngine.launch`)
runs this same command with `--port 0 --port_file F --parent_pid P
--exit_with_client true`: the worker writes the port it got to F, and exits
when the trainer disconnects or dies.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from r1kit.rollout.messages import AUTHKEY_ENV


@dataclass
class WorkerOptions:
    """How a worker runs its engine (the worker-side flags of `python -m r1kit.rollout.serve`)."""

    engine: Literal["torch", "vllm"] = field(default="torch", metadata={"help": "torch: built-in engine; vllm"})
    device: str = field(default="cpu", metadata={"help": "torch engine: cpu, cuda or cuda:N (vLLM uses its GPUs)"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "weights dtype; auto keeps the checkpoint's"}
    )
    max_batch_rows: int = field(default=256, metadata={"help": "torch engine: sequences decoded together"})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer directory (default: the model's)"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM: GPUs per worker"})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vLLM: share of each GPU it may use"})
    max_model_len: int | None = field(default=None, metadata={"help": "vLLM: prompt + completion tokens cap"})
    enforce_eager: bool = field(default=False, metadata={"help": "vLLM: no CUDA graphs (faster start-up)"})
    seed: int = field(default=0, metadata={"help": "vLLM: engine seed"})
    mla_decode: Literal["absorbed", "expanded"] = field(
        default="absorbed",
        metadata={"help": "torch engine, DeepSeek-V3 policies: MLA decode path (expanded: the trainer's arithmetic)"},
    )
    num_speculative_tokens: int = field(
        default=0, metadata={"help": "torch engine, DeepSeek-V3 policies with MTP: tokens drafted per round (0: off)"}
    )

    def __post_init__(self) -> None:
        if self.engine not in ("torch", "vllm"):
            raise ValueError(f"WorkerOptions.engine must be 'torch' or 'vllm', got {self.engine!r}")
        if self.max_batch_rows < 1:
            raise ValueError(f"WorkerOptions.max_batch_rows must be >= 1, got {self.max_batch_rows}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"WorkerOptions.num_threads must be >= 1, got {self.num_threads}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"WorkerOptions.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.num_speculative_tokens < 0:
            raise ValueError(f"WorkerOptions.num_speculative_tokens must be >= 0, got {self.num_speculative_tokens}")
        if self.engine == "vllm" and self.num_speculative_tokens > 0:
            raise ValueError("WorkerOptions.num_speculative_tokens is the torch engine's MTP speculation")
        if self.engine == "torch" and self.tensor_parallel_size != 1:
            raise ValueError("WorkerOptions.tensor_parallel_size > 1 needs engine='vllm'")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"WorkerOptions.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )

    def to_args(self) -> list[str]:
        """The command-line flags that reproduce these options."""
        args: list[str] = []
        for option in fields(self):
            value = getattr(self, option.name)
            if value is not None:
                args += [f"--{option.name}", str(value).lower() if isinstance(value, bool) else str(value)]
        return args


@dataclass
class ServeArguments:
    """Where the worker listens and what it serves."""

    model: str = field(metadata={"help": "checkpoint directory (config, weights, tokenizer)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=0, metadata={"help": "port to listen on; 0 picks a free one"})
    port_file: str | None = field(default=None, metadata={"help": "write the port here once listening"})
    parent_pid: int | None = field(default=None, metadata={"help": "exit when this process is gone"})
    exit_with_client: bool = field(default=False, metadata={"help": "exit when the trainer disconnects"})


def worker_command(
    model: str, options: WorkerOptions, *, port_file: str, parent_pid: int, host: str = "127.0.0.1"
) -> list[str]:
    """The command a trainer runs to launch a worker on this machine."""
    return [
        sys.executable,
        "-m",
        "r1kit.rollout.serve",
        "--model",
        model,
        "--host",
        host,
        "--port",
        "0",
        "--port_file",
        port_file,
        "--parent_pid",
        str(parent_pid),
        "--exit_with_client",
        "true",
        *options.to_args(),
    ]


def build_host(model: str, options: WorkerOptions):
    """Loads the engine a worker serves (a `r1kit.rollout.worker.HostedEngine`)."""
    if options.engine == "vllm":
        from r1kit.rollout.vllm_engine import VLLMRolloutEngine

        engine = VLLMRolloutEngine(
            model,
            tokenizer=options.tokenizer,
            tensor_parallel_size=options.tensor_parallel_size,
            gpu_memory_utilization=options.gpu_memory_utilization,
            dtype=options.dtype,
            max_model_len=options.max_model_len,
            enforce_eager=options.enforce_eager,
            seed=options.seed,
        )
        engine.exit_when_vllm_dies()
        return engine
    import torch
    from transformers import AutoTokenizer

    from r1kit.policy.loading import load_policy
    from r1kit.rollout.torch_engine import TorchRolloutEngine
    from r1kit.rollout.worker import TorchHost

    dtype = None if options.dtype == "auto" else getattr(torch, options.dtype)
    policy = load_policy(model, dtype=dtype, device=options.device)
    if hasattr(policy, "set_mla_decode"):
        policy.set_mla_decode(options.mla_decode)
    tokenizer = AutoTokenizer.from_pretrained(options.tokenizer or model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # left padding only; padded positions are masked
    engine = TorchRolloutEngine(policy, tokenizer, max_batch_rows=options.max_batch_rows,
                                num_speculative_tokens=options.num_speculative_tokens)  # fmt: skip
    return TorchHost(engine)


def _exit_when_orphaned(parent_pid: int) -> None:
    """Kills this worker (and its process group, e.g. vLLM's processes) once `parent_pid` is gone."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    if os.getpgid(0) == os.getpid():  # launched as a group leader: the group is ours alone
        os.killpg(os.getpid(), 9)
    os._exit(1)


def _write_port(path: str, port: int) -> None:
    temporary = Path(path + ".tmp")
    temporary.write_text(str(port))
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> None:
    from transformers import HfArgumentParser

    serve_args, options = HfArgumentParser((ServeArguments, WorkerOptions)).parse_args_into_dataclasses(argv)
    authkey = os.environ.get(AUTHKEY_ENV)
    if not authkey:
        sys.exit(f"r1kit.rollout.serve: set {AUTHKEY_ENV} to the secret the trainer uses (the same on both sides)")
    if serve_args.parent_pid is not None:
        threading.Thread(target=_exit_when_orphaned, args=(serve_args.parent_pid,), daemon=True).start()
    if options.num_threads is not None:
        import torch

        torch.set_num_threads(options.num_threads)
    from r1kit.rollout.worker import RolloutWorker

    host = build_host(serve_args.model, options)
    worker = RolloutWorker(
        host,
        model=serve_args.model,
        authkey=authkey.encode(),
        address=(serve_args.host, serve_args.port),
        exit_with_client=serve_args.exit_with_client,
    )
    address = f"{worker.address[0]}:{worker.address[1]}"
    print(
        f"rollout worker: {options.engine} engine on {host.device} serving {serve_args.model} at {address}",
        file=sys.stderr,
        flush=True,
    )
    if serve_args.port_file:
        _write_port(serve_args.port_file, worker.address[1])
    worker.serve()


if __name__ == "__main__":
    main()
