"""Names that differ between the transformers releases we support (5.19 to 5.24), decided once.

Two renames fall inside that range. Newer releases keep the old name as a
deprecated alias, but the older releases know only the old name:

- the decoding cache (5.24): `past_key_values` became `cache` as the keyword
  `generate()` passes to `forward`, the field of model outputs that
  `generate()` reads the cache back from, and the key of its model inputs;
- activation checkpointing (5.23): TrainingArguments' `gradient_checkpointing`
  and `PreTrainedModel.gradient_checkpointing_enable/disable` became
  `activation_checkpointing*`.

The toolkit uses the names below whenever it talks to transformers, so it runs
on every supported release without deprecation warnings, and our own model
accepts and returns its cache under the name `generate()` uses. Both are read
off the installed API, not off version numbers.
"""

from __future__ import annotations

import inspect

from transformers import GenerationMixin, PreTrainedModel

CACHE_NAME: str = (
    "cache"
    if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    else "past_key_values"
)
"""The decoding cache's keyword in `forward`, field in model outputs and key in `generate()`'s inputs."""

LEGACY_CACHE_NAME = "past_key_values"

# Read off the model class: TrainingArguments would pull the Trainer stack into every rollout worker.
ACTIVATION_CHECKPOINTING: str = (
    "activation_checkpointing"
    if hasattr(PreTrainedModel, "activation_checkpointing_enable")
    else "gradient_checkpointing"
)
"""TrainingArguments' (and so SFTConfig's and TRL's GRPOConfig's) switch for activation checkpointing."""


def with_cache_field(output_class: type) -> type:
    """Class decorator, under `@dataclass`: appends an optional field named `CACHE_NAME` to a model output.

    `generate()` looks the cache up in a model's outputs under that name; a field
    under the other name would be invisible to it (and 5.24 shadows it with None).
    """
    output_class.__annotations__ = {**output_class.__annotations__, CACHE_NAME: "LatentCache | None"}
    setattr(output_class, CACHE_NAME, None)
    return output_class


def pop_cache_argument(cache: object, kwargs: dict) -> object:
    """The cache a `forward` received as `cache` or as the older `past_key_values` (popped from kwargs).

    Raises a TypeError when both are given, so neither is ever dropped silently.
    """
    legacy = kwargs.pop(LEGACY_CACHE_NAME, None)
    if legacy is not None and cache is not None:
        raise TypeError(f"pass the decoding cache once, as `{CACHE_NAME}`; got both `cache` and `{LEGACY_CACHE_NAME}`")
    return legacy if cache is None else cache


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder layer's activations in backward instead of storing them."""
    getattr(model, f"{ACTIVATION_CHECKPOINTING}_enable")()


def disable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Store activations again (a model about to decode with a KV cache needs this)."""
    getattr(model, f"{ACTIVATION_CHECKPOINTING}_disable")()
