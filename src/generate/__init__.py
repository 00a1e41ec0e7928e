"""The `generate` stage: sample candidates for every prompt from the policy (config.py, recipe.py), through the
generation library (prefopt.generation)."""
