"""The torchrun environment.

Multi-process data parallelism is its own piece of work; until it lands, the batch arithmetic
already counts WORLD_SIZE, and a launch with more than one process is refused up front rather
than silently training independent copies of the model.
"""

import os

from nanochat.errors import UserError


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def require_single_process() -> None:
    world_size = world_size_from_env()
    if world_size != 1:
        raise UserError(
            f"WORLD_SIZE={world_size}: multi-process (torchrun) training is not supported yet; "
            "launch train.py with plain python."
        )
