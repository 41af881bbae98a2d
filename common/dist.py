"""Distributed helpers driven by torchrun's environment variables.

    torchrun --standalone --nproc_per_node=8 all_in_one.py --pretrain

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them everything here is a no-op for a single process.
The backend is nccl on CUDA and gloo on CPU (so the 2-process tests run on any machine).

Contrastive losses need every rank's embeddings as negatives. `all_gather_with_grad` returns the concatenation
of all ranks' tensors, and gradients flow back to the local slice:

    gradient convention: the backward of the gather sums the incoming gradients over ranks (all_reduce SUM) and
    returns this rank's slice. Each rank computes the loss over the full gathered batch, and DDP then *averages*
    parameter gradients over ranks, so the sum and the average cancel: the update equals that of one process
    computing the same loss on the whole global batch (the open_clip convention with local_loss=False).
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from .train import resolve_device


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool


def is_dist():
    return torch_dist.is_available() and torch_dist.is_initialized()


def get_rank():
    return torch_dist.get_rank() if is_dist() else 0


def get_world_size():
    return torch_dist.get_world_size() if is_dist() else 1


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def setup_distributed(device="auto"):
    """Initialise the process group when launched by torchrun; pick this process's device."""
    device = resolve_device(device)
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return DistInfo(0, 0, 1, device, True)
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not is_dist():
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, local_rank, world_size, device, rank == 0)


def barrier():
    if is_dist():
        torch_dist.barrier()


def cleanup():
    if is_dist():
        torch_dist.destroy_process_group()


def _sizes(x):
    """Every rank's first dimension (a batch can shrink when a video is unreadable and skipped)."""
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.empty_like(n) for _ in range(get_world_size())]
    torch_dist.all_gather(sizes, n)
    return [int(s) for s in sizes]


def _gather(x, sizes):
    """all_gather of tensors whose first dimension differs by rank: pad to the largest, gather, cut the pads."""
    pad = max(sizes) - x.shape[0]
    x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x
    out = [torch.empty_like(x) for _ in sizes]
    torch_dist.all_gather(out, x.contiguous())
    return torch.cat([o[:n] for o, n in zip(out, sizes)], dim=0)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.sizes = _sizes(x)
        return _gather(x, ctx.sizes)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch_dist.all_reduce(grad, op=torch_dist.ReduceOp.SUM)  # every rank's loss depends on our slice
        start = sum(ctx.sizes[:get_rank()])
        return grad[start:start + ctx.sizes[get_rank()]]


def all_gather_with_grad(x):
    """(B_r, ...) on rank r -> (sum of B_r, ...) in rank order, differentiable (see the module docstring).
    Ranks may pass different B_r (a batch that lost an unreadable video); the sizes are exchanged first."""
    if not is_dist() or get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_nograd(x):
    """(B_r, ...) on rank r -> (sum of B_r, ...) in rank order, no gradient (tags, labels, eval features)."""
    if not is_dist() or get_world_size() == 1:
        return x
    return _gather(x, _sizes(x))
