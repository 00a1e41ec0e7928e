"""The `task` stage: write the gold-reward task's data files into the stage folder.

    prefopt task experiments/quickstart.yaml

Files (Alpaca rows): sft.jsonl (demonstrations, right `demo_accuracy` of the time), prompts.jsonl and
eval_prompts.jsonl (no output; `prompt_id`), preferences.jsonl (chosen/rejected labelled by the simulated
annotator, with each response's gold score kept beside it). Inputs are disjoint across the files while the input
space allows. With `task.name: none` nothing is written (the experiment names real datasets).
"""

from __future__ import annotations

from collections import Counter

from prefopt.tasks import get_task
from prefopt.utils import write_jsonl


def summarize(data: dict[str, list[dict]]) -> dict:
    sft, prefs = data["sft"], data["preferences"]
    kinds = Counter(r["kind"] for r in sft)
    ties = [r for r in prefs if r["chosen_gold"] == r["rejected_gold"]]
    decided = [r for r in prefs if r["chosen_gold"] != r["rejected_gold"]]
    flipped = sum(r["chosen_gold"] < r["rejected_gold"] for r in decided)
    return {
        "num_sft": len(sft),
        "sft_accuracy": kinds["correct"] / max(len(sft), 1),
        "sft_mistakes": {k: v for k, v in sorted(kinds.items()) if k != "correct"},
        "num_prompts": len(data["prompts"]),
        "num_eval_prompts": len(data["eval_prompts"]),
        "num_preferences": len(prefs),
        "preference_ties": len(ties),
        "preference_label_noise": flipped / max(len(decided), 1),
        "repeated_inputs": data["_repeats"],
    }


def run(ctx) -> dict:
    cfg = ctx.section
    if cfg.name == "none":
        return {"task": "none"}
    data = get_task(cfg.name).make_data(cfg, ctx.seed)
    for name in ("sft", "prompts", "eval_prompts", "preferences"):
        write_jsonl(ctx.dir / f"{name}.jsonl", data[name])
    ctx.tracker.log_artifact([ctx.dir / f"{n}.jsonl" for n in ("sft", "prompts", "eval_prompts", "preferences")],
                             name=f"{ctx.cfg.name}-task-data", type_="dataset")
    summary = {"task": cfg.name, **summarize(data)}
    ctx.tracker.log({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    return summary
