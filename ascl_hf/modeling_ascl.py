"""`AsclModel`: a vision backbone with the ASCL projection head, momentum encoder, queue and loss.

Inference (`forward(pixel_values)`) is a plain feature extractor; pretraining (`forward(pixel_values,
key_pixel_values)`) also returns the ASCL loss. This file and the ones it imports relatively are copied next
to saved checkpoints for `trust_remote_code`, so they import nothing beyond torch and transformers.
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_ascl import AsclConfig
from .distributed import broadcast_from_main, gather_from_all_processes, rank, sizes_of_all_processes, world_size
from .loss import byol_soft_loss, moco_soft_loss
from .queue import KeyQueue


@dataclass
class AsclModelOutput(ModelOutput):
    """
    Args:
        loss: scalar ASCL loss, only when `key_pixel_values` is given.
        last_hidden_state: the backbone's last feature map, e.g. (batch_size, hidden_size, height, width) for CNNs.
        pooler_output: (batch_size, hidden_size) pooled backbone features: the representation to transfer.
        hidden_states: the backbone's per-stage outputs when `output_hidden_states=True`.
        confidence: mean confidence of the soft targets (pretraining only).
        max_neighbor_weight: mean largest target weight given to a non-positive (pretraining only).
    """

    loss: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    confidence: torch.FloatTensor | None = None
    max_neighbor_weight: torch.FloatTensor | None = None


class MultiLayerPerceptron(nn.Sequential):
    """Linear → (BatchNorm) → ReLU → Linear: MoCo v2's projection head, or with BatchNorm BYOL's heads."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int, batch_norm: bool):
        layers = [nn.Linear(input_size, hidden_size, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden_size))
        layers += [nn.ReLU(inplace=True), nn.Linear(hidden_size, output_size)]
        super().__init__(*layers)


def use_small_image_stem(resnet: nn.Module, keep_max_pool: bool) -> None:
    """Swap a transformers ResNet's 7×7 stride-2 stem conv for a 3×3 stride-1 one (CIFAR-style)."""
    stem = resnet.embedder.embedder.convolution
    resnet.embedder.embedder.convolution = nn.Conv2d(
        stem.in_channels, stem.out_channels, kernel_size=3, stride=1, padding=1, bias=False
    )
    if not keep_max_pool:
        resnet.embedder.pooler = nn.Identity()


def pooled_features(backbone_output: ModelOutput) -> torch.Tensor:
    """(batch_size, hidden_size) from a backbone output; CNN poolers return (batch_size, hidden_size, 1, 1)."""
    pooled = backbone_output.pooler_output
    if pooled is None:
        raise ValueError("The backbone returned no `pooler_output`: choose a backbone with a pooling layer.")
    return pooled.flatten(1)


class AsclPreTrainedModel(PreTrainedModel):
    config_class = AsclConfig
    base_model_prefix = "ascl"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # Published checkpoints carry neither the momentum encoder nor the queue (see AsclModel.save_pretrained).
    _keys_to_ignore_on_load_missing = [r"^momentum_", r"^queue\."]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Backbone modules are initialised by the backbone's own PreTrainedModel; these are the heads.
        if isinstance(module, nn.Linear):
            module.reset_parameters()
        elif isinstance(module, nn.BatchNorm1d):
            module.reset_parameters()
        elif isinstance(module, KeyQueue):
            module.reset()


class AsclModel(AsclPreTrainedModel):
    r"""
    A backbone pretrained with Adaptive Soft Contrastive Learning (Feng & Patras, ICPR 2022).

    Modules: `backbone` (any transformers vision model with a pooled output), `projection` (MLP to the
    embedding), for BYOL a `predictor`; the momentum copies `momentum_backbone` and `momentum_projection`
    (EMA of the query branch, never trained by gradient); for MoCo the `queue` of past keys.

    BatchNorm of the key encoder: computing key statistics over the same group of samples as the query's lets the
    network recognise its positive through batch statistics instead of content (MoCo, He et al. 2020). With
    `config.shuffle_batch_norm` and a backbone that has BatchNorm, we use MoCo's *shuffle-BN* when several processes
    train (the global key batch is permuted across processes before encoding and un-permuted after, so each key is
    normalised with samples from other processes' queries) and, on a single process, *split-BN*: the key batch is
    permuted and encoded in two halves, so each key's statistics come from a random half of the batch rather than
    the full batch its query was normalised with. Both run only the existing backbone, so any BatchNorm backbone
    works, and neither changes the query branch.
    """

    def __init__(self, config: AsclConfig):
        super().__init__(config)
        self.backbone = AutoModel.from_config(config.backbone_config)
        if config.small_image_stem:
            use_small_image_stem(self.backbone, keep_max_pool=config.small_image_stem_max_pool)
        byol = config.framework == "byol"
        self.projection = MultiLayerPerceptron(
            config.backbone_hidden_size, config.projection_hidden_size, config.projection_dim, batch_norm=byol
        )
        self.predictor = (
            MultiLayerPerceptron(config.projection_dim, config.predictor_hidden_size, config.projection_dim, True)
            if byol
            else None
        )
        self.momentum_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.momentum_projection = copy.deepcopy(self.projection).requires_grad_(False)
        self.queue = None if byol else KeyQueue(config.queue_size, config.projection_dim)
        self.post_init()
        self.reset_momentum_encoder()
        self._keys_to_ignore_on_save = {name for name in self.state_dict() if name.startswith(("momentum_", "queue."))}
        self._key_encoder_has_batch_norm = any(
            isinstance(module, nn.modules.batchnorm._BatchNorm) for module in self.momentum_backbone.modules()
        )

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        # Saved checkpoints carry no momentum encoder: restart it as a copy of the loaded query encoder.
        model.reset_momentum_encoder()
        return loaded

    @torch.no_grad()
    def reset_momentum_encoder(self) -> None:
        """Copy the query encoder (weights and BatchNorm statistics) into the momentum encoder."""
        self.momentum_backbone.load_state_dict(self.backbone.state_dict())
        self.momentum_projection.load_state_dict(self.projection.state_dict())
        # from_pretrained re-creates missing (momentum) weights as trainable: they must stay out of the optimiser.
        self.momentum_backbone.requires_grad_(False)
        self.momentum_projection.requires_grad_(False)

    @torch.no_grad()
    def update_momentum_encoder(self, momentum: float | None = None) -> None:
        """EMA step f_k ← m f_k + (1 − m) f_q on parameters (m defaults to `config.momentum`).

        Call after each optimiser step. BatchNorm running statistics of the key encoder are its own, from
        its forward passes.
        """
        momentum = self.config.momentum if momentum is None else momentum
        query_parameters = [*self.backbone.parameters(), *self.projection.parameters()]
        key_parameters = [*self.momentum_backbone.parameters(), *self.momentum_projection.parameters()]
        torch._foreach_lerp_(key_parameters, query_parameters, 1.0 - momentum)

    def _momentum_embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.momentum_projection(pooled_features(self.momentum_backbone(pixel_values)))

    @torch.no_grad()
    def encode_keys(self, key_pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised momentum-encoder embeddings (batch_size, projection_dim), BatchNorm kept from leaking."""
        if not (self.config.shuffle_batch_norm and self._key_encoder_has_batch_norm and self.training):
            return F.normalize(self._momentum_embed(key_pixel_values), dim=1)
        batch_size = key_pixel_values.shape[0]
        if world_size() == 1:
            permutation = torch.randperm(batch_size, device=key_pixel_values.device)
            halves = key_pixel_values[permutation].chunk(2)
            embedded = torch.cat([self._momentum_embed(half) for half in halves])
            return F.normalize(embedded[permutation.argsort()], dim=1)
        # Shuffle-BN: permute the global key batch, let each process encode as many keys as it brought, undo.
        sizes = sizes_of_all_processes(batch_size, key_pixel_values.device)
        offset = sum(sizes[: rank()])
        all_pixel_values = gather_from_all_processes(key_pixel_values, sizes)  # (Σ sizes, ...)
        permutation = broadcast_from_main(torch.randperm(sum(sizes), device=key_pixel_values.device))
        own_rows = permutation[offset : offset + batch_size]
        embedded = gather_from_all_processes(self._momentum_embed(all_pixel_values[own_rows]), sizes)
        return F.normalize(embedded[permutation.argsort()][offset : offset + batch_size], dim=1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        key_pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> AsclModelOutput | tuple:
        r"""
        Args:
            pixel_values: (batch_size, num_channels, height, width) images; for pretraining, the strong view.
            key_pixel_values: (batch_size, num_channels, height, width) the weak view of the same images. When
                given, the ASCL loss is computed and, in training mode, the batch's keys (gathered from every
                process) enter the queue.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        backbone_output = self.backbone(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        pooled = pooled_features(backbone_output)
        output = AsclModelOutput(
            last_hidden_state=backbone_output.last_hidden_state,
            pooler_output=pooled,
            hidden_states=backbone_output.hidden_states,
        )
        if key_pixel_values is not None:
            result = self._pretraining_loss(pooled, key_pixel_values)
            output.loss, output.confidence, output.max_neighbor_weight = (
                result.loss,
                result.confidence,
                result.max_neighbor_weight,
            )
        return output if return_dict else output.to_tuple()

    def _pretraining_loss(self, pooled: torch.Tensor, key_pixel_values: torch.Tensor):
        config = self.config
        projection = self.projection(pooled)  # (n, projection_dim)
        key = self.encode_keys(key_pixel_values)  # (n, projection_dim)
        if config.framework == "byol":
            prediction = F.normalize(self.predictor(projection), dim=1)
            sizes = sizes_of_all_processes(key.shape[0], key.device)
            return byol_soft_loss(
                prediction,
                gather_from_all_processes(key, sizes),
                relation=config.relation,
                num_neighbors=config.num_neighbors,
                target_temperature=config.target_temperature,
                positive_offset=sum(sizes[: rank()]),
            )
        result = moco_soft_loss(
            F.normalize(projection, dim=1),
            key,
            # A copy: enqueueing below rewrites the buffer that autograd saved for the backward pass.
            self.queue.keys.clone(),
            relation=config.relation,
            num_neighbors=config.num_neighbors,
            temperature=config.temperature,
            target_temperature=config.target_temperature,
        )
        if self.training:
            self.queue.enqueue(key)
        return result


__all__ = ["AsclModel", "AsclModelOutput", "AsclPreTrainedModel"]
