"""The process a stage runs in: rank, world and seeding (process.py), and one worker process per GPU for the
data-parallel generate and score stages (gpus.py)."""
