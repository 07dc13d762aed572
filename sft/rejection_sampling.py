"""Rejection sampling: a checkpoint's own accepted completions become SFT data (DeepSeek-R1, stage 3).

For every prompt of a dataset:

    1. sample k completions with any rollout engine (torch, workers, vLLM);
    2. score them with a reward suite;
    3. accept a completion when every thresholded reward meets its threshold
       (score >= threshold; a reward that gave None fails) and, by default, when
       it ended on a stop token rather than at the length cap;
    4. drop duplicates (same text up to whitespace) and keep at most m per prompt,
       in sampling order;
    5. append the kept rows to sharded JSONL in TRL's format: prompt/completion
       for text prompts, messages for conversational ones. The dataset's other
       columns (a reference answer, ...) travel with each row.

    output_dir/
        shard-00000.jsonl, ...  the kept rows, `rows_per_shard` to a file
        provenance.json         the checkpoint, sampling settings, rewards and thresholds
        progress.json           prompts done, rows written and statistics so far: a
                                rerun with the same settings resumes after them
        stats.json              acceptance rate per reward, kept per prompt, prompts with none kept

`load_rejection_samples(output_dir)` reads the shards back as a `datasets.Dataset`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, load_dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from r1kit.grpo.data import checkpoint_stop_token_ids, encode_prompt
from r1kit.grpo.options import ConfigError
from r1kit.rewards import RewardSuite
from r1kit.rollout.engine import RolloutEngine, SamplingParams


@dataclass(frozen=True)
class RejectionSamplingConfig:
    """How many completions to draw and which to keep.

    samples_per_prompt: k, completions sampled per prompt.
    max_kept_per_prompt: m, most distinct accepted completions kept per prompt.
    thresholds: reward name -> lowest accepted score; every listed reward must pass.
    require_stop: reject completions cut by the length cap.
    prompts_per_batch: prompts sampled and scored together (the unit of progress and resume).
    rows_per_shard: kept rows per JSONL shard.
    """

    samples_per_prompt: int = 16
    max_kept_per_prompt: int = 4
    thresholds: Mapping[str, float] = field(default_factory=lambda: {"math_accuracy": 1.0})
    require_stop: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_new_tokens: int = 256
    seed: int = 0
    prompts_per_batch: int = 32
    rows_per_shard: int = 10_000
    prompt_column: str = "prompt"

    def __post_init__(self) -> None:
        for name in ("samples_per_prompt", "max_kept_per_prompt", "prompts_per_batch", "rows_per_shard"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rejection sampling: {name} must be >= 1, got {getattr(self, name)}")
        if not self.thresholds:
            raise ConfigError("rejection sampling needs at least one reward threshold")
        if not all(math.isfinite(value) for value in self.thresholds.values()):
            raise ConfigError(f"rejection sampling thresholds must be finite, got {dict(self.thresholds)}")

    def sampling_params(self, stop_token_ids: tuple[int, ...]) -> SamplingParams:
        return SamplingParams(
            n=self.samples_per_prompt, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, max_new_tokens=self.max_new_tokens, stop_token_ids=stop_token_ids, seed=self.seed,
        )  # fmt: skip


@dataclass
class RejectionStats:
    """Counts over the prompts processed so far.

    passed: reward name -> samples that met its threshold.
    kept_per_prompt: histogram, str(number kept) -> prompts (JSON keys are strings).
    """

    prompts: int = 0
    samples: int = 0
    accepted: int = 0  # met every threshold (and the stop rule), before deduplication and the cap
    kept: int = 0
    passed: dict[str, int] = field(default_factory=dict)
    kept_per_prompt: dict[str, int] = field(default_factory=dict)

    @property
    def prompts_without_kept(self) -> int:
        return self.kept_per_prompt.get("0", 0)

    def acceptance_rate(self, reward: str | None = None) -> float:
        """Share of samples accepted overall, or meeting one reward's threshold."""
        count = self.accepted if reward is None else self.passed.get(reward, 0)
        return count / self.samples if self.samples else math.nan

    def summary(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "samples": self.samples,
            "acceptance_rate": self.acceptance_rate(),
            "acceptance_rate_per_reward": {name: self.acceptance_rate(name) for name in self.passed},
            "kept": self.kept,
            "kept_per_prompt_mean": self.kept / self.prompts if self.prompts else math.nan,
            "kept_per_prompt": dict(sorted(self.kept_per_prompt.items(), key=lambda item: int(item[0]))),
            "prompts_without_kept": self.prompts_without_kept,
        }


def passes_thresholds(scores: Mapping[str, torch.Tensor], thresholds: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Per thresholded reward, a bool tensor (N,): score >= threshold (NaN, a None score, fails)."""
    missing = sorted(set(thresholds) - set(scores))
    if missing:
        raise ConfigError(f"rejection sampling thresholds name rewards the suite lacks: {missing}; it has {[*scores]}")
    return {name: scores[name] >= threshold for name, threshold in thresholds.items()}


def select_completions(texts: Sequence[str], accepted: Sequence[bool], max_kept: int) -> list[int]:
    """Indices of the first `max_kept` accepted texts that are distinct up to whitespace.

    >>> select_completions(["a b", "a  b", "c", "d"], [True, True, False, True], max_kept=5)
    [0, 3]
    """
    seen: set[str] = set()
    kept: list[int] = []
    for index, (text, ok) in enumerate(zip(texts, accepted, strict=True)):
        key = " ".join(text.split())
        if ok and key not in seen and len(kept) < max_kept:
            seen.add(key)
            kept.append(index)
    return kept


def sft_row(prompt: str | list[dict], completion: str, extra: Mapping[str, Any]) -> dict[str, Any]:
    """One SFT row: prompt/completion for a text prompt, messages for a conversation."""
    if isinstance(prompt, str):
        return {"prompt": prompt, "completion": completion, **extra}
    return {"messages": [*prompt, {"role": "assistant", "content": completion}], **extra}


class _ShardWriter:
    """Appends rows to shard-NNNNN.jsonl files, `rows_per_shard` each, resuming after `rows_written` rows."""

    def __init__(self, directory: Path, rows_per_shard: int, rows_written: int) -> None:
        self.directory, self.rows_per_shard, self.rows_written = directory, rows_per_shard, rows_written
        for path in directory.glob("shard-*.jsonl"):  # drop rows a stopped run wrote after its last record
            recorded = min(rows_per_shard, max(0, rows_written - int(path.stem.split("-")[1]) * rows_per_shard))
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            if recorded == 0:
                path.unlink()
            elif len(lines) > recorded:
                path.write_text("".join(lines[:recorded]), encoding="utf-8")

    def _path(self, shard: int) -> Path:
        return self.directory / f"shard-{shard:05d}.jsonl"

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        while rows:
            room = self.rows_per_shard - self.rows_written % self.rows_per_shard
            chunk, rows = rows[:room], rows[room:]
            with open(self._path(self.rows_written // self.rows_per_shard), "a", encoding="utf-8") as file:
                file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in chunk)
            self.rows_written += len(chunk)


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write `payload` to `path` atomically (a stopped run never leaves half a file)."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def rejection_sample(
    engine: RolloutEngine,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    suite: RewardSuite,
    config: RejectionSamplingConfig,
    output_dir: str | Path,
    *,
    checkpoint: str | None = None,
    progress: bool = True,
) -> RejectionStats:
    """Sample, score, filter and write SFT rows for every prompt of `dataset` (see the module docstring).

    A rerun into the same `output_dir` with the same settings resumes after the
    last finished batch; other settings raise instead of mixing two runs.
    checkpoint: the engine's model (a directory or hub id), recorded in provenance.json; the EOS ids of
        its generation config also end completions.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if config.prompt_column not in dataset.column_names:
        raise ConfigError(f"rejection sampling: dataset has no {config.prompt_column!r} column: {dataset.column_names}")
    provenance = {
        "checkpoint": checkpoint,
        "rewards": list(suite.names),
        "thresholds": dict(config.thresholds),
        "config": {**asdict(config), "thresholds": dict(config.thresholds)},
        "prompts": len(dataset),
    }
    stats, done = _resume_state(output_dir, provenance)
    write_json(output_dir / "provenance.json", provenance)
    writer = _ShardWriter(output_dir, config.rows_per_shard, stats.kept)
    params = config.sampling_params(checkpoint_stop_token_ids(tokenizer, checkpoint))
    extra_columns = [c for c in dataset.column_names if c not in (config.prompt_column, "completion", "messages")]
    bar = tqdm(total=len(dataset), initial=done, desc="rejection sampling", disable=not progress, dynamic_ncols=True)
    for start in range(done, len(dataset), config.prompts_per_batch):
        rows = dataset[start : start + config.prompts_per_batch]
        writer.write(_sample_batch(engine, tokenizer, suite, config, params, rows, extra_columns, stats))
        done = start + len(rows[config.prompt_column])
        write_json(output_dir / "progress.json", {"prompts_done": done, "stats": asdict(stats)})
        bar.update(len(rows[config.prompt_column]))
        bar.set_postfix(accepted=f"{stats.acceptance_rate():.1%}", kept=stats.kept)
    bar.close()
    write_json(output_dir / "stats.json", stats.summary())
    return stats


def _resume_state(output_dir: Path, provenance: Mapping[str, Any]) -> tuple[RejectionStats, int]:
    """(stats so far, prompts done) of an earlier run into `output_dir`; fresh ones when there is none."""
    progress_path, provenance_path = output_dir / "progress.json", output_dir / "provenance.json"
    if not progress_path.exists():
        return RejectionStats(), 0
    earlier = json.loads(provenance_path.read_text(encoding="utf-8")) if provenance_path.exists() else None
    if earlier != json.loads(json.dumps(provenance)):
        raise ConfigError(
            f"{output_dir} holds a rejection-sampling run with other settings (see its provenance.json); "
            "use another output directory"
        )
    progress = json.loads(progress_path.read_text(encoding="utf-8"))
    return RejectionStats(**progress["stats"]), int(progress["prompts_done"])


def _sample_batch(
    engine: RolloutEngine,
    tokenizer: PreTrainedTokenizerBase,
    suite: RewardSuite,
    config: RejectionSamplingConfig,
    params: SamplingParams,
    rows: dict[str, list],
    extra_columns: list[str],
    stats: RejectionStats,
) -> list[dict[str, Any]]:
    """Sample, score and filter one batch of prompts; update `stats`; return the rows to keep."""
    prompts, k = rows[config.prompt_column], config.samples_per_prompt
    batch = engine.generate([encode_prompt(tokenizer, prompt) for prompt in prompts], params)
    repeated = lambda values: [value for value in values for _ in range(k)]
    result = suite.score(repeated(prompts), batch.completion_text, {c: repeated(rows[c]) for c in extra_columns})
    passed = passes_thresholds(result.scores, config.thresholds)
    accepted = torch.stack(list(passed.values())).all(dim=0)
    if config.require_stop:
        accepted &= torch.tensor([reason == "stop" for reason in batch.finish_reason])
    for name, mask in passed.items():
        stats.passed[name] = stats.passed.get(name, 0) + int(mask.sum())
    stats.prompts += len(prompts)
    stats.samples += len(batch.completion_text)
    stats.accepted += int(accepted.sum())
    kept_rows = []
    for i, prompt in enumerate(prompts):
        texts = batch.completion_text[i * k : (i + 1) * k]
        chosen = select_completions(texts, accepted[i * k : (i + 1) * k].tolist(), config.max_kept_per_prompt)
        extra = {c: rows[c][i] for c in extra_columns}
        kept_rows += [sft_row(prompt, texts[j], extra) for j in chosen]
        stats.kept_per_prompt[str(len(chosen))] = stats.kept_per_prompt.get(str(len(chosen)), 0) + 1
    stats.kept += len(kept_rows)
    return kept_rows


def load_rejection_samples(output_dir: str | Path) -> Dataset:
    """The kept rows of a rejection-sampling run, as one Dataset (shards in order)."""
    shards = sorted(str(path) for path in Path(output_dir).glob("shard-*.jsonl"))
    if not shards:
        raise FileNotFoundError(f"{output_dir}: no shard-*.jsonl files (did rejection sampling keep anything?)")
    return load_dataset("json", data_files=shards, split="train")
