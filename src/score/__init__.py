"""The `score` stage: score every candidate with a reward model, resumable and cached (recipe.py), through the
scorer library (prefopt.scoring)."""
