"""The scorer library: loading a reward model and scoring texts with it (scorer.py), the likelihood reward model
(likelihood.py) and reward functions written as code (functions.py). The `score` stage, PPO and evaluation use it."""
