"""The evaluate stage's scorers: the task's gold score, and the proxy (the reward model or a reward function)."""

from __future__ import annotations

from prefopt.evaluate.samples import nest, scoring_batch_size
from prefopt.experiment import ref_stage


def gold_scorer(cfg, task: str):
    """The task's checked `gold_score(example, response)`, or None when the experiment has no gold task."""
    from prefopt.gold import get_task, has_gold

    if task == "auto":
        return get_task(cfg.task).gold_score if has_gold(cfg.task) else None
    if task == "none":
        return None
    return get_task(task).gold_score


def proxy_scorer(ctx, sec, rows: list[dict] = ()):
    """(name, fn(rendered prompts, rows, completions) -> nested scores) for the reward model or reward function, or
    None. Loaded lazily, once; `evaluate.rm_format` is checked here, on `rows`, before anything is sampled."""
    if sec.reward_fn:
        from prefopt.scoring.functions import load_reward_function

        fn = load_reward_function(sec.reward_fn, ctx.cfg.task)

        def score_fn(s, rows):
            flat_rows = [{**r, "prompt": p} for r, p, comps in zip(rows, s["rendered"], s["completions"])
                         for _ in comps]
            flat = fn(flat_rows, [c.text for comps in s["completions"] for c in comps])
            return nest(flat, s)

        return fn.name, score_fn, None
    rm_ref = sec.reward_model
    if not rm_ref or (rm_ref.startswith("stage:") and ref_stage(rm_ref) not in ctx.cfg.stages):
        return None
    from prefopt.scoring.scorer import load_scorer, rm_input_format, rm_prompt, scoring_length
    from prefopt.scoring.scorer import reward_model_config

    # A reward model that needs its own code is refused here, before any policy is sampled, not when it is loaded.
    reward_model_config(ctx.resolve(rm_ref), sec.trust_remote_code, "evaluate.trust_remote_code")
    key = "evaluate.rm_format"
    fmt = rm_input_format(sec.rm_format, ctx.resolve(rm_ref), key, rm_ref.startswith("stage:"), sec.trust_remote_code)
    # As many tokens as the reward model takes unless the config says fewer (a length above its limit is an error).
    length = scoring_length(ctx.resolve(rm_ref), sec.rm_max_length, "evaluate.rm_max_length", sec.trust_remote_code,
                            "evaluate.trust_remote_code")
    for r in rows:
        rm_prompt(r, "", fmt, key)
    holder = {}

    def score_fn(s, rows):
        if "scorer" not in holder:
            holder["scorer"] = load_scorer(ctx.resolve(rm_ref), sec.trust_remote_code, key="evaluate.trust_remote_code")
            holder["model"], holder["tok"] = holder["scorer"].model, holder["scorer"].tokenizer
        prompts = [rm_prompt(r, p, fmt, key) for r, p, comps in zip(rows, s["rendered"], s["completions"])
                   for _ in comps]
        responses = [c.text for comps in s["completions"] for c in comps]
        return nest(holder["scorer"].score(prompts, responses, scoring_batch_size(sec), length), s)

    return rm_ref, score_fn, holder
