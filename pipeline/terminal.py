"""What the jobs print for their user: one progress line while training, the test metrics beside
their floors and ceilings at the end, a warning when a search could not tell its trials apart, and
the command to run next.

The training loop runs where its user cannot see a bar (a Ray Train worker, whose stdout Ray
forwards to the driver line by line with a prefix), so rank 0 prints its own progress: on a
terminal, one line rewritten in place (carriage return); anywhere else (Ray's forwarding, a log
file), a plain line at most every `PLAIN_EVERY_S` seconds, and always the first and last steps.
Imports only the standard library: the plain loop runs on machines without Ray or MLflow.
"""

import math
import sys
import time

PLAIN_EVERY_S = 15.0  # a line per quarter minute keeps a forwarded log readable
TTY_EVERY_S = 0.5
LOWER_IS_BETTER = ("l1", "fid", "kid", "cycle_l1", "loss")  # metric names (after the last /) to minimise


def clock(seconds: float) -> str:
    """0:42, 12:05, 1:02:03."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def main_losses(losses: dict) -> dict:
    """{"G": ..., "D": ...}: each player's total (loss/X/total, else the sum of its terms)."""
    out = {}
    for player in ("G", "D", "E"):
        prefix = f"loss/{player}/"
        terms = {k: v for k, v in losses.items() if k.startswith(prefix)}
        if terms:
            out[player] = terms.get(prefix + "total", sum(terms.values()))
    return out


class Progress:
    """Rank 0's progress: step of total (or elapsed of a time budget while the budget has not fixed
    the steps), images/s since `start`, the main losses averaged since the last line, ETA."""

    def __init__(self, budget_s: float = 0.0, origin: float | None = None, stream=None, clock_fn=time.time):
        self.stream = stream or sys.stderr  # as tqdm: stdout stays for results a script may parse
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.budget_s, self.now = budget_s, clock_fn
        self.origin = origin or clock_fn()  # where a budget counts from (the command's start)
        self.first = None  # (time, step) before the first step: elapsed counts from here
        self.warm = None  # (time, step) after the first step: the rate and ETA count from here
        self.images, self.shown_at, self.sums, self.counts, self.width = 0, None, {}, 0, 0

    def start(self, step: int) -> None:
        """Before the first step (`step` done already, on a resumed run): the rate counts from here."""
        self.first = (self.now(), step)

    def update(self, step: int, total: int | None, losses: dict, images: int) -> None:
        """After each step; `total` None while a budget has not fixed the steps yet; `losses`: the
        window's mean losses when the loop logged at this step, else empty."""
        if self.first is None:
            self.start(step - 1)
        now = self.now()
        if self.warm is None:  # the first step waits for the data pipeline: no part of the rate
            self.warm = (now, step)
        else:
            self.images += images
        if losses:  # the loop passes them at its log points only (read there, no sync of its own)
            self.counts += 1
            for k, v in main_losses(losses).items():
                self.sums[k] = self.sums.get(k, 0.0) + v
        every = TTY_EVERY_S if self.tty else PLAIN_EVERY_S
        due = self.shown_at is None or now - self.shown_at >= every or step == total
        if due:
            self.show(self.line(step, total, now))
            self.shown_at, self.sums, self.counts = now, {}, 0

    def line(self, step: int, total: int | None, now: float) -> str:
        ran = max(now - self.warm[0], 1e-9)
        rate_steps = (step - self.warm[1]) / ran
        parts = [f"step {step}/{total}" if total else f"step {step}"]
        if self.budget_s and not total:
            parts.append(f"{clock(now - self.origin)} of {clock(self.budget_s)} budget")
        parts.append(f"{self.images / ran:.1f} img/s" if rate_steps else "img/s ?")
        parts += [f"{k} {v / max(self.counts, 1):.3f}" for k, v in self.sums.items()]
        if total:
            eta = 0.0 if step == total else (total - step) / rate_steps if rate_steps > 0 else math.inf
            shown = clock(eta) if math.isfinite(eta) else "?"
            parts.append(f"elapsed {clock(now - self.first[0])}  ETA {shown}")
        elif self.budget_s:
            parts.append(f"ETA {clock(self.budget_s - (now - self.origin))}")
        return "  ".join(parts)

    def show(self, text: str) -> None:
        if self.tty:  # rewrite the line in place; pad over a longer previous one
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the in-place line, so that what follows starts on its own."""
        if self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()
            self.width = 0


# ----------------------------------------------------------------------------- the end of a run


def lower_is_better(metric: str) -> bool:
    return metric.split("/")[-1].startswith(LOWER_IS_BETTER)


def fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def metrics_table(metrics: dict) -> str:
    """The test metrics (test/x) beside their floors (baseline/x: a trivial predictor on the same
    images) and ceilings (ceiling/x), and whether each beats its floor; "" when there are none."""
    names = sorted(k for k in metrics if k.startswith("test/"))
    if not names:
        return ""
    rows = [("test metric", "value", "floor", "ceiling", "vs floor")]
    for key in names:
        name = key.removeprefix("test/")
        value, floor = metrics[key], metrics.get(f"baseline/{name}")
        verdict = ""
        if floor is not None:
            beats = value < floor if lower_is_better(name) else value > floor
            verdict = "above" if beats else "NOT above"
        rows.append((key, fmt(value), fmt(floor), fmt(metrics.get(f"ceiling/{name}")), verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def search_warnings(values: list[float], metric: str, mode: str, floor: float | None) -> list[str]:
    """What a search's summary must not leave unsaid: every trial scored the same (the search could
    not choose; the best is arbitrary), or the best does not beat the metric's validation floor."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return [f"warning: no trial reported {metric}"]
    warnings = []
    best = max(values) if mode == "max" else min(values)
    if len(values) > 1 and max(values) - min(values) <= 1e-9 * max(1.0, abs(best)):
        warnings.append(f"warning: the search did not discriminate: every trial's {metric} is {best:.4g} "
                        f"({len(values)} trials); the 'best' is arbitrary. Train longer per trial "
                        "(--max-steps, --minutes) or search another objective")
    if floor is not None and not (best > floor if mode == "max" else best < floor):
        warnings.append(f"warning: the best {metric} {best:.4g} does not beat its floor {floor:.4g} "
                        f"(floor/{metric}: a trivial predictor on the validation images)")
    return warnings


def next_step(*commands: str) -> str:
    """The closing line(s): what to run next, one command a line."""
    return "next: " + "\n      ".join(commands)
