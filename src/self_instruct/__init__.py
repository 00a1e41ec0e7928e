"""Self-instruct: new instruction data from seed tasks (config.py, the prompt and its parser in prompt.py, the
filters in filters.py, the `self_instruct` stage in recipe.py)."""
