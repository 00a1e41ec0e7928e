"""The `task` stage: write a gold-reward task's data files (recipe.py) for the stages after it. The tasks themselves
(their data, gold scorer and simulated annotator) are the gold library (prefopt.gold), which the reward, pairs and
evaluate stages also read."""
