import pytest
import torch
from transformers import ResNetConfig

from ascl_hf import AsclConfig


def tiny_backbone_config() -> ResNetConfig:
    return ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")


@pytest.fixture
def tiny_config() -> AsclConfig:
    """A 32-px-ready ASCL config small enough for CPU tests (a few thousand parameters)."""
    return AsclConfig(
        backbone_config=tiny_backbone_config(),
        small_image_stem=True,
        projection_hidden_size=32,
        projection_dim=16,
        queue_size=64,
        momentum=0.9,
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
