"""The only file that touches ``torch.distributed``.

Every helper degrades to plain tensor math when no process group is initialised or the world has
one process, so the library and its tests run unchanged on a single CPU.
"""
from typing import List

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every rank) along dim 0 across ranks, keeping autograd.

    The backward pass routes each rank's slice of the gradient back to its owner, so a
    contrastive loss over the gathered batch has the same gradient as on one big batch.
    """
    if not is_distributed():
        return tensor
    # The supported autograd-aware collective (torch.distributed.nn.functional.all_gather is deprecated):
    # forward all_gather_into_tensor, backward reduce_scatter (sum) to the owner of each slice.
    # all_gather_single_autograd is its current name; all_gather_tensor_autograd (torch < 2.14) warns
    # (FutureWarning, on every rank) where the new one exists.
    from torch.distributed import _functional_collectives as funcol

    gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
    gathered = gather(tensor.contiguous(), gather_dim=0, group=dist.group.WORLD)
    return funcol.wait_tensor(gathered)


@torch.no_grad()
def all_gather_variable(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors whose first dimension differs across ranks (no gradient), in rank order."""
    if not is_distributed():
        return tensor
    world = get_world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    padded = tensor.new_zeros((max(sizes),) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    chunks = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded.contiguous())
    return torch.cat([chunk[:n] for chunk, n in zip(chunks, sizes)], dim=0)


@torch.no_grad()
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (returns the tensor); identity on one process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast from ``src``; identity on one process."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def all_gather_object(obj) -> List:
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


__all__ = ["is_distributed", "get_world_size", "get_rank", "gather_with_grad", "all_gather_variable",
           "all_reduce_sum", "broadcast", "all_gather_object"]
