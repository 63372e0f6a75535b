"""Collectives that are no-ops on a single process, so the model runs unchanged from CPU to many GPUs."""

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def sizes_of_all_processes(local_size: int, device: torch.device) -> list[int]:
    """Every process's `local_size`, in rank order (batches can differ when unreadable images were skipped)."""
    if world_size() == 1:
        return [local_size]
    size = torch.tensor([local_size], device=device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    return [int(size.item()) for size in sizes]


@torch.no_grad()
def gather_from_all_processes(tensor: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate `tensor` (n_r, ...) from every process in rank order → (Σ n_r, ...). No gradient.

    Processes may hold different n_r: the sizes (from `sizes_of_all_processes`, exchanged here when not given) let
    the rows be padded to one shape for the collective and trimmed after.
    """
    if world_size() == 1:
        return tensor
    sizes = sizes or sizes_of_all_processes(tensor.shape[0], tensor.device)
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
