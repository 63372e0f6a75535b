import os
import subprocess
import sys
import textwrap

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


# Prepended to scripts that must see only a saved folder's own code: importing ascl_hf fails in them.
HIDE_ASCL_HF = '''
import sys
class BlockAsclHf:
    def find_spec(self, name, path=None, target=None):
        if name == "ascl_hf" or name.startswith("ascl_hf."):
            raise ImportError("ascl_hf is hidden in this test")
sys.meta_path.insert(0, BlockAsclHf())
'''


def run_without_ascl_hf(script: str, working_directory) -> str:
    """Run `script` in a fresh, offline Python process where ascl_hf cannot be imported; returns its stdout."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(working_directory / "modules")}
    result = subprocess.run([sys.executable, "-c", HIDE_ASCL_HF + textwrap.dedent(script)], cwd=working_directory,
                            env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
