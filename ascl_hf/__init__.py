"""ascl-hf: Adaptive Soft Contrastive Learning for Hugging Face vision backbones.

Importing the package registers `AsclConfig` / `AsclModel` with `AutoConfig` / `AutoModel`, and marks them
for `register_for_auto_class` so that saved folders carry their code and `auto_map`.
"""

from transformers import AutoConfig, AutoModel

from .configuration_ascl import AsclConfig
from .loss import byol_soft_loss, moco_soft_loss
from .modeling_ascl import AsclModel, AsclModelOutput, AsclPreTrainedModel

AutoConfig.register(AsclConfig.model_type, AsclConfig, exist_ok=True)
AutoModel.register(AsclConfig, AsclModel, exist_ok=True)
AsclConfig.register_for_auto_class()
AsclModel.register_for_auto_class("AutoModel")

__version__ = "0.1.0"
__all__ = ["AsclConfig", "AsclModel", "AsclModelOutput", "AsclPreTrainedModel", "moco_soft_loss", "byol_soft_loss"]
