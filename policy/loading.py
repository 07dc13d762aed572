"""`load_policy`: our DeepSeek-V3 model for deepseek_v3 checkpoints, transformers' model for any other.

The rest of the toolkit calls this one function and gets a causal LM with the
Hugging Face interface either way. A local directory is read with
`local_files_only`; a name that is not a local path is treated as a Hub id
(machines without Hub access get one short error instead of a retry traceback).

`fp8=True` (or an FP8Config) trains the model in FP8: ours through its config
(policy/fp8_policy.py: projections and routed experts), any other model through
`convert_to_fp8` (every nn.Linear except output heads and MoE routers). Either
way config.json records the recipe as `fp8`, and loading restores it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from r1kit.policy.config import fp8_recipe_fields
from r1kit.policy.fp8_gemm import FP8Config
from r1kit.policy.fp8_linear import convert_to_fp8
from r1kit.policy.modeling import DeepseekV3ForCausalLM

DEEPSEEK_V3_MODEL_TYPE = "deepseek_v3"


def load_policy(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    fp8: bool | FP8Config | None = None,
    **overrides,
) -> PreTrainedModel:
    """Loads a causal LM; `overrides` are config fields for our model, from_pretrained kwargs otherwise.

    fp8: True or an FP8Config to train in FP8, False to switch off a recipe our
    checkpoint's config.json carries, None to keep what the checkpoint says.
    """
    directory = _local_checkpoint(name_or_path)
    if directory is None:
        directory = _download(str(name_or_path))
    config = json.loads((directory / "config.json").read_text())
    if config.get("model_type") == DEEPSEEK_V3_MODEL_TYPE:
        if fp8 is not None:
            overrides["fp8"] = fp8_recipe_fields(fp8, "load_policy(fp8=...)")
        return DeepseekV3ForCausalLM.from_pretrained(directory, dtype=dtype, device=device, **overrides)
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype if dtype is not None else "auto", local_files_only=True, **overrides
    )
    recipe = fp8_recipe_fields(config.get("fp8") if fp8 is None else fp8, "load_policy(fp8=...)")
    if recipe is not None:
        convert_to_fp8(model, FP8Config(**recipe))
    if recipe is not None or "fp8" in config:
        model.config.fp8 = recipe  # saved with the model: loading it again restores the choice
    return model.to(device) if device is not None else model


def _local_checkpoint(name_or_path: str | os.PathLike) -> Path | None:
    """The directory if `name_or_path` is a local one; None if it looks like a Hub id; raises otherwise."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json; is it a model checkpoint directory?")
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; load_policy expects a checkpoint directory")
    text = str(name_or_path)
    looks_local = path.is_absolute() or text.startswith((".", "~")) or text.count("/") != 1
    if looks_local:
        raise FileNotFoundError(f"model path {text!r} does not exist")
    return None


def _download(repo_id: str) -> Path:
    """Fetches a Hub repository's config and weights, or fails with one line saying why."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as error:  # the hub client raises many types; the caller needs one clear message
        raise FileNotFoundError(
            f"{repo_id!r} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from None
