"""The PNG report of a run: one panel per quantity that varies, raw points and a moving average."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, MaxNLocator

from r1kit.grpo.config import GRPOConfig
from r1kit.grpo.metrics import read_metrics

SKIPPED_SUFFIXES = ("/std", "/errors", "/timeouts", "/not_applicable", "/total/mean")
ACCURACY_PANEL = "accuracy"
# (title, metric-name prefixes drawn in the panel)
PANELS = (
    ("reward (mean over completions)", ("reward", "rewards/")),
    (ACCURACY_PANEL, ("accuracy", "eval/accuracy")),
    ("KL to reference", ("kl",)),
    ("completion length (tokens)", ("completion_length/mean",)),
    ("entropy (nats/token)", ("entropy",)),
    ("clipped fraction of tokens", ("clip/",)),
    ("expert load (max / mean)", ("moe/load_imbalance",)),
    ("sampler vs trainer: mean |log-prob difference|", ("mismatch/abs_logp_diff",)),
    ("generation throughput (tokens/s)", ("tokens_per_second",)),
    ("time per step (s)", ("time/step_s", "time/generation_s", "time/forward_backward_s", "time/reference_s")),
)

LABELS = {"accuracy": "training batches", "eval/accuracy": "held-out", "time/step_s": "whole step",
          "time/generation_s": "generation", "time/forward_backward_s": "forward + backward",
          "time/reference_s": "reference log-probs"}  # fmt: skip
Series = dict[str, tuple[list[int], list[float]]]  # metric name -> (steps, values)


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _series(records: list[dict], prefixes: tuple[str, ...]) -> Series:
    series: Series = {}
    for record in records:
        for key, value in record.items():
            if value is None or key.endswith(SKIPPED_SUFFIXES) or not key.startswith(prefixes):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(record["step"])
            values.append(value)
    return series


def _is_constant(series: Series) -> bool:
    """Whether every line of a panel stays at one value (e.g. clip fractions at mu = 1): nothing to show."""
    return all(max(values) - min(values) <= 1e-12 * max(1.0, abs(max(values))) for _, values in series.values())


def settings_summary(config: GRPOConfig) -> str:
    """The settings that shape a GRPO run, for a report's title: "G = 8, lr = 0.0001, beta = 0.04, 200 steps"."""
    return (f"G = {config.num_generations}, lr = {config.learning_rate:g}, beta = {config.beta:g}, "
            f"{config.max_steps} steps")  # fmt: skip


def report_panels(records: list[dict], with_accuracy: bool = False) -> list[tuple[str, Series]]:
    """(title, {metric: (steps, values)}) for each panel worth drawing: those with data that varies.

    When every panel is constant (a run of one step) they are all kept; `with_accuracy`
    keeps the accuracy panel even without data, for held-out marks.
    """
    with_data = [(name, s) for name, prefixes in PANELS if (s := _series(records, prefixes))]
    panels = [(name, s) for name, s in with_data if not _is_constant(s)] or with_data
    if with_accuracy and not any(name == ACCURACY_PANEL for name, _ in panels):
        panels.insert(min(1, len(panels)), (ACCURACY_PANEL, {}))
    return panels


def _tick_label(value: float, _position: int) -> str:
    """Each tick written in full ("2e-07", "0.35", "4,500"), so no shared offset text crowds the panel title."""
    if 1e3 <= abs(value) < 1e7:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def plot_run(metrics_path: str | Path, png_path: str | Path, title: str = "GRPO run",
             held_out: dict[str, tuple[int, float]] | None = None) -> Path:  # fmt: skip
    """Draw a panel for every quantity that varies in `metrics.jsonl` into `png_path`; returns the path.

    held_out: {label: (step, accuracy)}, e.g. {"SFT": (0, 0.43), "GRPO": (200, 0.68)}: marked and
        labelled on the accuracy panel.
    """
    panels = report_panels(read_metrics(metrics_path), with_accuracy=bool(held_out))
    if not panels:
        raise ValueError(f"{metrics_path} has no metrics to plot")
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.4 * cols, 3.8 * rows), squeeze=False)
    for ax, (name, series) in zip(axes.flat, panels, strict=False):
        for i, (key, (steps, values)) in enumerate(sorted(series.items())):
            color, label = f"C{i}", LABELS.get(key, key)
            if len(values) > 10:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(steps, _moving_average(values, max(len(values) // 20, 3)), color=color, label=label)
            else:
                ax.plot(steps, values, color=color, marker="o", label=label)
        if name == ACCURACY_PANEL and held_out:
            _mark_held_out(ax, held_out)
        ax.set_title(name, fontsize=11)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_formatter(FuncFormatter(_tick_label))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def _mark_held_out(ax, held_out: dict[str, tuple[int, float]]) -> None:
    """Large markers with "LABEL 43.5%" beside them, for the held-out accuracies."""
    last = max(step for step, _ in held_out.values())
    for label, (step, accuracy) in held_out.items():
        ax.plot([step], [accuracy], marker="*", markersize=13, color="black", linestyle="none")
        at_end = step == last and len(held_out) > 1  # label the last mark on its left, inside the panel
        ax.annotate(f"{label} held-out: {accuracy:.1%}", (step, accuracy), textcoords="offset points",
                    xytext=(-8, -14) if at_end else (8, 6), ha="right" if at_end else "left",
                    fontsize=9, fontweight="bold", bbox={"boxstyle": "round,pad=0.2", "fc": "white", "alpha": 0.8,
                                                         "lw": 0})  # fmt: skip
    ax.margins(x=0.12, y=0.15)
