"""PNG plots of an evaluation report (drawn from the report dict alone) and of a run's training curves.

Figures are drawn on matplotlib's Agg canvas without pyplot, so no display or global backend is needed.
"""

import io

from etils import epath
from matplotlib.figure import Figure
import numpy as np
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from medjax import files

DPI = 100


def _save(figure: Figure, path: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    target = epath.Path(files.absolute(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(buffer.getvalue())
    return path


def _matrix_panel(figure: Figure, axes, matrix: np.ndarray, names, title: str, fmt: str) -> None:
    image = axes.imshow(matrix, cmap="Blues", vmin=0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    ticks = np.arange(len(names))
    axes.set_xticks(ticks, names, rotation=45, ha="right")
    axes.set_yticks(ticks, names)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    fontsize = 9 if len(names) <= 8 else 6
    for (i, j), value in np.ndenumerate(matrix):
        color = "white" if value > threshold else "black"
        axes.text(j, i, format(value, fmt), ha="center", va="center", color=color, fontsize=fontsize)


def confusion_figure(report: dict) -> Figure:
    """The confusion matrix as counts and normalised by row (the recall of each true class)."""
    names = report["class_names"]
    counts = np.asarray(report["confusion_matrix"])
    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    side = 2.5 + 0.6 * len(names)
    figure = Figure(figsize=(2 * side + 1, side))
    left, right = figure.subplots(1, 2)
    _matrix_panel(figure, left, counts, names, f'Counts ({report["num_examples"]} examples)', "d")
    _matrix_panel(figure, right, normalised, names, "Normalised by true class", ".2f")
    figure.tight_layout()
    return figure


def _auc_text(auc: float) -> str:
    return f"{auc:.6f}" if auc > 0.999 else f"{auc:.4f}"


def roc_figure(report: dict) -> Figure:
    """One-vs-rest ROC curve of each class whose AUC is defined, with the top-left corner enlarged."""
    figure = Figure(figsize=(6, 5.5))
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    curves = report["roc_curves"]
    for name, curve in curves.items():
        auc = report["per_class"][name]["auc"]
        axes.plot(curve["fpr"], curve["tpr"], linewidth=1.5, label=f"{name} (AUC {_auc_text(auc)})")
    title = "One-vs-rest ROC"
    if report["macro_auc"] is not None:
        title += f', macro AUC {_auc_text(report["macro_auc"])}'
        interval = report["bootstrap"]["macro_auc"]
        if interval is not None:
            level = 100 * report["bootstrap"]["level"]
            title += f"\n({level:.0f}% CI {_auc_text(interval[0])}-{_auc_text(interval[1])})"
    axes.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal", title=title)
    axes.set_xlabel("false positive rate (1 - specificity)")
    axes.set_ylabel("true positive rate (sensitivity)")
    axes.grid(alpha=0.3)
    # The sensitivity each class reaches without a false positive sets the zoom of the corner.
    at_zero = [max(t for f, t in zip(c["fpr"], c["tpr"]) if f == 0) for c in curves.values()]
    if at_zero and min(at_zero) < 1 and report["macro_auc"] > 0.95:
        side = float(np.clip(1.25 * (1 - min(at_zero)), 0.002, 0.1))
        inset = axes.inset_axes([0.38, 0.38, 0.45, 0.45])
        for curve in curves.values():
            inset.plot(curve["fpr"], curve["tpr"], linewidth=1.5)
        inset.set(
            xlim=(0, side), ylim=(1 - side, 1 + side / 50), title=f"fpr <= {side:.3g}, tpr >= {1 - side:.3g}"
        )
        inset.title.set_fontsize(8)
        inset.tick_params(labelsize=7)
        inset.grid(alpha=0.3)
    if curves:
        axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def reliability_figure(report: dict) -> Figure:
    """Accuracy against mean confidence in each confidence bin, above the number of examples per bin."""
    bins = report["reliability"]["bins"]
    lower = np.array([b["lower"] for b in bins])
    width = np.array([b["upper"] for b in bins]) - lower
    filled = [i for i, b in enumerate(bins) if b["count"]]
    figure = Figure(figsize=(5.5, 6.5))
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    top.bar(
        lower[filled],
        [bins[i]["accuracy"] for i in filled],
        width=width[filled],
        align="edge",
        edgecolor="black",
        label="accuracy in bin",
    )
    top.plot(
        [bins[i]["confidence"] for i in filled],
        [bins[i]["accuracy"] for i in filled],
        "o",
        color="darkred",
        markersize=4,
        label="(mean confidence, accuracy)",
    )
    top.set(ylim=(0, 1.01), ylabel="accuracy", title=f'Reliability, ECE {report["ece"]:.4f}')
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(lower, [b["count"] for b in bins], width=width, align="edge", edgecolor="black", color="grey")
    if any(b["count"] for b in bins):
        bottom.set_yscale("log")
    bottom.set(xlim=(0, 1), xlabel=report["reliability"]["binning"], ylabel="count")
    figure.tight_layout()
    return figure


def save_report_plots(report: dict, prefix: str) -> list[str]:
    """Writes f"{prefix}_confusion.png", f"{prefix}_roc.png" and f"{prefix}_reliability.png"."""
    figures = {"confusion": confusion_figure, "roc": roc_figure, "reliability": reliability_figure}
    return [_save(draw(report), f"{prefix}_{kind}.png") for kind, draw in figures.items()]


def read_scalars(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{tag: (steps, values)} of every scalar in the event files directly in `workdir`, sorted by step;
    a step logged twice (a resumed run) keeps its last value."""
    accumulator = event_accumulator.EventAccumulator(
        files.absolute(workdir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0}
    )
    accumulator.Reload()
    tags = accumulator.Tags()
    series = {}
    for tag in tags[event_accumulator.SCALARS]:
        series[tag] = [(e.step, e.value) for e in accumulator.Scalars(tag)]
    for tag in tags[event_accumulator.TENSORS]:
        values = [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in accumulator.Tensors(tag)]
        if values and all(v.size == 1 for _, v in values):
            series[tag] = [(step, float(v.reshape(()))) for step, v in values]
    result = {}
    for tag, points in series.items():
        last = dict(points)
        steps = np.array(sorted(last))
        result[tag] = (steps, np.array([last[s] for s in steps], np.float64))
    return result


def training_figure(scalars: dict[str, tuple[np.ndarray, np.ndarray]]) -> Figure:
    """Accuracy and loss against the iteration, from `read_scalars`' result.

    Training curves are train/accuracy and train/loss (means over each logging interval); validation is
    eval/accuracy; any other `<split>/accuracy` (a final evaluation) is drawn as a single marker.
    """
    figure = Figure(figsize=(11, 4.2))
    accuracy_axes, loss_axes = figure.subplots(1, 2)
    if "train/accuracy" in scalars:
        accuracy_axes.plot(*scalars["train/accuracy"], label="train")
    if "eval/accuracy" in scalars:
        accuracy_axes.plot(*scalars["eval/accuracy"], marker="o", markersize=3, label="validation")
    for tag in sorted(scalars):
        split, _, name = tag.partition("/")
        if name == "accuracy" and split not in ("train", "eval"):
            accuracy_axes.plot(
                *scalars[tag], marker="*", markersize=10, linestyle="none", label=f"{split} (final)"
            )
    accuracy_axes.set(xlabel="iteration", ylabel="accuracy", title="Accuracy")
    if "train/loss" in scalars:
        loss_axes.plot(*scalars["train/loss"], label="train")
    loss_axes.set(xlabel="iteration", ylabel="loss", title="Loss")
    for axes in (accuracy_axes, loss_axes):
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def save_training_curves(workdir: str, path: str) -> str:
    """Writes `path`: the training curves (`training_figure`) of the event files in `workdir`."""
    scalars = read_scalars(workdir)
    if "train/loss" not in scalars and "train/accuracy" not in scalars:
        raise ValueError(f"No train/loss or train/accuracy scalars in the event files in {workdir}.")
    return _save(training_figure(scalars), path)
