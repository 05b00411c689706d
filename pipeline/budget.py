"""Training for a wall-time budget (`train.max_minutes`, `jobs/train.py --minutes`).

A budget run starts open-ended (no end, no LR decay, Batch Renorm as batch norm). Rank 0 times one
evaluation before the first step, then the steps after a short warm-up, and at one step fixes
`train.steps` so that the run, counted from the command's start (`train.started_at`), ends within
the budget after its periodic evaluations, its final validation and test evaluations, registration
and shutdown. Every rank takes that number from rank 0 (a broadcast each step until it is fixed, so
ranks never disagree), the learning-rate schedule and Batch Renorm's warm-up are re-read from it,
and a checkpoint is written at once: from there the run is step-driven, and a resumed or restarted
run continues with the same `train.steps` (kept in the checkpoint's progress) and ends with the same
weights as an uninterrupted one.
"""

import dataclasses
import math
import time

import torch

WARMUP_STEPS = 3  # the first steps allocate buffers and start readers: not timed
MIN_TIMED_STEPS = 5
# Seconds for what follows the last step beside the evaluations, measured on the 2-core machine:
# MLflow model logging and registration of each generator (~4 s each), the last report and Ray
# Train's shutdown (~6 s), the driver's exit; rounded up.
FIXED_END_S = 20.0
END_S_PER_GENERATOR = 5.0
# Steps get slower over a run (facades CycleGAN at 64 px: 0.156 s a step when the budget decided,
# 0.18 s at the end, so the run ended a minute late): plan each step this much longer than timed.
STEP_MARGIN = 1.12


def timing_window(budget_s: float) -> float:
    """How long to time steps before deciding: long enough to average out the reader's jitter and
    the first evaluations' after-effects (a 3% window chose 6513 CoGAN steps that ended 3 minutes
    early in a 15-minute budget), short next to the budget."""
    return min(120.0, max(8.0, 0.06 * budget_s))


@dataclasses.dataclass(frozen=True)
class Timing:
    """What rank 0 knows when it decides: the budget, the time spent, the steps done and their
    timed cost, one evaluation's cost and how often it comes, the generators to register and the
    test evaluator's set-up."""

    budget_s: float
    elapsed_s: float
    step: int
    step_s: float
    eval_s: float
    eval_every: int
    generators: int
    setup_s: float = 0.0


def affordable_steps(t: Timing) -> int:
    """The total number of steps that fits: the steps done, plus as many more as the time left
    pays for after the evaluation at the decision, the final validation and test evaluations (the
    test evaluator's set-up, `setup_s`, included) and the end of the run, each step also carrying
    its share of the periodic evaluations. Never fewer than step + 1."""
    end_s = 3 * t.eval_s + t.setup_s + FIXED_END_S + END_S_PER_GENERATOR * t.generators
    per_step = t.step_s * STEP_MARGIN + (t.eval_s / t.eval_every if t.eval_every else 0.0)
    left = t.budget_s - t.elapsed_s - end_s
    return t.step + max(1, math.floor(left / per_step)) if left > 0 else t.step + 1


class Budget:
    """Rank 0's clock for one run; `decide(step)` on every rank returns the fixed total once known."""

    def __init__(self, cfg, rank: int, world: int, generators: int, device=None, setup_s: float = 0.0):
        self.cfg, self.rank, self.world, self.generators = cfg, rank, world, generators
        self.setup_s = setup_s
        self.device = device or torch.device("cpu")
        self.origin = cfg.train.started_at or time.time()
        self.budget_s = cfg.train.max_minutes * 60.0
        self.eval_s = 0.0
        self.timed_from = None  # (step, perf_counter) where timing began
        self.steps = 0

    def time_evaluation(self, evaluate) -> dict:
        """Run `evaluate()` (rank 0's first evaluation) and keep how long it took."""
        start = time.perf_counter()
        metrics = evaluate()
        self.eval_s = time.perf_counter() - start
        return metrics

    def decide(self, step: int) -> int:
        """After `step` steps: 0 while still timing, then the total steps (the same on every rank)."""
        if self.steps:
            return self.steps
        proposal = self._propose(step) if self.rank == 0 else 0
        if self.world > 1:
            value = torch.tensor([proposal], dtype=torch.long, device=self.device)
            torch.distributed.broadcast(value, 0)
            proposal = int(value.item())
        self.steps = proposal
        return proposal

    def _propose(self, step: int) -> int:
        now = time.perf_counter()
        if step < WARMUP_STEPS:
            return 0
        if self.timed_from is None:
            self.timed_from = (step, now)
            return 0
        first, started = self.timed_from
        timed = step - first
        if timed < MIN_TIMED_STEPS or now - started < timing_window(self.budget_s):
            return 0
        return affordable_steps(Timing(
            budget_s=self.budget_s, elapsed_s=time.time() - self.origin, step=step,
            step_s=(now - started) / timed, eval_s=self.eval_s, eval_every=self.cfg.eval.every,
            generators=self.generators, setup_s=self.setup_s,
        ))


