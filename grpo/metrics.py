"""Run metrics: one JSON line per logged step, mirrored to accelerate's trackers.

Sample completions go to samples.jsonl and, as a table, to the trackers that
draw one (W&B and ClearML through accelerate, TensorBoard as Markdown text),
with any columns the reward functions added through TRL's `log_extra`; what
they logged through `log_metric` is part of the step's metrics. Values JSON
cannot hold (a parsed expression, say) are written as their text.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

MAX_TABLE_TEXT = 2000  # characters of a prompt or completion shown in a tracker's table


def nan_mean_std(values: Tensor) -> tuple[float, float]:
    """Mean and (biased) std of the non-NaN entries; NaN, NaN when there are none."""
    kept = values[~torch.isnan(values)].double()
    if kept.numel() == 0:
        return math.nan, math.nan
    return kept.mean().item(), kept.std(unbiased=False).item()


@contextmanager
def timed(times: dict[str, float], name: str) -> Iterator[None]:
    """Adds the wall time of the block, in seconds, to times[name] (after the device's queued work is done)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        times[name] = times.get(name, 0.0) + time.perf_counter() - start


class MetricsLogger:
    """Appends metrics to `metrics.jsonl` in the run directory (main process only)."""

    def __init__(self, output_dir: str | Path, accelerator) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in record.items() if v is not None}, step=step)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        """Append completions with their rewards to `samples.jsonl` beside the metrics."""
        if not self.accelerator.is_main_process or not samples:
            return
        with self.path.with_name("samples.jsonl").open("a") as f:
            for sample in samples:
                record = {k: _jsonable(v) if isinstance(v, float) else v for k, v in sample.items()}
                f.write(json.dumps({"step": step, **record}, default=str) + "\n")
        if self.accelerator.trackers:
            log_samples_table(self.accelerator, step, samples)

    def reset(self) -> None:
        """Start empty metrics and samples files (a new run in a reused output directory)."""
        self.truncate_after(-1)

    def truncate_after(self, step: int) -> None:
        """Drop metrics and samples logged after `step` (a resumed run logs them again)."""
        if not self.accelerator.is_main_process:
            return
        for path in (self.path, self.path.with_name("samples.jsonl")):
            if path.exists():
                kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
                path.write_text("".join(line + "\n" for line in kept))


def log_samples_table(accelerator, step: int, samples: list[dict]) -> None:
    """Send `samples` (one dict per completion, same keys) to every tracker of `accelerator` that shows tables."""
    columns = list(samples[0])
    rows = [[_table_cell(sample.get(column)) for column in columns] for sample in samples]
    for tracker in accelerator.trackers:
        if hasattr(tracker, "log_table"):
            tracker.log_table("samples", columns=columns, data=rows, step=step)
        elif tracker.name == "tensorboard":
            tracker.tracker.add_text("samples", markdown_table(columns, rows), global_step=step)


def markdown_table(columns: list[str], rows: list[list]) -> str:
    """A Markdown table; pipes and newlines in cells are escaped so that each row stays one line."""
    cell = lambda value: str(value).replace("|", "\\|").replace("\n", "<br>")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows])


def _table_cell(value):
    """Numbers stay numbers; anything else (text, chat messages) becomes text of at most MAX_TABLE_TEXT characters."""
    if isinstance(value, int | float) or value is None:
        return value
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= MAX_TABLE_TEXT else text[:MAX_TABLE_TEXT] + " ..."


def _jsonable(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
