"""Multi-stage recipes: SFT, GRPO and rejection-sampling stages chained from one YAML file.

DeepSeek-R1 in five stages (recipes/configs/r1_tiny.yaml runs them on the embedded default):

    stages:
      - {name: cold_start, kind: sft}                        # SFT on the dataset's solutions
      - {name: reasoning_rl, kind: grpo, max_steps: 200}      # GRPO from the cold start
      - {name: rejection, kind: rejection_sampling, samples_per_prompt: 8}
      - {name: sft_on_samples, kind: sft, start: base, data: rejection}
      - {name: final_rl, kind: grpo, max_steps: 100}

Keys outside `stages` are the shared settings (any RecipeArguments or GRPOConfig
option); a stage's own keys override them for that stage. A stage starts from
the model of the model-producing stage before it, from `start: <stage name>`, or
from `start: base` (the shared `model`, or the untrained embedded default). An
SFT stage trains on the dataset's solutions or, with `data: <stage name>`, on a
rejection-sampling stage's kept completions. A rejection-sampling stage takes
the fields of RejectionSamplingConfig and `num_prompts` (the first N training
prompts; default all).

Every stage writes OUTPUT_DIR/<name>/ and, when it finishes, OUTPUT_DIR/<name>/stage.json
with its settings and held-out accuracy. A rerun skips each finished stage whose
settings and starting point are unchanged, so a stopped run resumes at the stage
it was in. The held-out accuracy after every model-producing stage is printed in
one table at the end and written to OUTPUT_DIR/stages.json.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml
from datasets import Dataset
from transformers import HfArgumentParser, PreTrainedTokenizerBase

from r1kit.grpo.config import GRPOConfig
from r1kit.grpo.evaluation import EvalResult
from r1kit.grpo.options import ConfigError
from r1kit.recipes.arguments import RecipeArguments
from r1kit.recipes.pipeline import (
    check_inputs,
    default_device,
    evaluate_checkpoint,
    load_task,
    run_pipeline,
    sampling,
    sft_start,
    train_sft,
    use_cpu_threads,
)
from r1kit.sft.rejection_sampling import RejectionSamplingConfig, load_rejection_samples, rejection_sample, write_json

Tokenizer = PreTrainedTokenizerBase
KINDS = ("sft", "grpo", "rejection_sampling")
STAGE_KEYS = ("name", "kind", "start", "data")
RS_KEYS = {f.name for f in fields(RejectionSamplingConfig)} | {"num_prompts"}
BASE = "base"


@dataclass(frozen=True)
class Stage:
    """One stage: its name and kind, where it starts, its data source and its own settings."""

    name: str
    kind: str
    start: str | None  # None: the previous model-producing stage's model (BASE for the first)
    data: str | None  # SFT: a rejection-sampling stage's name, or None for the dataset's solutions
    settings: dict[str, Any]


@dataclass(frozen=True)
class StageResult:
    name: str
    kind: str
    output: str  # the model directory, or the rejection-sampling output directory
    accuracy: float | None  # held-out accuracy of the stage's model (None for rejection sampling)
    seconds: float
    summary: dict[str, Any]  # kind-specific: the evaluation, or rejection-sampling statistics


def parse_stages(document: dict[str, Any]) -> tuple[dict[str, Any], list[Stage]]:
    """(shared settings, stages) from a recipe document, checked: names, kinds, references, keys."""
    document = dict(document)
    raw_stages = document.pop("stages", None)
    if not raw_stages:
        raise ConfigError("a multi-stage recipe needs a non-empty 'stages' list")
    stages: list[Stage] = []
    for index, raw in enumerate(raw_stages):
        if not isinstance(raw, dict) or "name" not in raw or "kind" not in raw:
            raise ConfigError(f"stage {index}: needs 'name' and 'kind', got {raw!r}")
        name, kind = str(raw["name"]), raw["kind"]
        if kind not in KINDS:
            raise ConfigError(f"stage {name!r}: kind must be one of {KINDS}, got {kind!r}")
        if name == BASE or any(stage.name == name for stage in stages):
            raise ConfigError(f"stage {name!r}: stage names must be unique and not {BASE!r}")
        models = {stage.name for stage in stages if stage.kind != "rejection_sampling"} | {BASE}
        samples = {stage.name for stage in stages if stage.kind == "rejection_sampling"}
        start, data = raw.get("start"), raw.get("data")
        if start is not None and start not in models:
            raise ConfigError(f"stage {name!r}: start {start!r} is neither {BASE!r} nor an earlier model stage")
        if data is not None and (kind != "sft" or data not in samples):
            raise ConfigError(f"stage {name!r}: data {data!r} must name an earlier rejection_sampling stage (SFT only)")
        settings = {k: v for k, v in raw.items() if k not in STAGE_KEYS}
        stages.append(Stage(name, kind, start, data, settings))
    return document, stages


def _recipe_arguments(shared: dict[str, Any], stage: Stage) -> tuple[RecipeArguments, GRPOConfig, dict[str, Any]]:
    """The stage's RecipeArguments and GRPOConfig (shared settings, then its own) and its remaining keys."""
    settings = {**shared, **stage.settings}
    known = {f.name for cls in (RecipeArguments, GRPOConfig) for f in fields(cls)}
    own = {k: v for k, v in settings.items() if k not in known}
    unknown = sorted(set(own) - (RS_KEYS if stage.kind == "rejection_sampling" else set()))
    if unknown:
        raise ConfigError(f"stage {stage.name!r}: unknown settings {unknown}")
    args, config = HfArgumentParser([RecipeArguments, GRPOConfig]).parse_dict(
        {k: v for k, v in settings.items() if k in known}
    )
    return args, config, own


def _fingerprint(stage: Stage, shared: dict[str, Any], start: str | None, upstream: list[str]) -> str:
    """A stage's identity: its settings, the shared ones and the fingerprints of what it starts from."""
    payload = {"stage": asdict(stage), "shared": shared, "start": start, "upstream": upstream}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_stages(document: dict[str, Any], *, announce: bool = True) -> list[StageResult]:
    """Run (or skip, when finished with the same settings) every stage of a recipe document, in order."""
    shared, stages = parse_stages(document)
    output_dir = Path(shared.get("output_dir", "outputs/stages"))
    models: dict[str, str] = {BASE: BASE}  # stage name -> model directory
    samples: dict[str, str] = {}  # rejection-sampling stage name -> its output directory
    fingerprints: dict[str, str] = {}
    results: list[StageResult] = []
    previous = BASE  # the last model-producing stage
    for stage in stages:
        start = stage.start or previous
        upstream = [fingerprints[name] for name in (start, stage.data) if name in fingerprints]
        fingerprint = _fingerprint(stage, shared, start, upstream)
        directory = output_dir / stage.name
        marker = directory / "stage.json"
        if marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
            result = StageResult(**json.loads(marker.read_text())["result"])
            if announce:
                print(f"stage {stage.name}: finished earlier, skipped ({marker})")
        else:
            if announce:
                print(f"\n=== stage {stage.name} ({stage.kind}) from {start} ===")
            began = time.perf_counter()
            data = samples.get(stage.data) if stage.data else None
            output, accuracy, summary = _run_stage(stage, shared, models[start], data, directory)
            result = StageResult(stage.name, stage.kind, output, accuracy, time.perf_counter() - began, summary)
            write_json(marker, {"fingerprint": fingerprint, "result": asdict(result)})  # atomic: a stop leaves none
        fingerprints[stage.name] = fingerprint
        if stage.kind == "rejection_sampling":
            samples[stage.name] = result.output
        else:
            models[stage.name], previous = result.output, stage.name
        results.append(result)
    _report(results, output_dir)
    return results


def _run_stage(stage: Stage, shared: dict[str, Any], start: str, data: str | None,
               directory: Path) -> tuple[str, float | None, dict[str, Any]]:  # fmt: skip
    """Run one stage from model `start` (and SFT data `data`) into `directory`: (output, accuracy, summary)."""
    args, config, own = _recipe_arguments(shared, stage)
    args.model = None if start == BASE else start
    config.output_dir = str(directory)
    if stage.kind == "grpo":  # the SFT-then-GRPO pipeline with the SFT part done
        args.sft = "never"
        result = run_pipeline(args, config)
        return result.final_model, result.grpo.accuracy, asdict(result.grpo)
    args = check_inputs(args)
    use_cpu_threads(args, default_device())
    train, held_out = load_task(args)
    if stage.kind == "sft":
        rows = train if data is None else load_rejection_samples(data)
        model = _sft_stage(args, config, rows, train, directory)
        evaluation = _evaluate(args, config, model, held_out)
        return model, evaluation.accuracy, asdict(evaluation)
    if args.model is None:
        raise ConfigError(f"stage {stage.name!r}: rejection sampling needs a trained model to start from")
    rs_config = RejectionSamplingConfig(**{k: v for k, v in own.items() if k != "num_prompts"})
    prompts = train.select(range(min(own.get("num_prompts", len(train)), len(train))))
    with sampling(args, args.model) as (engine, tokenizer, suite):
        stats = rejection_sample(engine, tokenizer, prompts, suite, rs_config, directory, checkpoint=args.model)
    summary = stats.summary()
    print(f"rejection sampling: kept {stats.kept} of {stats.samples} samples "
          f"({summary['acceptance_rate']:.1%} accepted), {stats.prompts_without_kept} prompts with none")  # fmt: skip
    return str(directory), None, summary


def _sft_stage(args: RecipeArguments, config: GRPOConfig, data: Dataset, train: Dataset, directory: Path) -> str:
    """SFT from the stage's start model on `data`; returns the saved model directory."""
    tokenizer, model = sft_start(args, train)
    target = directory / "model"
    train_sft(args, config, model, tokenizer, data, target, from_scratch=args.model is None)
    return str(target)


def _evaluate(args: RecipeArguments, config: GRPOConfig, model: str, held_out: Dataset) -> EvalResult:
    """Held-out accuracy of `model` with the same problems and sampling settings as the GRPO stages."""
    result = evaluate_checkpoint(args, config, model, held_out)
    print(f"held-out accuracy of {model}: {result.accuracy:.3f}")
    return result


def _report(results: list[StageResult], output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "stages.json").write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    print(f"\n{'stage':<20} {'kind':<20} {'held-out accuracy':>18} {'time':>9}")
    for result in results:
        accuracy = "" if result.accuracy is None else f"{result.accuracy:.1%}"
        print(f"{result.name:<20} {result.kind:<20} {accuracy:>18} {result.seconds / 60:>7.1f} m")
    print(f"Stages: {output_dir}/stages.json")


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A recipe document from YAML, with shared settings overridden by `overrides`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--config {path}: no such file")
    document = yaml.safe_load(path.read_text()) or {}
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of settings with a 'stages' list")
    return {**document, **(overrides or {})}
