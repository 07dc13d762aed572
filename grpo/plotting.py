"""The PNG report of a run: one panel per quantity, raw points and a moving average."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from grpo.metrics import read_metrics

SKIPPED_SUFFIXES = ("/std", "/errors", "/timeouts", "/not_applicable", "/total/mean")
# (title, metric-name prefixes drawn in the panel)
PANELS = (
    ("reward (mean over completions)", ("reward", "rewards/")),
    ("accuracy", ("accuracy", "eval/accuracy")),
    ("KL to reference (k3)", ("kl",)),
    ("completion length (tokens)", ("completion_length/mean",)),
    ("entropy (nats/token)", ("entropy",)),
    ("clipped fraction of tokens", ("clip/",)),
    ("expert load (max / mean)", ("moe/load_imbalance",)),
    ("sampler vs trainer: mean |log-prob difference|", ("mismatch/abs_logp_diff",)),
    ("generation throughput (tokens/s)", ("tokens_per_second",)),
)


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _series(records: list[dict], prefixes: tuple[str, ...]) -> dict[str, tuple[list[int], list[float]]]:
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        for key, value in record.items():
            if value is None or key.endswith(SKIPPED_SUFFIXES) or not key.startswith(prefixes):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(record["step"])
            values.append(value)
    return series


def plot_run(metrics_path: str | Path, png_path: str | Path, title: str = "GRPO run") -> Path:
    """Draw every panel that has data from `metrics.jsonl` into `png_path`; returns the path."""
    records = read_metrics(metrics_path)
    panels = [(name, s) for name, prefixes in PANELS if (s := _series(records, prefixes))]
    if not panels:
        raise ValueError(f"{metrics_path} has no metrics to plot")
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, series) in zip(axes.flat, panels, strict=False):
        for i, (key, (steps, values)) in enumerate(sorted(series.items())):
            color = f"C{i}"
            if len(values) > 10:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(steps, _moving_average(values, max(len(values) // 20, 3)), color=color, label=key)
            else:
                ax.plot(steps, values, color=color, marker="o", label=key)
        if not any(any(values) for _, values in series.values()):
            ax.text(0.5, 0.75, "0 at every step", transform=ax.transAxes, ha="center", color="0.4")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
