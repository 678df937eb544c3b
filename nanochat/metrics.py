"""Training-speed and smoothing arithmetic, kept apart from the loop so each piece is testable.

MFU follows nanochat's convention: a percentage, model FLOPs (no rematerialisation) per second
divided by the summed peak of every device taking part.
"""

import time


class LossEMA:
    """Exponential moving average of the train loss, debiased like Adam's moments so the first
    steps are not dragged towards zero."""

    def __init__(self, beta: float = 0.9):
        self.beta = beta
        self.value = 0.0
        self.count = 0

    def update(self, loss: float) -> float:
        self.value = self.beta * self.value + (1 - self.beta) * loss
        self.count += 1
        return self.debiased()

    def debiased(self) -> float:
        return self.value / (1 - self.beta**self.count)

    def state_dict(self) -> dict:
        return {"beta": self.beta, "value": self.value, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.value, self.count = state["beta"], state["value"], state["count"]


def mfu_percent(flops_per_token: float, tokens_per_second: float, peak_flops: float, world_size: int = 1) -> float:
    return 100.0 * flops_per_token * tokens_per_second / (peak_flops * world_size)


class StepClock:
    """Step timing for the progress line: total training time excludes the first `skip` steps
    (compilation, allocator warm-up), and the ETA uses the mean of the steps that count."""

    def __init__(self, skip: int = 10):
        self.skip = skip
        self.total_time = 0.0
        self.timed_steps = 0
        self._start = 0.0

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self, step: int) -> float:
        dt = time.perf_counter() - self._start
        if step >= self.skip:
            self.total_time += dt
            self.timed_steps += 1
        return dt

    def state_dict(self) -> dict:
        return {"total_time": self.total_time, "timed_steps": self.timed_steps}

    def load_state_dict(self, state: dict) -> None:
        self.total_time, self.timed_steps = state["total_time"], state["timed_steps"]

    def eta_seconds(self, steps_left: int, last_dt: float) -> float:
        mean = self.total_time / self.timed_steps if self.timed_steps else last_dt
        return mean * steps_left


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
