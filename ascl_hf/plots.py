"""Evaluation figures: a t-SNE map of test features and the kNN-accuracy curve of a training run.

Uses matplotlib's Agg backend (files only, no display), so it works on headless machines.
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy  # noqa: E402  (after the backend choice)
import torch  # noqa: E402
from matplotlib import pyplot  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402


def plot_embedding_map(
    features: torch.Tensor,
    labels: torch.Tensor,
    path: str | Path,
    *,
    class_names: list[str] | None = None,
    max_points: int = 2000,
    seed: int = 0,
    title: str = "t-SNE of test features",
) -> Path:
    """Saves a 2-D t-SNE map of features (n, d) coloured by labels (n,) as a PNG at `path`.

    At most `max_points` examples are drawn (a seeded random subset) because t-SNE is quadratic
    in the number of points.
    """
    generator = numpy.random.default_rng(seed)
    features, labels = features.float().cpu().numpy(), labels.cpu().numpy()
    if len(features) > max_points:
        keep = generator.choice(len(features), size=max_points, replace=False)
        features, labels = features[keep], labels[keep]
    if len(features) < 3:
        raise ValueError(f"An embedding map needs at least 3 points, got {len(features)}.")
    # Perplexity must stay below the number of points; 30 is sklearn's default for larger sets.
    perplexity = min(30.0, (len(features) - 1) / 3)
    coordinates = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)
    classes = numpy.unique(labels)
    colour_map = pyplot.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    figure, axes = pyplot.subplots(figsize=(7, 6), dpi=120)
    for index, label in enumerate(classes):
        chosen = labels == label
        name = class_names[label] if class_names is not None else str(label)
        axes.scatter(*coordinates[chosen].T, s=6, color=colour_map(index % colour_map.N), label=name)
    axes.set_title(title)
    axes.set_xticks([])
    axes.set_yticks([])
    # Legend outside the axes so it hides no points; one marker size big enough to read colours.
    axes.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=3, frameon=False, fontsize=8)
    return _save(figure, path)


def read_knn_history(path: str | Path) -> tuple[list[tuple[float, float]], str]:
    """Reads (x, kNN top-1 accuracy) pairs from a JSON-lines training log.

    Lines with a `knn_top1` key and an `epoch` or `step` key are used (preferring `epoch`); other
    lines (loss logs) are skipped. Returns the pairs and the x-axis name ("epoch" or "step").
    """
    history, axis = [], None
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        if "knn_top1" not in entry:
            continue
        axis = axis or ("epoch" if "epoch" in entry else "step" if "step" in entry else None)
        if axis is None or axis not in entry:
            raise ValueError(f"{path}: a knn_top1 line needs an 'epoch' or 'step' key, got {sorted(entry)}.")
        history.append((float(entry[axis]), float(entry["knn_top1"])))
    if not history:
        raise ValueError(f"{path} has no line with a 'knn_top1' key; was the kNN monitor enabled in training?")
    return history, axis


def plot_knn_curve(
    history: list[tuple[float, float]] | str | Path, path: str | Path, *, x_label: str = "epoch"
) -> Path:
    """Saves kNN top-1 accuracy over training as a PNG; `history` is (x, accuracy) pairs or a log path.

    Accuracies may be fractions or percentages; the y axis says which by their range.
    """
    if isinstance(history, (str, Path)):
        history, x_label = read_knn_history(history)
    steps, accuracies = zip(*sorted(history))
    percent = max(accuracies) > 1.0
    figure, axes = pyplot.subplots(figsize=(6, 4), dpi=120)
    axes.plot(steps, accuracies, marker="o", markersize=3)
    axes.set_xlabel(x_label)
    axes.set_ylabel("kNN top-1 accuracy" + (" (%)" if percent else ""))
    axes.set_title("kNN monitor during training")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, bbox_inches="tight")
    pyplot.close(figure)
    return path
