"""Gold-reward tasks: a task writes its data files and scores any response with a program.

    get_task("sort").gold_score(rendered_prompt, response) -> float in [0, 1]
"""

from __future__ import annotations


def get_task(name: str):
    """The task named `name` (an object with `gold_score(prompt, response)` and `make_data(task_cfg, seed)`)."""
    if name == "sort":
        from prefopt.tasks.sort import SortTask

        return SortTask()
    raise ValueError(f"unknown task {name!r}; tasks are: sort")
