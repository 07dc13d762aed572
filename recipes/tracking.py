"""Experiment trackers: SFT and GRPO report to the same ones, under one project and the run's name.

The project (`--tracker_project`) groups runs; `--run_name` names this run.
GRPO reports through accelerate's trackers, SFT through transformers'
callbacks as "<run_name>-sft". TensorBoard writes to
OUTPUT_DIR/tensorboard/<run_name> and OUTPUT_DIR/tensorboard/<run_name>-sft.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, TensorBoardTracker

TENSORBOARD_DIR = "tensorboard"
# the accelerate tracker's init keyword that names a run (its first argument names the project)
RUN_NAME_KEYWORD = {"wandb": "name", "trackio": "name", "mlflow": "run_name", "clearml": "task_name",
                    "swanlab": "experiment_name"}  # fmt: skip


def grpo_trackers(report_to: list[str], output_dir: str | Path, run_name: str) -> list[str | GeneralTracker]:
    """`log_with` for the GRPO Accelerator: the names in `report_to`, TensorBoard pointed at its run folder."""
    return [TensorBoardTracker(run_name, Path(output_dir) / TENSORBOARD_DIR) if name == "tensorboard" else name
            for name in report_to]  # fmt: skip


def start_trackers(accelerator: Accelerator, project: str, run_name: str, settings: dict) -> None:
    """Start the accelerator's trackers under `project` / `run_name`, recording `settings` (non-scalars as text)."""
    scalars = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in settings.items()}
    init_kwargs = {name: {keyword: run_name} for name, keyword in RUN_NAME_KEYWORD.items()}
    accelerator.init_trackers(project, config=scalars, init_kwargs=init_kwargs)


@contextlib.contextmanager
def sft_tracker_environment(output_dir: str | Path, project: str, run_name: str) -> Iterator[None]:
    """Point transformers' tracker callbacks at the run's project and TensorBoard folder while SFT trains."""
    values = {
        "WANDB_PROJECT": project,
        "MLFLOW_EXPERIMENT_NAME": project,
        "TENSORBOARD_LOGGING_DIR": str(Path(output_dir) / TENSORBOARD_DIR / sft_run_name(run_name)),
    }
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update({name: value for name, value in values.items() if saved[name] is None})  # the user's win
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)


def sft_run_name(run_name: str) -> str:
    return f"{run_name}-sft"
