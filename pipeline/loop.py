"""The training loop in plain torch, on one process.

This is the core that runs everywhere (the demo, tests, a GPU box without Ray): the loop owns
train mode and calls the model's free `train_step`; the model never touches modes or logging.
"""

import math
import time

import torch

from models.norms import renorm_warmup, set_renorm_limits


def cycle(batches):
    """Repeat an epoch-iterable forever, telling it the epoch when it can reshuffle."""
    epoch = 0
    while True:
        if hasattr(batches, "set_epoch"):
            batches.set_epoch(epoch)
        yield from batches
        epoch += 1


def train_local(spec, cfg, batches, steps, *, nets=None, optimizers=None, state=None, seed=0,
                renorm_warmup_steps=0, every=0, on_every=None, device="cpu"):
    """Run `steps` generator updates over `batches`; return (nets, optimizers, state, history).

    `on_every(step, nets, losses)` is called every `every` steps and after the last one.
    `renorm_warmup_steps > 0` anneals Batch Renorm's rmax 1→3 and dmax 0→5 over that many steps.
    """
    torch.manual_seed(seed)
    nets = spec.build_nets(cfg).to(device) if nets is None else nets
    optimizers = spec.make_optimizers(cfg, nets) if optimizers is None else optimizers
    state = {} if state is None else state
    nets.train()
    history = []
    stream = cycle(batches)
    for step in range(1, steps + 1):
        if renorm_warmup_steps:
            set_renorm_limits(nets, *renorm_warmup(step - 1, renorm_warmup_steps))
        start = time.perf_counter()
        batch = {k: v.to(device) for k, v in next(stream).items() if k in ("a", "b")}
        losses = spec.train_step(cfg, nets, optimizers, batch, state)
        bad = [k for k, v in losses.items() if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"step {step}: non-finite losses {bad}; lower the learning rate")
        n = batch["a"].shape[0]
        losses["perf/images_per_s"] = n / max(time.perf_counter() - start, 1e-9)
        history.append(losses)
        if on_every and every and (step % every == 0 or step == steps):
            on_every(step, nets, losses)
    return nets, optimizers, state, history
