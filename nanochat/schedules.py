"""Learning-rate schedules: the multiplier of every param group's initial lr at each update.

A schedule is built from conf/schedule/<name>.yaml and called as `schedule(step, num_iterations)`
for the updates step = 0 .. num_iterations - 1; the trainer multiplies each group's `initial_lr`
by the result (nanochat/optim.py, apply_schedule). Warmup is linear from 1/W at step 0 to 1 at
step W - 1 in all of them, with W = round(warmup_ratio * num_iterations).

- Trapezoid: nanochat's (base_train.py): warmup, constant, then a linear warmdown to final_lr_frac.
- Cosine: warmup, then half a cosine from 1 down to final_lr_frac at the end of the run.
- Constant: warmup, then 1.
"""

import math

from nanochat.errors import InvalidArgument


def _check_fraction(**values: float) -> None:
    for name, value in values.items():
        if not 0.0 <= value <= 1.0:
            raise InvalidArgument(f"{{{name}}} must be between 0 and 1.", **{name: value})


def _warmup(step: int, warmup_iters: int) -> float | None:
    return (step + 1) / warmup_iters if step < warmup_iters else None


class Trapezoid:
    """With N = num_iterations, W = round(warmup_ratio N), D = round(warmdown_ratio N):
    (step + 1) / W for step < W; 1 for W <= step <= N - D; then (N - step) / D of the way from
    final_lr_frac back to 1, i.e. exactly final_lr_frac at step N. The updates are 0..N-1, so the
    last one uses final_lr_frac + (1 - final_lr_frac) / D."""

    def __init__(self, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float):
        _check_fraction(warmup_ratio=warmup_ratio, warmdown_ratio=warmdown_ratio, final_lr_frac=final_lr_frac)
        if warmup_ratio + warmdown_ratio > 1.0:
            raise InvalidArgument(
                "{warmup_ratio} + {warmdown_ratio} exceeds 1: warmup and warmdown would overlap.",
                warmup_ratio=warmup_ratio,
                warmdown_ratio=warmdown_ratio,
            )
        self.warmup_ratio = warmup_ratio
        self.warmdown_ratio = warmdown_ratio
        self.final_lr_frac = final_lr_frac

    def __call__(self, step: int, num_iterations: int) -> float:
        warmup = _warmup(step, round(self.warmup_ratio * num_iterations))
        if warmup is not None:
            return warmup
        warmdown_iters = round(self.warmdown_ratio * num_iterations)
        if step <= num_iterations - warmdown_iters:
            return 1.0
        remaining = (num_iterations - step) / warmdown_iters
        return remaining + (1 - remaining) * self.final_lr_frac


class Cosine:
    """(step + 1) / W during warmup, then final_lr_frac + (1 - final_lr_frac) (1 + cos(pi p)) / 2
    with p = (step - W) / (N - W) going from 0 at the end of warmup to 1 at step N."""

    def __init__(self, warmup_ratio: float, final_lr_frac: float):
        _check_fraction(warmup_ratio=warmup_ratio, final_lr_frac=final_lr_frac)
        if warmup_ratio == 1.0:
            raise InvalidArgument("{warmup_ratio} leaves no steps for the cosine.", warmup_ratio=warmup_ratio)
        self.warmup_ratio = warmup_ratio
        self.final_lr_frac = final_lr_frac

    def __call__(self, step: int, num_iterations: int) -> float:
        warmup_iters = round(self.warmup_ratio * num_iterations)
        warmup = _warmup(step, warmup_iters)
        if warmup is not None:
            return warmup
        progress = (step - warmup_iters) / (num_iterations - warmup_iters)
        return self.final_lr_frac + (1 - self.final_lr_frac) * (1 + math.cos(math.pi * progress)) / 2


class Constant:
    """(step + 1) / W during warmup, then 1."""

    def __init__(self, warmup_ratio: float):
        _check_fraction(warmup_ratio=warmup_ratio)
        self.warmup_ratio = warmup_ratio

    def __call__(self, step: int, num_iterations: int) -> float:
        warmup = _warmup(step, round(self.warmup_ratio * num_iterations))
        return 1.0 if warmup is None else warmup
