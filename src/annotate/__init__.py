"""`prefopt annotate`: a feedback page that collects human preference labels into a preference JSONL.

    prefopt annotate experiments/quickstart.yaml                      # pairs of runs/<exp>/pairs/pairs.jsonl
    prefopt annotate --pairs runs/quickstart/pairs/pairs.jsonl --out labels/prefs.jsonl --annotator alice

items.py  what is shown: pairs from a pairs/preference file, or two candidates per prompt from generate shards
store.py  where labels go: atomic appends to the preference JSONL (A/B) and a side file (tie/skip); resume
page.py   the gradio page: prompt, answers A and B in a seeded random order, buttons and keys a / b / t / s
"""
