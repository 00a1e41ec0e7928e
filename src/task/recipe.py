"""The `task` stage: write the gold-reward task's data files into the stage folder.

    prefopt task experiments/quickstart.yaml
    prefopt task experiments/quickstart.yaml --task.name=reverse
    prefopt task experiments/quickstart.yaml --task.module=mypkg.mytask

Files (Alpaca rows, see prefopt.gold.base): sft.jsonl, prompts.jsonl (training prompts), val_prompts.jsonl
(tuning), test_prompts.jsonl (reported figures), preferences.jsonl (annotated pairs with each answer's gold score).
With `task.name: none` nothing is written (the experiment names real datasets).
"""

from __future__ import annotations

from prefopt.gold import get_task, has_gold
from prefopt.gold.base import FILES
from prefopt.io import write_jsonl


def summarize(data: dict[str, list[dict]], task) -> dict:
    sft, prefs = data["sft"], data["preferences"]
    correct = [task.gold_score(r, r["output"]) == 1.0 for r in sft]
    ties = [r for r in prefs if r["chosen_gold"] == r["rejected_gold"]]
    decided = [r for r in prefs if r["chosen_gold"] != r["rejected_gold"]]
    flipped = sum(r["chosen_gold"] < r["rejected_gold"] for r in decided)
    return {
        "num_sft": len(sft),
        "sft_accuracy": sum(correct) / max(len(sft), 1),
        "num_prompts": len(data["prompts"]),
        "num_val_prompts": len(data["val_prompts"]),
        "num_test_prompts": len(data["test_prompts"]),
        "num_preferences": len(prefs),
        "preference_ties": len(ties),
        "preference_label_noise": flipped / max(len(decided), 1),
        "repeated_inputs": data.get("_repeats", 0),
    }


def run(ctx) -> dict:
    cfg = ctx.section
    if not has_gold(cfg):
        return {"task": "none"}
    task = get_task(cfg)
    data = task.make_data(cfg, ctx.seed)
    for name in FILES:
        write_jsonl(ctx.dir / f"{name}.jsonl", data[name])
    ctx.tracker.log_artifact([ctx.dir / f"{n}.jsonl" for n in FILES], name=f"{ctx.cfg.name}-task-data",
                             type_="dataset")
    summary = {"task": task.name, "source": task.source, **summarize(data, task)}
    ctx.tracker.log({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    return summary
