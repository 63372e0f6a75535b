"""Collectives that are no-ops on a single process, so the model runs unchanged from CPU to many GPUs."""

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


@torch.no_grad()
def gather_from_all_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (n_r, ...) from every process in rank order → (Σ n_r, ...). No gradient.

    Processes may hold different n_r (e.g. a short last batch): sizes are exchanged first and the rows padded.
    """
    if world_size() == 1:
        return tensor
    local_size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(local_size) for _ in range(world_size())]
    dist.all_gather(sizes, local_size)
    sizes = [int(size.item()) for size in sizes]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([chunk[:size] for chunk, size in zip(gathered, sizes)])


def broadcast_from_main(tensor: torch.Tensor) -> torch.Tensor:
    """Give every process rank 0's copy of `tensor` (in place)."""
    if world_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor
