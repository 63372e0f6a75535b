"""Evaluate a frozen backbone: weighted kNN and a linear probe, results JSON and figures.

    python scripts/evaluate.py --model outputs/ascl-resnet18 --dataset digits --output_dir outputs/eval

Writes <output_dir>/results.json (schema in `ascl_hf/evaluation.py`), embedding_map.png and, with
--log_file, knn_curve.png; prints a results table.
"""

import sys
from pathlib import Path

# This file shares its name with the `evaluate` library; drop the script's folder from the import
# path so that `import evaluate` (in ascl_hf.evaluation) finds the library, not this file.
SCRIPT_DIRECTORY = Path(__file__).resolve().parent
sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != SCRIPT_DIRECTORY]

import argparse  # noqa: E402

import datasets  # noqa: E402
import numpy  # noqa: E402
import torch  # noqa: E402
from transformers import AutoImageProcessor, AutoModel  # noqa: E402

import ascl_hf  # noqa: E402, F401  (registers AsclModel with AutoModel)
from ascl_hf import evaluation, plots  # noqa: E402

DIGITS_SEED = 0


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported model folder or Hub id")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow the model's custom code")
    parser.add_argument("--dataset", default="digits", help='imagefolder directory, Hub id, or "digits" (offline)')
    parser.add_argument("--train_split", default="train", help="split used as kNN bank and probe training set")
    parser.add_argument("--test_split", default="test")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--max_train_samples", type=int, default=None, help="cap the train split (quick runs)")
    parser.add_argument("--max_test_samples", type=int, default=None, help="cap the test split (quick runs)")
    parser.add_argument("--knn_k", type=int, default=200)
    parser.add_argument("--knn_temperature", type=float, default=0.1)
    parser.add_argument("--linear_probe", choices=["fast", "paper", "none"], default="fast")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers for image decoding")
    parser.add_argument("--output_dir", default="outputs/evaluation")
    parser.add_argument("--log_file", default=None, help="JSON-lines training log with knn_top1, for knn_curve.png")
    return parser.parse_args()


def load_digits_dataset() -> datasets.DatasetDict:
    """sklearn's 8x8 digits (1797 images, 10 classes) as train/test splits, for offline runs.

    A stand-in until `ascl_hf.data` offers built-in offline sets: stratified 80/20 split, fixed seed.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16; stretch them to the uint8 range real images have.
    pixels = (digits.images * (255 / 16)).round().astype(numpy.uint8)  # (1797, 8, 8)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(digit) for digit in range(10)])}
    )
    dataset = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(image) for image in pixels], "label": digits.target.tolist()},
        features=features,
    )
    return dataset.train_test_split(test_size=0.2, seed=DIGITS_SEED, stratify_by_column="label")


def load_splits(arguments: argparse.Namespace) -> tuple[datasets.Dataset, datasets.Dataset]:
    if arguments.dataset == "digits":
        splits = load_digits_dataset()
    elif Path(arguments.dataset).is_dir():
        splits = datasets.load_dataset("imagefolder", data_dir=arguments.dataset)
    else:
        splits = datasets.load_dataset(arguments.dataset)
    for split in (arguments.train_split, arguments.test_split):
        if split not in splits:
            raise SystemExit(f"Dataset {arguments.dataset} has no split {split!r}; its splits are {list(splits)}. "
                             "Pass --train_split/--test_split.")
    train, test = splits[arguments.train_split], splits[arguments.test_split]
    if arguments.max_train_samples is not None:
        train = train.shuffle(seed=0).select(range(min(arguments.max_train_samples, len(train))))
    if arguments.max_test_samples is not None:
        test = test.shuffle(seed=0).select(range(min(arguments.max_test_samples, len(test))))
    return train, test


def class_names_and_count(
    dataset: datasets.Dataset, label_column: str, labels: torch.Tensor
) -> tuple[list[str] | None, int]:
    feature = dataset.features.get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        return feature.names, feature.num_classes
    return None, int(labels.max()) + 1


def print_table(records: list[dict]) -> None:
    print(f"\n{'metric':<30} {'split':<10} {'value':>8}")
    for record in records:
        print(f"{record['metric']:<30} {record['split']:<10} {100 * record['value']:>7.2f}%")


def main() -> None:
    arguments = parse_arguments()
    output_directory = Path(arguments.output_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    model = AutoModel.from_pretrained(arguments.model, trust_remote_code=arguments.trust_remote_code).to(device)
    image_processor = AutoImageProcessor.from_pretrained(arguments.model, trust_remote_code=arguments.trust_remote_code)
    train, test = load_splits(arguments)

    columns = dict(image_column=arguments.image_column, label_column=arguments.label_column)
    loading = dict(batch_size=arguments.batch_size, num_workers=arguments.num_workers)
    train_features, train_labels = evaluation.extract_features(model, train, image_processor, **columns, **loading)
    test_features, test_labels = evaluation.extract_features(model, test, image_processor, **columns, **loading)
    all_labels = torch.cat([train_labels, test_labels])
    class_names, num_classes = class_names_and_count(train, arguments.label_column, all_labels)

    def record(metric: str, value: float, protocol: dict) -> dict:
        protocol = {**protocol, "train_split": arguments.train_split, "train_size": len(train_labels)}
        return evaluation.make_record(arguments.dataset, arguments.test_split, metric, value, protocol)

    ranked = evaluation.knn_classify(
        train_features.to(device), train_labels, test_features,
        num_classes=num_classes, k=arguments.knn_k, temperature=arguments.knn_temperature,
    )
    accuracies = evaluation.ranked_accuracies(ranked, test_labels)
    knn_protocol = {"name": "weighted_knn", "k": min(arguments.knn_k, len(train_labels)),
                    "temperature": arguments.knn_temperature}
    records = [
        record("knn_top1_accuracy", accuracies["top1_accuracy"], knn_protocol),
        record("knn_top5_accuracy", accuracies["top5_accuracy"], knn_protocol),
    ]

    if arguments.linear_probe != "none":
        train_probe = {"fast": evaluation.train_linear_probe_fast, "paper": evaluation.train_linear_probe_paper}
        probe = train_probe[arguments.linear_probe](train_features.to(device), train_labels, num_classes=num_classes)
        accuracies = evaluation.ranked_accuracies(evaluation.linear_probe_classify(probe, test_features), test_labels)
        records += [
            record("linear_probe_top1_accuracy", accuracies["top1_accuracy"], probe.protocol),
            record("linear_probe_top5_accuracy", accuracies["top5_accuracy"], probe.protocol),
        ]

    results_path = evaluation.save_results(output_directory / "results.json", records, model=arguments.model)
    map_path = plots.plot_embedding_map(
        test_features, test_labels, output_directory / "embedding_map.png", class_names=class_names,
        title=f"t-SNE of {arguments.dataset} {arguments.test_split} features",
    )
    print_table(records)
    print(f"\nresults: {results_path}\nembedding map: {map_path}")
    if arguments.log_file is not None:
        print(f"kNN curve: {plots.plot_knn_curve(arguments.log_file, output_directory / 'knn_curve.png')}")


if __name__ == "__main__":
    main()
