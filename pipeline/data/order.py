"""Epoch order: which stored rows each rank reads at each position of an epoch."""

import numpy as np


def epoch_plan(counts: dict[str, int], seed: int, epoch: int, world_size: int = 1, rank: int = 0):
    """(positions, {domain: row indices}) that rank `rank` of `world_size` reads this epoch.

    An epoch has n = max(domain sizes) positions. Each domain gets its own permutation (seeded by
    seed, epoch and domain; smaller domains repeat fresh permutations up to n), so unpaired A and
    B are shuffled independently. Rank r takes positions r, r + W, r + 2W, ..., cut to n // W so
    that every rank runs the same number of steps (DDP needs that).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    n = max(counts.values())
    if n < world_size:
        raise ValueError(f"{n} samples cannot be split over {world_size} workers")
    positions = np.arange(rank, n, world_size)[: n // world_size]
    plan = {}
    for code, (domain, size) in enumerate(sorted(counts.items())):
        rng = np.random.default_rng([seed, epoch, code])
        order = np.concatenate([rng.permutation(size) for _ in range(-(-n // size))])[:n]
        plan[domain] = order[positions]
    return positions, plan
