"""`AsclConfig`: every hyperparameter of an ASCL model in one validated object."""

import math

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

RELATIONS = ("ascl", "ahcl", "hard", "none")
FRAMEWORKS = ("moco", "byol")


class AsclConfig(PreTrainedConfig):
    r"""
    Configuration of an [`AsclModel`]: a vision backbone pretrained with Adaptive Soft Contrastive Learning
    (Feng & Patras, "Adaptive Soft Contrastive Learning", ICPR 2022, arXiv:2207.11163).

    Defaults are the paper's ImageNet setting: ResNet-50, MLP head 2048→2048→128, queue 65536, momentum
    0.999, temperature 0.1, target temperature 0.05, one neighbour. For 32–64 px images (CIFAR, STL-10,
    Tiny ImageNet) the paper uses a ResNet-18 with `small_image_stem=True`, queue 4096, momentum 0.99 and
    a 512→2048→128 head.

    Args:
        backbone_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the transformers vision backbone (anything `AutoModel.from_config` builds whose output has
            a `pooler_output`). Defaults to the ResNet-50 layout of `ResNetConfig()`.
        small_image_stem (`bool`, defaults to `False`):
            Replace a ResNet's 7×7 stride-2 stem convolution by a 3×3 stride-1 one and drop its max-pool, so that
            32 px inputs keep spatial resolution. Only valid for `model_type="resnet"` backbones.
        small_image_stem_max_pool (`bool`, defaults to `False`):
            Keep the stem max-pool with the small stem (the paper does so for 64 px Tiny ImageNet).
        projection_hidden_size (`int`, defaults to 2048): hidden width of the projection MLP.
        projection_dim (`int`, defaults to 128): output width of the projection MLP (the embedding D).
        predictor_hidden_size (`int`, defaults to 4096): hidden width of the BYOL predictor (framework "byol").
        framework (`str`, defaults to `"moco"`):
            `"moco"` (momentum encoder + queue of negatives) or `"byol"` (predictor, relations from the batch).
        relation (`str`, defaults to `"ascl"`):
            How neighbours enter the target: `"ascl"` (adaptive soft), `"ahcl"` (adaptive hard), `"hard"`
            (top-K set to 1) or `"none"` (plain MoCo v2 / BYOL).
        queue_size (`int`, defaults to 65536): number of past keys M kept as negatives (framework "moco").
        momentum (`float`, defaults to 0.999): base EMA coefficient m of the momentum encoder, in [0, 1].
        temperature (`float`, defaults to 0.1): τ of the contrastive logits.
        target_temperature (`float`, defaults to 0.05): τ' of the neighbour distribution behind the soft targets.
        num_neighbors (`int`, defaults to 1): K, the number of neighbours that receive target weight.
        shuffle_batch_norm (`bool`, defaults to `True`):
            Keep the key encoder's BatchNorm from seeing the same sample groups as the query encoder (see
            [`AsclModel`]); ignored for backbones without BatchNorm.
    """

    model_type = "ascl"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="resnet")}

    backbone_config: dict | PreTrainedConfig | None = None
    small_image_stem: bool = False
    small_image_stem_max_pool: bool = False
    projection_hidden_size: int = 2048
    projection_dim: int = 128
    predictor_hidden_size: int = 4096
    framework: str = "moco"
    relation: str = "ascl"
    queue_size: int = 65536
    momentum: float = 0.999
    temperature: float = 0.1
    target_temperature: float = 0.05
    num_neighbors: int = 1
    shuffle_batch_norm: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check_fields()

    @property
    def backbone_hidden_size(self) -> int:
        """Width of the backbone's pooled output, read from its config."""
        hidden_sizes = getattr(self.backbone_config, "hidden_sizes", None)
        if hidden_sizes:
            return int(hidden_sizes[-1])
        hidden_size = getattr(self.backbone_config, "hidden_size", None)
        if hidden_size is None:
            raise ValueError(
                f"backbone_config ({type(self.backbone_config).__name__}) has neither `hidden_sizes` nor "
                "`hidden_size`: use a vision backbone whose output has a pooled feature vector."
            )
        return int(hidden_size)

    def _check_fields(self) -> None:
        # Raised as plain ValueError naming the field, so that CLI and YAML users see what to change.
        def require(condition: bool, field: str, allowed: str) -> None:
            if not condition:
                raise ValueError(f"AsclConfig.{field}={getattr(self, field)!r} is invalid: {allowed}.")

        require(self.relation in RELATIONS, "relation", f"must be one of {', '.join(RELATIONS)}")
        require(self.framework in FRAMEWORKS, "framework", f"must be one of {', '.join(FRAMEWORKS)}")
        for field in ("projection_hidden_size", "projection_dim", "predictor_hidden_size", "queue_size"):
            value = getattr(self, field)
            require(isinstance(value, int) and value >= 1, field, "must be an integer >= 1")
        for field in ("temperature", "target_temperature"):
            value = getattr(self, field)
            require(
                isinstance(value, (int, float)) and math.isfinite(value) and value > 0, field, "must be a number > 0"
            )
        require(
            isinstance(self.momentum, (int, float)) and 0.0 <= self.momentum <= 1.0, "momentum", "must lie in [0, 1]"
        )
        require(isinstance(self.num_neighbors, int) and self.num_neighbors >= 1, "num_neighbors", "must be >= 1")
        if self.framework == "moco":
            require(
                self.num_neighbors <= self.queue_size,
                "num_neighbors",
                f"must not exceed queue_size ({self.queue_size})",
            )
        if self.small_image_stem:
            require(
                getattr(self.backbone_config, "model_type", None) == "resnet",
                "small_image_stem",
                "is only supported for ResNet backbones (backbone_config.model_type == 'resnet')",
            )
        self.backbone_hidden_size  # noqa: B018 -- fails early for backbones without a pooled width


__all__ = ["AsclConfig", "RELATIONS", "FRAMEWORKS"]
