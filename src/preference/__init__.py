"""The paired-preference trainer shared by the `dpo` and `simpo` stages: one accelerate loop (loop.py), batch
layouts that compute fewer tokens (batching.py), reference log-probs computed once and cached (reference.py), and
the metric names and NLL term every objective shares (metrics.py). The objectives themselves live in their method's
folder (`dpo/loss.py`, `simpo/loss.py`) as pure functions of summed log-probs and lengths."""
