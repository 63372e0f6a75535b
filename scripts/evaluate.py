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
import torch  # noqa: E402
from transformers import AutoImageProcessor, AutoModel  # noqa: E402

import ascl_hf  # noqa: E402, F401  (registers AsclModel with AutoModel)
from ascl_hf import evaluation, plots  # noqa: E402
from ascl_hf.data import ImageSource, load_image_dataset  # noqa: E402


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported model folder or Hub id")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow the model's custom code")
    parser.add_argument("--dataset", default="digits",
                        help='"digits" or "fashion_mnist" (offline), an image folder, or a Hub id')
    parser.add_argument("--train_split", default="train", help="split used as kNN bank and probe training set")
    parser.add_argument("--test_split", default="test")
    parser.add_argument("--image_column", default=None, help="detected when not given")
    parser.add_argument("--label_column", default=None, help="detected when not given")
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


def load_split(arguments: argparse.Namespace, split: str, cap: int | None) -> tuple[datasets.Dataset, ImageSource]:
    """A labeled split with decoded (PIL) images, for the model's own image processor."""
    source = load_image_dataset(arguments.dataset, split, image_column=arguments.image_column,
                                label_column=arguments.label_column)
    if source.label_column is None:
        raise SystemExit(f"{arguments.dataset} ({split}) has no label column; pass --label_column.")
    dataset = source.dataset.cast_column(source.image_column, datasets.Image())
    if cap is not None:
        dataset = dataset.shuffle(seed=0).select(range(min(cap, len(dataset))))
    return dataset, source


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
    train, source = load_split(arguments, arguments.train_split, arguments.max_train_samples)
    test, _ = load_split(arguments, arguments.test_split, arguments.max_test_samples)

    columns = dict(image_column=source.image_column, label_column=source.label_column)
    loading = dict(batch_size=arguments.batch_size, num_workers=arguments.num_workers)
    train_features, train_labels = evaluation.extract_features(model, train, image_processor, **columns, **loading)
    test_features, test_labels = evaluation.extract_features(model, test, image_processor, **columns, **loading)
    class_names = source.class_names
    num_classes = len(class_names) if class_names else int(torch.cat([train_labels, test_labels]).max()) + 1

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
