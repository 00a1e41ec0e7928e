"""The process a stage runs in: its rank and the world of a launch (from the launcher's environment), a barrier,
and seeding (python, numpy, torch, transformers) before a model is built."""

from __future__ import annotations

import os
import random


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch. Call before building a model: a Trainer seeds only after it exists."""
    import numpy as np
    import torch
    import transformers

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    transformers.set_seed(seed)


def rank() -> int:
    """This process's global rank in the launch (torchrun / accelerate set RANK; LOCAL_RANK alone on one node)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def is_main_process() -> bool:
    return rank() == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def dist_barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
