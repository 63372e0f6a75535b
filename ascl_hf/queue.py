"""The key queue of the MoCo framework: a ring buffer of past keys."""

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import gather_from_all_processes


class KeyQueue(nn.Module):
    """FIFO queue of the `size` most recent keys, each a `dim`-vector.

    Both buffers are persistent so that training checkpoints (Accelerate state) resume with the same
    negatives; `AsclModel.save_pretrained` drops them, since a published feature extractor needs none.
    Starts as random unit vectors, as in MoCo.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.size = size
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))  # (m, d)
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))  # next row to overwrite

    def reset(self) -> None:
        with torch.no_grad():
            self.keys.copy_(F.normalize(torch.randn_like(self.keys), dim=1))
            self.pointer.zero_()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, gather: bool = True) -> None:
        """Add a batch of keys (n, d), replacing the oldest rows; any n works, n > size included.

        With `gather` (the default) the keys of every process are gathered first, in rank order, so all
        processes hold the same queue.
        """
        if gather:
            keys = gather_from_all_processes(keys)
        num_new = keys.shape[0]
        kept = keys[-self.size :].to(self.keys.dtype)  # older rows of an oversized batch would be overwritten
        # Rows written by position: tensor arithmetic, so no host-device sync on accelerators.
        first = self.pointer + (num_new - kept.shape[0])
        rows = (first + torch.arange(kept.shape[0], device=self.keys.device)) % self.size
        self.keys.index_copy_(0, rows, kept)
        self.pointer.copy_((self.pointer + num_new) % self.size)
