"""Task modules that must be refused with a clear error (tests/test_gold_tasks.py)."""

import math
import random

from plugins import upper_task


class NaNTask:
    """Scores every response NaN."""

    name = "nan"
    instructions = upper_task.instructions
    sample_input = staticmethod(upper_task.sample_input)
    demo_mistake = staticmethod(upper_task.demo_mistake)
    response_pool = staticmethod(upper_task.response_pool)

    @staticmethod
    def score(input, response):
        return math.nan


class NoScorer:
    name = "noscore"
    instructions = ["x"]

    @staticmethod
    def sample_input(rng: random.Random, cfg) -> str:
        return "a"


def reward_nan(example, response):
    return float("nan") if example["prompt_id"].endswith("1") else 0.0


def reward_vector(example, response):
    return [1.0, 2.0]


def reward_length(example, response):
    return float(len(response.split()))
