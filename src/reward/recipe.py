"""The `reward` stage: a Bradley-Terry reward model trained with TRL's RewardTrainer.

    prefopt reward experiments/quickstart.yaml
    accelerate launch -m prefopt reward experiments/quickstart.yaml --reward.learning_rate=1e-4

Loss (Bradley & Terry 1952; Ouyang et al. 2022, Eq. 1): -log sigmoid(r(x, y_chosen) - r(x, y_rejected)), with r the
classification head's logit at the last token of prompt + response + EOS.

Setup: preferences -> canonical rows -> a held-out split (`eval_fraction`); the start model (`model`) gets a
one-output classification head. Train: RewardTrainer, resuming from the last checkpoint in `checkpoints/`.
Save: merged model + tokenizer in `model/`. Report on the held-out split, scored by us: pairwise accuracy
against the labels (`eval/accuracy`), mean reward margin (`eval/margin`) and, on the gold-reward task, accuracy
against the gold score on pairs whose gold scores differ (`eval/gold_accuracy`, label noise removed).
"""

from __future__ import annotations

import random
import statistics

from prefopt.data.loaders import load_preferences
from prefopt.data.templates import render_prompt
from prefopt.models import load_reward_model, load_tokenizer, save_model
from prefopt.reward.score import reward_text, score_texts
from prefopt.tracking import trainer_callback
from prefopt.train_args import hf_training_kwargs, last_checkpoint
from prefopt.utils import seed_everything


def split(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Shuffle with `seed` and hold out `eval_fraction` of the rows (at least one when the fraction is > 0)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_eval = max(1, round(len(rows) * eval_fraction)) if eval_fraction > 0 and len(rows) > 1 else 0
    return rows[n_eval:], rows[:n_eval]


def reward_config(cfg, ctx):
    """TRL's RewardConfig from our section, every value TRL defaults differently set explicitly."""
    from trl import RewardConfig

    args = hf_training_kwargs(cfg, ctx.dir / "checkpoints", ctx.seed)
    args["disable_tqdm"] = not ctx.is_main
    args.update(cfg.trainer_args)  # passthrough keys from the YAML win
    return RewardConfig(**args)


def peft_config(lora):
    if not lora.enabled:
        return None
    from peft import LoraConfig

    targets = lora.target_modules
    return LoraConfig(
        task_type="SEQ_CLS",  # keeps the new score head trainable (modules_to_save)
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
    )


def pairwise_metrics(chosen: list[float], rejected: list[float]) -> dict:
    """Held-out pairwise accuracy (r_chosen > r_rejected) and mean margin r_chosen - r_rejected."""
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"accuracy": sum(m > 0 for m in margins) / len(margins), "margin": statistics.fmean(margins)}


def gold_accuracy(rows: list[dict], chosen: list[float], rejected: list[float], task) -> tuple[float, int] | None:
    """Accuracy against the gold score on pairs whose gold scores differ (ignores annotator noise), and how many
    pairs that is. None when the rows are not the task's (their prompts hold no task input)."""
    hits = n = 0
    for row, rc, rr in zip(rows, chosen, rejected):
        source = row["meta"].get("input") or row["prompt"]
        try:
            gc, gr = task.gold_score(source, row["chosen"]), task.gold_score(source, row["rejected"])
        except (ValueError, TypeError):
            return None
        if gc == gr:
            continue
        n += 1
        hits += (rc > rr) == (gc > gr)
    return (hits / n, n) if n else None


def run(ctx) -> dict:
    from datasets import Dataset
    from trl import RewardTrainer

    cfg = ctx.section
    model_path = ctx.resolve(cfg.model)
    tok = load_tokenizer(model_path, padding_side="right")
    data = load_preferences(cfg.dataset, cfg.template, resolve=ctx.resolve)
    # Prompts are canonical (rendered strings, or chat messages rendered here by the tokenizer's chat template);
    # training on text keeps what the reward model sees identical to what the `score` stage feeds it.
    rows = [{**r, "prompt": render_prompt(r["prompt"], tok)} for r in data.rows]
    train_rows, eval_rows = split(rows, cfg.eval_fraction, ctx.seed)
    train_ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in train_rows])

    seed_everything(ctx.seed)  # the new score head is random: seed before it exists
    model = load_reward_model(model_path)
    model.config.pad_token_id = tok.pad_token_id
    args = reward_config(cfg, ctx)
    trainer = RewardTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tok,
                            peft_config=peft_config(cfg.lora), callbacks=[trainer_callback(ctx.tracker)])
    last = last_checkpoint(args.output_dir)
    result = trainer.train(resume_from_checkpoint=last)

    summary = {"train/pairs": len(train_rows), "eval/pairs": len(eval_rows), "train/loss": result.training_loss,
               "resumed_from": last, "skipped_rows": data.skipped}
    model = trainer.model
    if cfg.lora.enabled:
        model = model.merge_and_unload()
    if ctx.is_main:
        if eval_rows:
            summary.update(evaluate(model, tok, eval_rows, cfg, ctx))
            ctx.tracker.log({k: v for k, v in summary.items() if k.startswith("eval/")}, step=trainer.state.global_step)
        save_model(model, tok, ctx.dir / "model")
    return summary


def evaluate(model, tok, rows: list[dict], cfg, ctx) -> dict:
    """Score chosen and rejected of each held-out pair ourselves (same inputs as the `score` stage)."""
    texts = [reward_text(r["prompt"], r[side], tok.eos_token) for side in ("chosen", "rejected") for r in rows]
    model.eval()
    scores = score_texts(model, tok, texts, batch_size=cfg.per_device_train_batch_size * 2, max_length=cfg.max_length)
    chosen, rejected = scores[: len(rows)], scores[len(rows):]
    m = pairwise_metrics(chosen, rejected)
    out = {"eval/accuracy": m["accuracy"], "eval/margin": m["margin"]}
    if ctx.cfg.task.name != "none":
        from prefopt.tasks import get_task

        gold = gold_accuracy(rows, chosen, rejected, get_task(ctx.cfg.task.name))
        if gold is not None:
            out["eval/gold_accuracy"], out["eval/gold_pairs"] = gold
    return out
