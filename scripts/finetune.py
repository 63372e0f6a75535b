"""Fine-tune an exported ASCL backbone on a labeled image dataset and print its test accuracy.

    python scripts/finetune.py --model outputs/quickstart/final --dataset digits --epochs 3

--model is an exported folder or Hub id: an ASCL export (loaded with the installed ascl_hf code, or with the
folder's own code when --trust_remote_code is given) or a plain backbone export (`export_backbone=True`, a standard
transformers model such as ResNetModel, which `AutoModelForImageClassification` also fine-tunes directly).
A linear or MLP head is trained on the pooled features (`pooler_output`); the backbone stays frozen unless
--train_backbone. Images are preprocessed with the folder's own image processor.
"""

import argparse

import datasets
import torch
from torch import nn
from transformers import AutoImageProcessor, AutoModel

import ascl_hf  # noqa: F401  (registers AsclModel with AutoModel)
from ascl_hf.data import load_image_dataset
from ascl_hf.evaluation import ImageBatchCollator


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported folder or Hub id")
    parser.add_argument("--trust_remote_code", action="store_true", help="run the folder's own model code")
    parser.add_argument("--dataset", default="digits", help='"digits" (offline), an image folder or a Hub id')
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--test_split", default="test")
    parser.add_argument("--head", choices=["linear", "mlp"], default="linear")
    parser.add_argument("--train_backbone", action="store_true", help="fine-tune the backbone too (at lr / 10)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args(argv)
    if arguments.epochs < 1:
        parser.error("--epochs must be at least 1.")
    return arguments


class FeatureClassifier(nn.Module):
    """Backbone → pooled features (batch, hidden) → head → logits (batch, num_labels)."""

    def __init__(self, backbone: nn.Module, feature_size: int, num_labels: int, head: str):
        super().__init__()
        self.backbone = backbone
        if head == "linear":
            self.head = nn.Linear(feature_size, num_labels)
        else:
            self.head = nn.Sequential(
                nn.Linear(feature_size, feature_size), nn.ReLU(), nn.Linear(feature_size, num_labels)
            )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # ResNetModel pools to (batch, hidden, 1, 1), AsclModel to (batch, hidden).
        return self.head(self.backbone(pixel_values=pixel_values).pooler_output.flatten(1))


def feature_size(config) -> int:
    """Width of `pooler_output` for an AsclConfig or a plain transformers vision config."""
    if hasattr(config, "backbone_hidden_size"):
        return config.backbone_hidden_size
    return config.hidden_sizes[-1] if getattr(config, "hidden_sizes", None) else config.hidden_size


def labeled_loader(arguments, split: str, processor, shuffle: bool) -> tuple[torch.utils.data.DataLoader, int]:
    """A DataLoader of (pixel_values, labels) for one split, and the number of classes."""
    source = load_image_dataset(arguments.dataset, split)
    if source.label_column is None:
        raise ValueError(f"{arguments.dataset!r} ({split}) has no label column; fine-tuning needs labeled images.")
    dataset = source.dataset.cast_column(source.image_column, datasets.Image())  # decoded PIL images
    num_labels = len(source.class_names) if source.class_names else max(dataset[source.label_column]) + 1
    collator = ImageBatchCollator(processor, source.image_column, source.label_column)
    loader = torch.utils.data.DataLoader(dataset, batch_size=arguments.batch_size, shuffle=shuffle, collate_fn=collator)
    return loader, num_labels


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    for pixel_values, labels in loader:
        correct += int((model(pixel_values).argmax(dim=1) == labels).sum())
        total += len(labels)
    return correct / total


def main(argv: list[str] | None = None) -> float:
    arguments = parse_arguments(argv)
    torch.manual_seed(arguments.seed)
    processor = AutoImageProcessor.from_pretrained(arguments.model)
    backbone = AutoModel.from_pretrained(arguments.model, trust_remote_code=arguments.trust_remote_code or None)
    train_loader, num_labels = labeled_loader(arguments, arguments.train_split, processor, shuffle=True)
    test_loader, _ = labeled_loader(arguments, arguments.test_split, processor, shuffle=False)
    model = FeatureClassifier(backbone, feature_size(backbone.config), num_labels, arguments.head)

    backbone.requires_grad_(arguments.train_backbone)
    parameter_groups = [{"params": model.head.parameters(), "lr": arguments.learning_rate}]
    if arguments.train_backbone:
        parameter_groups.append({"params": backbone.parameters(), "lr": arguments.learning_rate / 10})
    optimizer = torch.optim.AdamW(parameter_groups)

    for epoch in range(arguments.epochs):
        model.train()
        # A frozen backbone keeps its pretrained BatchNorm statistics.
        backbone.train(arguments.train_backbone)
        total_loss = 0.0
        for pixel_values, labels in train_loader:
            loss = nn.functional.cross_entropy(model(pixel_values), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(labels)
        test_accuracy = accuracy(model, test_loader)
        print(f"epoch {epoch + 1}: train loss {total_loss / len(train_loader.dataset):.4f}, "
              f"{arguments.test_split} accuracy {test_accuracy:.4f}")
    return test_accuracy


if __name__ == "__main__":
    main()
