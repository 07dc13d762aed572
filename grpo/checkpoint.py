"""Checkpoints that are never half-written and resume a run exactly.

A checkpoint directory `checkpoint-{step}` holds the policy and tokenizer in
Hugging Face format (loadable by `r1kit.policy.load_policy`, transformers and vLLM;
for a policy sharded with FSDP2 and expert parallelism, config files plus the
weights' shards in `model/`, which `python -m r1kit.grpo.export` converts), the
optimizer state in `optimizer/` (torch.distributed.checkpoint: every rank writes
its own shard and reads back its own, on any number of processes), and
`training_state.pt`: scheduler, RNG states and the trainer's own state (step,
prompt position, policy version, a prefetched batch). Everything is written
into a temporary sibling directory first and renamed into place, so a crash
leaves either the previous checkpoint or the new one, never a partial one.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.pt"
OPTIMIZER_DIR = "optimizer"
MODEL_DIR = "model"  # the weights of a sharded policy, instead of Hugging Face files


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_model_atomic(
    model: nn.Module,
    tokenizer,
    directory: str | Path,
    extra_state: dict | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    move_in: dict[str, Path] | None = None,
) -> Path:
    """Write model + tokenizer (+ `training_state.pt` if given) to `directory` via a temporary rename.

    state_dict: the weights to write when the module's own are sharded (FSDP, ZeRO-3); default its own.
    move_in: name -> an already written file or directory to move into `directory` under that name;
    when it holds the weights (`MODEL_DIR`), only the model's config files are written.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    move_in = move_in or {}
    try:
        if MODEL_DIR in move_in:
            model.config.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
        tokenizer.save_pretrained(tmp)
        if extra_state is not None:
            torch.save(extra_state, tmp / STATE_FILE)
        for name, written in move_in.items():
            os.replace(written, tmp / name)
        if directory.exists():
            stale = directory.with_name(f".{directory.name}.stale")
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(directory, stale)
            os.replace(tmp, directory)
            shutil.rmtree(stale)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """`checkpoint-{step}` directories under `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


@contextlib.contextmanager
def single_process_is_intended() -> Iterator[None]:
    """Without a process group, torch.distributed.checkpoint reads and writes one process's files, and says so
    on every call: a run on one process means it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_sharded_model(model: nn.Module, directory: str | Path) -> None:
    """Write `model`'s weights to `directory`, each rank its own shard, nothing gathered. A collective."""
    state = get_model_state_dict(model)
    with single_process_is_intended():
        dcp.save(state, checkpoint_id=str(directory))


def load_sharded_model(model: nn.Module, directory: str | Path) -> None:
    """Read back what `save_sharded_model` wrote, each rank its shard of this run's sharding. A collective."""
    state = get_model_state_dict(model)
    with single_process_is_intended():
        dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(model, state)


def save_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | Path) -> None:
    """Write the optimizer state of `model`'s parameters to `directory`, each rank its own shard.

    A collective: every process calls it with the same directory.
    """
    state = get_optimizer_state_dict(model, optimizer)
    with single_process_is_intended():
        dcp.save(state, checkpoint_id=str(directory))


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | Path) -> None:
    """Read back what `save_optimizer` wrote, each rank its shard of this run's sharding. A collective."""
    state = get_optimizer_state_dict(model, optimizer)  # the layout to fill: every state tensor, sharded as now
    with single_process_is_intended():
        dcp.load(state, checkpoint_id=str(directory))
    set_optimizer_state_dict(model, optimizer, state)


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    tokenizer,
    optimizer_dir: Path,
    scheduler,
    trainer_state: dict,
    keep_last: int | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    sharded_model_dir: Path | None = None,
) -> Path:
    """Save `checkpoint-{step}`, moving in the optimizer state `save_optimizer` wrote to `optimizer_dir` (and
    the weights `save_sharded_model` wrote to `sharded_model_dir`, if given, instead of Hugging Face files),
    and delete all but the newest `keep_last` checkpoints."""
    state = {"scheduler": scheduler.state_dict(), "rng": rng_state(), "trainer": trainer_state}
    written = {OPTIMIZER_DIR: optimizer_dir} | ({} if sharded_model_dir is None else {MODEL_DIR: sharded_model_dir})
    path = save_model_atomic(model, tokenizer, Path(output_dir) / f"checkpoint-{step}", state, state_dict,
                             move_in=written)  # fmt: skip
    if keep_last is not None:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old)
    return path


def load_training_state(checkpoint: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """Restore optimizer (a collective), scheduler and RNG states; return the trainer's own saved state."""
    path = Path(checkpoint) / STATE_FILE
    if not path.exists() or not (Path(checkpoint) / OPTIMIZER_DIR).is_dir():
        missing = f"{STATE_FILE} or {OPTIMIZER_DIR}/ is missing"
        raise FileNotFoundError(f"{checkpoint} is not a training checkpoint: {missing}")
    state = torch.load(path, weights_only=False)
    load_optimizer(model, optimizer, Path(checkpoint) / OPTIMIZER_DIR)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["trainer"]
