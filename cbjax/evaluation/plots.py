"""PNG plots of an evaluation: training curves from a run's metrics.jsonl and cosines per layer."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or available on servers
import matplotlib.pyplot as plt  # noqa: E402

# Panels of the training-curve figure: title and the metrics.jsonl keys drawn in it.
CURVE_PANELS = (
    ("loss", ("loss", "rerouting_loss", "retain_loss")),
    ("cosine to the frozen model (target layers)", ("rerouting_cosine", "retain_cosine", "val_rerouting_cosine", "val_retain_cosine")),
    ("loss coefficients", ("rerouting_coeff", "retain_coeff")),
    ("activation norm (target layers)", ("rerouting_norm", "rerouting_frozen_norm", "retain_norm")),
)


def read_metrics(path: str | Path) -> list[dict]:
    """Read the records of a metrics.jsonl file, skipping a last line cut off by a running trainer."""
    records = []
    for line in Path(path).read_text().split("\n"):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_training_curves(records: list[dict], path: Path) -> Path | None:
    """Draw each panel's metrics against the step; returns None when no record has a step."""
    records = [r for r in records if "step" in r]
    if not records:
        return None
    figure, axes = plt.subplots(2, 2, figsize=(11, 7))
    for axis, (title, keys) in zip(axes.flat, CURVE_PANELS):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, marker="o" if key.startswith("val_") else None, markersize=3, label=key)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_layer_cosines(representation: dict, target_layers: tuple[int, ...], path: Path) -> Path | None:
    """Plot one line per text set: mean cosine between trained and base hidden states at each layer."""
    if not representation:
        return None
    figure, axis = plt.subplots(figsize=(9, 4.5))
    for name, result in representation.items():
        style = "-" if result["kind"] == "harmful" else "--"
        axis.plot(range(len(result["cosine"])), result["cosine"], style, label=f"{name} ({result['kind']})")
    for layer in target_layers:
        axis.axvline(layer, color="grey", alpha=0.4, linewidth=1)
    axis.set_xlabel("hidden-state index (0 = embeddings; grey lines: target layers)")
    axis.set_ylabel("mean cosine, trained vs base")
    axis.set_ylim(min(-0.1, axis.get_ylim()[0]), 1.05)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
