"""Reward functions for PPO tests launched as real processes (`ppo.reward_fn: plugins.ppo_rewards:digit_share`)."""

import os
import signal
from pathlib import Path

_calls = 0


def digit_share(example: dict, response: str) -> float:
    """The share of the response's characters that are digits: learnable, deterministic, varied between samples.

    With PPO_DIE_AFTER_CALLS=N and PPO_DIE_MARKER=path set, the process of rank PPO_DIE_RANK (default 1) kills
    itself with SIGKILL on its (N+1)-th call, once (the marker file records that it has): a crash in the middle of
    an iteration, as an out-of-memory kill or a lost node would be."""
    global _calls
    _calls += 1
    limit, marker = os.environ.get("PPO_DIE_AFTER_CALLS"), os.environ.get("PPO_DIE_MARKER")
    if (limit and marker and _calls > int(limit) and not Path(marker).exists()
            and os.environ.get("RANK", "0") == os.environ.get("PPO_DIE_RANK", "1")):
        Path(marker).write_text(str(_calls))
        os.kill(os.getpid(), signal.SIGKILL)
    text = response.strip()
    return sum(ch.isdigit() for ch in text) / max(len(text), 1)
