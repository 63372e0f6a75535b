"""Evaluation of a frozen backbone: feature extraction, weighted kNN, linear probe, metrics, results.

Shape legend: n = train (bank) examples, m = test examples, d = feature size, c = classes, k = neighbours.

Any transformers vision model whose output has `pooler_output` works: (batch, hidden) for
`AsclModel`, (batch, channels, 1, 1) for `ResNetModel` (flattened here).

Accuracy goes through `evaluate` with the metric modules shipped in `ascl_hf/metrics/`, loaded by
local path, so no Hub access is needed.

Results file schema (JSON, written by `save_results`, read by `load_results`, used by the model card):

    {
      "model": "<path or Hub id of the evaluated model>",
      "records": [
        {
          "dataset": "digits",                  # dataset name or path
          "split": "test",                       # split the metric was measured on
          "metric": "knn_top1_accuracy",         # see METRIC_NAMES
          "value": 0.953,                        # a fraction in [0, 1]
          "protocol": {"name": "weighted_knn", "k": 200, "temperature": 0.1, ...}
        },
        ...
      ]
    }
"""

import json
import math
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import datasets
import torch
from torch import nn
from torch.nn import functional
from tqdm.auto import tqdm

METRICS_DIRECTORY = Path(__file__).parent / "metrics"
METRIC_NAMES = (
    "knn_top1_accuracy",
    "knn_top5_accuracy",
    "linear_probe_top1_accuracy",
    "linear_probe_top5_accuracy",
)
RECORD_KEYS = ("dataset", "split", "metric", "value", "protocol")


# ----------------------------------------------------------------------------- feature extraction


class ImageBatchCollator:
    """Turns a list of dataset rows into `(pixel_values, labels)` with the model's image processor.

    A module-level class rather than a closure so DataLoader workers can pickle it on any platform.
    """

    def __init__(self, image_processor, image_column: str, label_column: str):
        self.image_processor = image_processor
        self.image_column = image_column
        self.label_column = label_column

    def __call__(self, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        # RGB because image processors normalise with three-channel means; grayscale sets
        # (MNIST, digits) would otherwise fail in `normalize`.
        images = [row[self.image_column].convert("RGB") for row in rows]
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        labels = torch.tensor([int(row[self.label_column]) for row in rows], dtype=torch.long)
        return pixel_values, labels


def _split_batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Accepts `(pixel_values, labels)` pairs or dicts with `pixel_values` and `labels`/`label`."""
    if isinstance(batch, dict):
        label_key = "labels" if "labels" in batch else "label"
        if "pixel_values" not in batch or label_key not in batch:
            raise KeyError(
                f"A batch dict needs 'pixel_values' and 'labels' (or 'label'); got keys {sorted(batch)}. "
                "Rename the columns or yield (pixel_values, labels) pairs."
            )
        return batch["pixel_values"], torch.as_tensor(batch[label_key])
    pixel_values, labels = batch
    return pixel_values, torch.as_tensor(labels)


def extract_features(
    model: nn.Module,
    data: datasets.Dataset | Iterable,
    image_processor=None,
    *,
    image_column: str = "image",
    label_column: str = "label",
    batch_size: int = 64,
    num_workers: int = 0,
    show_progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled, L2-normalised features of a frozen model over a labeled dataset.

    Args:
        model: a transformers vision model whose output has `pooler_output`; it runs on the
            device of its parameters, in eval mode (its previous mode is restored afterwards).
        data: either a `datasets.Dataset` with PIL images in `image_column` and integer labels in
            `label_column` (preprocessed with `image_processor`), or any iterable (a DataLoader)
            yielding `(pixel_values, labels)` pairs or dicts with `pixel_values` and `labels`,
            pixel_values (batch, channels, height, width) already preprocessed.
        image_processor: the model's image processor; required when `data` is a Dataset.

    Returns:
        features (n, d) float32 on the CPU, unit L2 norm per row, and labels (n,) int64.
    """
    if isinstance(data, datasets.Dataset):
        if image_processor is None:
            raise ValueError(
                "extract_features got a datasets.Dataset but no image_processor; pass "
                "AutoImageProcessor.from_pretrained(<model path>) to preprocess the images."
            )
        missing = {image_column, label_column} - set(data.column_names)
        if missing:
            raise KeyError(
                f"Dataset has no column(s) {sorted(missing)}; its columns are {data.column_names}. "
                "Pass image_column= and label_column= with the right names."
            )
        data = torch.utils.data.DataLoader(
            data.select_columns([image_column, label_column]),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=ImageBatchCollator(image_processor, image_column, label_column),
        )
    parameter = next(model.parameters())
    was_training = model.training
    model.eval()
    feature_chunks, label_chunks = [], []
    try:
        with torch.inference_mode():
            for batch in tqdm(data, desc="features", unit="batch", disable=not show_progress):
                pixel_values, labels = _split_batch(batch)
                output = model(pixel_values=pixel_values.to(device=parameter.device, dtype=parameter.dtype))
                pooled = getattr(output, "pooler_output", None)
                if pooled is None:
                    raise ValueError(
                        f"{type(model).__name__} returned no pooler_output; evaluate a backbone model "
                        "(AutoModel, not a task head), or one configured to pool its features."
                    )
                pooled = pooled.flatten(1).float()  # (batch, d); ResNet pools to (batch, d, 1, 1)
                feature_chunks.append(functional.normalize(pooled, dim=1).cpu())
                label_chunks.append(labels.long().cpu())
    finally:
        model.train(was_training)
    if not feature_chunks:
        raise ValueError("extract_features got no data: the dataset or loader is empty.")
    return torch.cat(feature_chunks), torch.cat(label_chunks)


# ----------------------------------------------------------------------------- weighted kNN


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Class scores of the weighted kNN classifier of InstDisc (Wu et al. 2018), used by MoCo/ASCL.

    Each test example takes its k most cosine-similar train examples; neighbour j votes for its
    class with weight exp(sim_j / temperature). Test examples are processed `chunk_size` at a time
    so memory stays at (chunk_size, n). k larger than the bank is clamped to n.

    Args:
        train_features: (n, d) bank features; normalised here, so raw features also work.
        train_labels: (n,) int class indices in [0, num_classes).
        test_features: (m, d), moved to the bank's device chunk by chunk.

    Returns:
        scores (m, c) float32 on the bank's device; higher is more likely.
    """
    if temperature <= 0:
        raise ValueError(f"knn temperature must be > 0, got {temperature}.")
    if k < 1:
        raise ValueError(f"knn k must be >= 1, got {k}.")
    bank = functional.normalize(train_features.float(), dim=1)  # (n, d)
    bank_labels = train_labels.to(bank.device).long()  # (n,)
    k = min(k, bank.shape[0])
    score_chunks = []
    for start in range(0, test_features.shape[0], chunk_size):
        queries = functional.normalize(test_features[start : start + chunk_size].to(bank.device).float(), dim=1)
        similarities, indices = (queries @ bank.T).topk(k, dim=1)  # (chunk, k)
        # Subtracting each row's maximum scales that row's scores by one constant, which keeps
        # the ranking but avoids float32 overflow of exp(1 / temperature) for small temperatures.
        weights = ((similarities - similarities[:, :1]) / temperature).exp()  # (chunk, k)
        scores = torch.zeros(queries.shape[0], num_classes, device=bank.device)
        score_chunks.append(scores.scatter_add_(1, bank_labels[indices], weights))  # (chunk, c)
    return torch.cat(score_chunks)


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    top: int = 5,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Ranked kNN predictions: (m, min(top, c)) class indices, best first (column 0 is top-1).

    Same arguments as `knn_predict`.
    """
    scores = knn_predict(
        train_features, train_labels, test_features,
        num_classes=num_classes, k=k, temperature=temperature, chunk_size=chunk_size,
    )
    return scores.topk(min(top, num_classes), dim=1).indices.cpu()


# ----------------------------------------------------------------------------- linear probe


class LinearProbe(nn.Module):
    """A linear classifier on frozen features, with an optional fixed standardisation in front.

    forward: features (batch, d) -> logits (batch, c). `protocol` records how it was trained.
    """

    def __init__(self, feature_size: int, num_classes: int, mean: torch.Tensor, std: torch.Tensor, protocol: dict):
        super().__init__()
        self.register_buffer("mean", mean)  # (d,)
        self.register_buffer("std", std)  # (d,)
        self.classifier = nn.Linear(feature_size, num_classes)
        self.protocol = protocol

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier((features - self.mean) / self.std)


def _check_probe_inputs(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"features (n={features.shape[0]}) and labels (n={labels.shape[0]}) differ in length.")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}); got [{int(labels.min())}, {int(labels.max())}]. "
            "Check num_classes."
        )


def train_linear_probe_fast(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    max_iterations: int = 300,
    weight_decay: float = 1e-4,
) -> LinearProbe:
    """Multinomial logistic regression fitted by full-batch L-BFGS on cached features (seconds on a CPU).

    Features are standardised per dimension with the training mean and std (stored in the probe),
    which makes the problem well conditioned; the small L2 penalty keeps the optimum finite on
    separable data. Not the paper's protocol (see `train_linear_probe_paper`), but it ranks
    backbones the same way in practice and is deterministic.

    Args:
        features: (n, d) frozen features. labels: (n,) int in [0, num_classes).
    """
    _check_probe_inputs(features, labels, num_classes)
    features, labels = features.float(), labels.long().to(features.device)
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)  # (d,); clamp: constant dims
    protocol = {
        "name": "linear_probe_fast", "optimizer": "lbfgs", "max_iterations": max_iterations,
        "weight_decay": weight_decay, "feature_standardization": True,
    }
    probe = LinearProbe(features.shape[1], num_classes, mean, std, protocol).to(features.device)
    nn.init.zeros_(probe.classifier.weight)
    nn.init.zeros_(probe.classifier.bias)
    optimizer = torch.optim.LBFGS(
        probe.classifier.parameters(),
        lr=1.0, max_iter=max_iterations, history_size=20, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = functional.cross_entropy(probe(features), labels)
        loss = loss + 0.5 * weight_decay * probe.classifier.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # callers may sit inside inference_mode
        optimizer.step(closure)
    return probe.eval()


def train_linear_probe_paper(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    epochs: int = 100,
    batch_size: int = 256,
    learning_rate: float = 10.0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    milestones: tuple[int, ...] = (60, 80),
    seed: int = 0,
    show_progress: bool = False,
) -> LinearProbe:
    """The MoCo/ASCL linear evaluation recipe, run on cached features.

    SGD with Nesterov momentum 0.9, batch 256, weight decay 0, 100 epochs, learning rate divided by
    10 at epochs 60 and 80 (MoCo `main_lincls.py`, followed by ASCL). MoCo's learning rate of 30
    is for raw average-pooled ResNet features; these features are L2-normalised (norm 1, about
    1/sqrt(d) per dimension), so the default here is 10 and no standardisation is applied.
    Difference from the paper, stated honestly: features are computed once, without the random
    crop/flip augmentation the paper applies to each epoch's training images.

    Args:
        features: (n, d) frozen features. labels: (n,) int in [0, num_classes).
    """
    _check_probe_inputs(features, labels, num_classes)
    features, labels = features.float(), labels.long().to(features.device)
    feature_size = features.shape[1]
    protocol = {
        "name": "linear_probe_paper", "optimizer": "sgd_nesterov", "epochs": epochs, "batch_size": batch_size,
        "learning_rate": learning_rate, "momentum": momentum, "weight_decay": weight_decay,
        "milestones": list(milestones), "feature_standardization": False, "augmentation": False,
    }
    identity_mean, identity_std = torch.zeros(feature_size), torch.ones(feature_size)
    probe = LinearProbe(feature_size, num_classes, identity_mean, identity_std, protocol).to(features.device)
    generator = torch.Generator().manual_seed(seed)
    # MoCo's initialisation of the linear layer.
    nn.init.normal_(probe.classifier.weight, std=0.01, generator=generator)
    nn.init.zeros_(probe.classifier.bias)
    optimizer = torch.optim.SGD(
        probe.parameters(), lr=learning_rate, momentum=momentum, weight_decay=weight_decay, nesterov=True
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=0.1)
    probe.train()
    with torch.enable_grad():
        for _ in tqdm(range(epochs), desc="linear probe", unit="epoch", disable=not show_progress):
            order = torch.randperm(features.shape[0], generator=generator).to(features.device)
            for start in range(0, features.shape[0], batch_size):
                batch = order[start : start + batch_size]
                loss = functional.cross_entropy(probe(features[batch]), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            scheduler.step()
    return probe.eval()


def linear_probe_classify(probe: LinearProbe, features: torch.Tensor, *, top: int = 5) -> torch.Tensor:
    """Ranked probe predictions: (m, min(top, c)) class indices, best first, on the CPU."""
    with torch.inference_mode():
        logits = probe(features.to(probe.mean.device).float())  # (m, c)
    return logits.topk(min(top, logits.shape[1]), dim=1).indices.cpu()


# ----------------------------------------------------------------------------- metrics


@lru_cache(maxsize=None)
def load_metric(name: str):
    """Loads a metric module (an `evaluate.EvaluationModule`) shipped in `ascl_hf/metrics/<name>/` by local path
    (no Hub access)."""
    path = METRICS_DIRECTORY / name
    if not (path / f"{name}.py").is_file():
        available = sorted(entry.name for entry in METRICS_DIRECTORY.iterdir() if entry.is_dir())
        raise FileNotFoundError(f"No shipped metric {name!r} in {METRICS_DIRECTORY}; available: {available}.")
    # Imported here, not at the top: scripts/evaluate.py shares the library's name, and any script run from
    # scripts/ would import that file instead of the library (the pretraining loop uses this module's kNN).
    import evaluate

    return evaluate.load(str(path))


def ranked_accuracies(ranked_predictions: torch.Tensor, references: torch.Tensor, *, k: int = 5) -> dict[str, float]:
    """Top-1 and top-k accuracy of ranked predictions (m, r) against references (m,).

    Returns {"top1_accuracy": ..., "top5_accuracy": ...} (the key names k), fractions in [0, 1].
    Top-k with fewer than k classes counts the whole ranking, which makes it 1.0 when r = c.
    """
    references_list = references.tolist()
    top1 = load_metric("accuracy").compute(predictions=ranked_predictions[:, 0].tolist(), references=references_list)
    top_k = load_metric("top_k_accuracy").compute(
        predictions=ranked_predictions.tolist(), references=references_list, k=k
    )
    return {"top1_accuracy": top1["accuracy"], f"top{k}_accuracy": top_k["top_k_accuracy"]}


# ----------------------------------------------------------------------------- results file


def make_record(dataset: str, split: str, metric: str, value: float, protocol: dict) -> dict:
    """One results record (see the module docstring); checks the metric name and value range."""
    if metric not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {metric!r}; use one of {METRIC_NAMES} (or add it to METRIC_NAMES).")
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"Metric {metric} must be a fraction in [0, 1], got {value}.")
    return {"dataset": dataset, "split": split, "metric": metric, "value": value, "protocol": dict(protocol)}


def save_results(path: str | Path, records: list[dict], *, model: str) -> Path:
    """Writes `{"model": model, "records": records}` as indented JSON; creates parent folders."""
    for record in records:
        make_record(**{key: record[key] for key in RECORD_KEYS})  # validates
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": model, "records": records}, indent=2) + "\n")
    return path


def load_results(path: str | Path) -> dict:
    """Reads a results file written by `save_results`: {"model": str, "records": [record, ...]}."""
    content = json.loads(Path(path).read_text())
    if not isinstance(content, dict) or "model" not in content or "records" not in content:
        raise ValueError(f"{path} is not an ascl-hf results file: expected keys 'model' and 'records'.")
    for index, record in enumerate(content["records"]):
        missing = [key for key in RECORD_KEYS if key not in record]
        if missing:
            raise ValueError(f"{path}: record {index} lacks {missing}; each record needs {list(RECORD_KEYS)}.")
    return content
