"""Reading a run's ``metrics.jsonl`` (the one reader) and plotting its loss curves."""
import json
import math
from typing import Dict, Tuple


def read_metrics(path: str) -> Tuple[Dict[int, dict], Dict[int, dict]]:
    """(train records by step, eval records by step); later lines win, so a resumed run's
    re-logged steps replace the ones logged before the interruption."""
    train, evals = {}, {}
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                (train if record.get("split") == "train" else evals)[record["step"]] = record
    return train, evals


def plot_loss_curves(metrics_path: str, png_path: str) -> str:
    """One panel per loss term: train (line) and validation (markers) against the optimiser step."""
    fig = loss_curves_figure(metrics_path)      # selects the Agg backend before pyplot is imported
    if fig is None:
        return png_path
    import matplotlib.pyplot as plt

    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def loss_curves_figure(metrics_path: str):
    """The figure of :func:`plot_loss_curves` (``None`` without any loss term). A train curve of one point (a
    term logged once, e.g. the reconstruction loss of a one-step stage 2) is drawn as a marker: a line of one
    point draws nothing, which left an empty panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_metrics(metrics_path)
    records = list(train.values()) + list(evals.values())
    names = sorted({k for rec in records for k in rec if k.endswith("loss")}, key=lambda n: (n != "loss", n))
    if not names:
        return None
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for records, style, label in ((train, "-", "train"), (evals, "o--", "validation")):
            points = sorted((s, r[name]) for s, r in records.items() if name in r)
            if points:
                style = "o" if len(points) == 1 and style == "-" else style
                ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label, markersize=4)
        ax.set_title(name)
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


__all__ = [
    "read_metrics",
    "plot_loss_curves",
    "loss_curves_figure",
]
