"""Data parallelism for GAN steps: gradients averaged across workers at every optimizer step.

Why not one DistributedDataParallel wrapper per net: a GAN step breaks DDP's assumptions in
every model here. The generator update runs D with frozen parameters (DDP then waits forever for
their gradients, or needs find_unused_parameters and a graph walk per forward), BicycleGAN adds
its latent-regression gradients with `torch.autograd.grad` (invisible to DDP's hooks, so replicas
silently drift apart), and WGAN-GP differentiates twice. Averaging each optimizer's gradients
right before its `step()` (as StyleGAN2-ADA / StyleGAN3 do) is exact for all of them: every
replica applies the same averaged gradient, so weights stay identical, and it needs no change
to the models' `train_step`. The cost: communication does not overlap the backward pass.

Buffers (batch-norm running statistics) are averaged after each step, so Batch Renorm's r and d,
which read the running statistics during training, see the same values on every replica.
"""

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

BUCKET_BYTES = 32 * 2**20


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _buckets(tensors):
    bucket, size = [], 0
    for t in tensors:
        bucket.append(t)
        size += t.numel() * t.element_size()
        if size >= BUCKET_BYTES:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def average_(tensors, world: int) -> None:
    """All-reduce and average the tensors in place, in flattened buckets (one call per bucket)."""
    for bucket in _buckets([t for t in tensors]):
        for dtype in {t.dtype for t in bucket}:
            same = [t for t in bucket if t.dtype == dtype]
            flat = _flatten_dense_tensors(same)
            dist.all_reduce(flat)
            flat.div_(world)
            for t, avg in zip(same, _unflatten_dense_tensors(flat, same), strict=True):
                t.copy_(avg)


class GradAveraging:
    """Wraps an optimizer: `step()` first averages the gradients of its parameters over all workers.

    A parameter with no gradient on this step (e.g. a frozen net) is left alone; the models'
    steps are the same on every worker, so the set of parameters with gradients is too."""

    def __init__(self, optimizer, world: int):
        self.optimizer, self.world = optimizer, world

    def step(self, closure=None):
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        average_(grads, self.world)
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __getattr__(self, name):
        return getattr(self.optimizer, name)


def wrap_optimizers(optimizers: dict, world: int) -> dict:
    return {k: GradAveraging(o, world) for k, o in optimizers.items()} if world > 1 else optimizers


def broadcast_module(module, src: int = 0) -> None:
    """Make every replica start from rank `src`'s parameters and buffers."""
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


def average_buffers(module, world: int) -> None:
    floats = [b for b in module.buffers() if b.is_floating_point()]
    if floats:
        with torch.no_grad():
            average_(floats, world)


def barrier() -> None:
    if is_distributed():
        dist.barrier()
