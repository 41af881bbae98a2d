"""2-process gloo tests of common/dist.py.   Run: python -m pytest -q tests/test_dist.py"""

import os
import socket

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from common.dist import all_gather_nograd, all_gather_with_grad


def contrastive(emb):
    """A loss in which every row interacts with every other row (like InfoNCE over a gathered batch)."""
    emb = F.normalize(emb, dim=-1)
    logits = emb @ emb.t() / 0.1 - 1e4 * torch.eye(len(emb))
    return F.cross_entropy(logits, torch.arange(len(emb)).roll(1))


SIZES = {"equal": [5, 5], "unequal": [5, 3]}  # rows per rank; "unequal": rank 1 lost two unreadable videos


def worker(rank, world, port, results, case):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    sizes = SIZES[case]
    start = sum(sizes[:rank])
    x = torch.randn(sum(sizes), 3)[start:start + sizes[rank]]  # this rank's slice of the global batch
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    gathered = all_gather_with_grad(ddp(x))
    loss = contrastive(gathered)
    loss.backward()
    results[rank] = {"gathered": gathered.detach(), "loss": loss.item(), "grad": model.weight.grad.clone(),
                     "nograd": all_gather_nograd(torch.full((sizes[rank],), float(rank)))}
    torch_dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", list(SIZES))
def test_all_gather_with_grad_matches_single_process(case):
    world, sizes = 2, SIZES[case]
    results = mp.Manager().dict()
    mp.spawn(worker, args=(world, free_port(), results, case), nprocs=world, join=True)

    torch.manual_seed(0)  # the same model and global batch in one process
    model = torch.nn.Linear(3, 4)
    x = torch.randn(sum(sizes), 3)
    emb = model(x)
    loss = contrastive(emb)
    loss.backward()

    for rank in range(world):
        r = results[rank]
        torch.testing.assert_close(r["gathered"], emb.detach())  # rank order, every row present
        assert abs(r["loss"] - loss.item()) < 1e-5
        # DDP averages the per-rank gradients; the gather's backward sums them: together, the full-batch gradient
        torch.testing.assert_close(r["grad"], model.weight.grad, rtol=1e-5, atol=1e-6)
        expected = torch.cat([torch.full((n,), float(k)) for k, n in enumerate(sizes)])
        torch.testing.assert_close(r["nograd"], expected)
