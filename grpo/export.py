"""Export a sharded run's checkpoint to Hugging Face format, one tensor at a time, on one process.

A checkpoint of a policy sharded with FSDP2 and expert parallelism holds its
weights as torch.distributed.checkpoint shards (`checkpoint-N/model/`, one file
per rank). This reads them back tensor by tensor and writes the released
DeepSeek-V3 layout that `load_policy`, transformers and vLLM load, streaming:
besides one tensor (and the embedding and head, which every MTP module copies),
at most one safetensors file (5 GB) is in memory. No GPU and no process group needed.

    python -m r1kit.grpo.export outputs/run/checkpoint-100 outputs/run/hf-100
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from transformers import AutoTokenizer, GenerationConfig

from r1kit.grpo.checkpoint import MODEL_DIR, save_model_atomic, single_process_is_intended
from r1kit.policy.checkpoint import StreamedStateDict
from r1kit.policy.config import DeepseekV3Config
from r1kit.policy.modeling import DeepseekV3ForCausalLM


def sharded_tensors(directory: Path, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for each of `names`, read from the shards in `directory` one at a time."""
    stored = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    for name in names:
        meta = stored[name]
        tensor = torch.empty(meta.size, dtype=meta.properties.dtype)
        with single_process_is_intended():
            dcp.load({name: tensor}, checkpoint_id=str(directory))
        yield name, tensor


def export_checkpoint(checkpoint: str | Path, output: str | Path) -> Path:
    """Write `checkpoint`'s sharded weights, config, generation config and tokenizer to `output`."""
    checkpoint, output = Path(checkpoint), Path(output)
    shards = checkpoint / MODEL_DIR
    if not shards.is_dir():
        raise FileNotFoundError(f"{checkpoint} holds no sharded weights ({MODEL_DIR}/): it is in Hugging Face "
                                "format already, or not a checkpoint")  # fmt: skip
    if json.loads((checkpoint / "config.json").read_text()).get("model_type") != "deepseek_v3":
        raise ValueError(f"{checkpoint}: only DeepSeek-V3 checkpoints are sharded by r1kit")
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(DeepseekV3Config.from_pretrained(checkpoint))
    if (checkpoint / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(checkpoint)
    names = list(model.state_dict())
    stored = dcp.FileSystemReader(str(shards)).read_metadata().state_dict_metadata
    missing = [name for name in names if name not in stored]
    if missing:
        raise ValueError(f"{shards} lacks {len(missing)} of the model's tensors, e.g. {missing[:3]}")
    weights = StreamedStateDict(sharded_tensors(shards, names), names)
    return save_model_atomic(model, AutoTokenizer.from_pretrained(checkpoint), output, state_dict=weights)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint-N directory of a sharded run")
    parser.add_argument("output", help="where to write the Hugging Face checkpoint")
    args = parser.parse_args(argv)
    print(f"exported to {export_checkpoint(args.checkpoint, args.output)}")


if __name__ == "__main__":
    main()
