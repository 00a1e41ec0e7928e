"""Results as data: runs into pandas and the figures (runs.py, the notebook's `prefopt.analysis`), and statistics
over seeds (replicates.py). A library: the spine's `report` and `pipeline`, and the `evaluate` stage, read through it.

`from prefopt import analysis as A; A.load_run(...)` reaches runs.py's functions; they are imported on first use, so
`prefopt.analysis.replicates` (read by `prefopt run` at its end) does not pull pandas and matplotlib in."""

import importlib

__all__ = [
    'flatten', 'stage_dirs', 'load_run', 'curve_rows', 'load_runs', 'sweep_runs', 'load_wandb',
    'plot_training_curves', 'plot_frontier', 'plot_lengths', 'plot_overoptimisation_curves',
    'plot_overoptimisation', 'plot_replicates', 'save_figures', 'evaluate_table', 'stage_table', 'key_figures',
]


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return getattr(importlib.import_module("prefopt.analysis.runs"), name)
    except AttributeError:
        raise AttributeError(f"module 'prefopt.analysis' has no attribute {name!r}") from None
