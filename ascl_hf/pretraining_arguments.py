"""Every flag of `scripts/pretrain.py`, in one dataclass; YAML presets under `configs/` set their defaults.

With no arguments the values below are the *quickstart*: a narrow ResNet-18 with the small-image stem on
scikit-learn's bundled digits, which trains on a 2-core CPU in well under a minute.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from transformers import HfArgumentParser, ResNetConfig

# ResNet layouts as transformers `ResNetConfig` arguments. "resnet18-narrow" is ResNet-18 at 1/4 width, for CPUs.
BACKBONES = {
    "resnet18": dict(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], embedding_size=64),
    "resnet18-narrow": dict(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[16, 32, 64, 128],
                            embedding_size=16),
    "resnet34": dict(layer_type="basic", depths=[3, 4, 6, 3], hidden_sizes=[64, 128, 256, 512], embedding_size=64),
    "resnet50": dict(layer_type="bottleneck", depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048],
                     embedding_size=64),
}


@dataclass
class PretrainingArguments:
    # --- data
    dataset: str = field(default="digits", metadata={"help": "'digits', 'fashion_mnist', an image folder or a Hub id."})
    dataset_split: str = "train"
    image_column: str | None = None
    label_column: str | None = None
    streaming: bool = False
    image_size: int = 32
    knn_dataset: str | None = field(
        default=None, metadata={"help": "Labeled source for the kNN monitor (default: --dataset)."}
    )
    knn_train_split: str = field(default="train", metadata={"help": "kNN memory bank split ('none' disables)."})
    knn_test_split: str = "test"
    # --- model (AsclConfig fields)
    backbone: str = field(default="resnet18-narrow", metadata={"help": f"One of {', '.join(BACKBONES)}."})
    small_image_stem: bool = True
    small_image_stem_max_pool: bool = False
    projection_hidden_size: int = 512
    projection_dim: int = 128
    predictor_hidden_size: int = 4096
    framework: Literal["moco", "byol"] = "moco"
    relation: Literal["ascl", "ahcl", "hard", "none"] = "ascl"
    queue_size: int = 256
    momentum: float = 0.99
    momentum_schedule: Literal["constant", "cosine"] = field(
        default="constant", metadata={"help": "'cosine' raises the momentum from --momentum to 1 (BYOL)."}
    )
    temperature: float = 0.1
    target_temperature: float = 0.05
    num_neighbors: int = 1
    shuffle_batch_norm: bool = True
    # --- augmentation
    crop_scale_min: float = 0.2
    key_view: Literal["weak", "strong"] = "weak"
    # --- optimisation
    epochs: int = 8
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many steps (overrides epochs)."})
    per_device_batch_size: int = 128
    base_learning_rate: float = field(
        default=0.06, metadata={"help": "Learning rate for a global batch of 256; scaled linearly with the batch."}
    )
    optimizer: Literal["sgd", "adamw"] = "sgd"
    sgd_momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    warmup_steps: int | None = field(default=None, metadata={"help": "Overrides --warmup_epochs (streaming)."})
    max_grad_norm: float | None = None
    # --- infrastructure
    output_dir: str = "outputs/quickstart"
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None, metadata={"help": "Default: what `accelerate config` says."}
    )
    num_workers: int = 2
    prefetch_factor: int = 4
    pin_memory: bool = True
    channels_last: bool = False
    torch_compile: bool = False
    fused_optimizer: bool = False
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    logging_steps: int = 10
    checkpointing_steps: int | None = field(default=None, metadata={"help": "Also save every N steps."})
    keep_checkpoints: int = 2
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder."})
    knn_every_epochs: int = 4
    knn_k: int = 200
    knn_temperature: float = 0.1
    export_backbone: bool = field(
        default=False,
        metadata={"help": "Also write OUTPUT_DIR/final-backbone, a plain transformers ResNetModel (ImageNet stem only)."},
    )
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = False
    freeze_batch_norm_statistics: bool = field(
        default=False,
        metadata={"help": "Test-only: BatchNorm uses running statistics, so results do not depend on the batch split."},
    )

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"--backbone {self.backbone!r} is unknown: choose one of {', '.join(BACKBONES)}.")
        for name in ("image_size", "per_device_batch_size", "epochs", "logging_steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.export_backbone and self.small_image_stem:
            raise ValueError(
                "--export_backbone needs the ImageNet-style stem: a plain ResNetModel cannot hold the 3x3 stride-1 "
                "small-image stem. Drop --export_backbone or pass --no_small_image_stem."
            )
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id org/name.")

    def backbone_config(self) -> ResNetConfig:
        return ResNetConfig(**BACKBONES[self.backbone])


def parse_pretraining_arguments(argv: list[str] | None = None) -> PretrainingArguments:
    """Parse `--config FILE.yaml` (optional) then flags; flags override the file, the file the defaults."""
    parser = HfArgumentParser(PretrainingArguments)
    parser.add_argument("--config", type=Path, help="YAML file of flag values, e.g. configs/cifar10_resnet18.yaml.")
    config_path = parser.parse_known_args(argv)[0].config
    if config_path is not None:
        values = yaml.safe_load(config_path.read_text()) or {}
        known = {f.name for f in dataclasses.fields(PretrainingArguments)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{config_path}: unknown keys {unknown}; valid keys are the flags of --help.")
        parser.set_defaults(**values)
    namespace = parser.parse_args(argv)
    del namespace.config
    return PretrainingArguments(**vars(namespace))
