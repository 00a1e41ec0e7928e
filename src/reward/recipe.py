"""The `reward` stage: a Bradley-Terry reward model, a likelihood reward model (default) or a classifier.

    prefopt reward experiments/quickstart.yaml
    accelerate launch -m prefopt reward experiments/quickstart.yaml --reward.learning_rate=1e-4
    prefopt reward experiments/quickstart.yaml --reward.kind=classifier

Loss (Bradley & Terry 1952; Ouyang et al. 2022, Eq. 1): -log sigmoid(r(x, y_chosen) - r(x, y_rejected)), with r
either beta * mean log p(response + EOS | prompt) under the model itself (`kind: likelihood`, scoring/likelihood.py)
or a classification head's logit at the last token of prompt + response + EOS (`kind: classifier`).

Setup: preferences -> canonical rows -> train / validation (`eval_fraction`) / test (`test_fraction`) splits by
prompt (every pair of a prompt in one split).
Train: both kinds in the shared preference loop (prefopt.preference.loop): `likelihood` the start model (a causal
LM) itself, `classifier` the start model with a new one-output head, on padded rows of the texts the `score` stage
scores (`classifier_rows`). `backend: trl` trains the classifier with TRL's RewardTrainer instead, the loop's oracle
(tests/test_reward_loop.py). Both resume from the last checkpoint in `checkpoints/` whose manifest verifies, and a
SIGTERM, SIGINT or SIGUSR1 saves one at the current step and stops (prefopt.runtime.faults). Every `save_steps` the
model is scored on the validation split by us (the same inputs as the `score` stage); the checkpoint with the best
validation accuracy is kept (ties: the lower validation loss) and training stops after `early_stopping_patience`
evaluations without a better one. Save: that checkpoint, merged, + tokenizer + `reward_model.json` in `model/` (the
marker keeps later stages giving it the policy's text, `score.rm_format: auto`). Report on the test split, which
nothing was chosen on: pairwise accuracy against the labels (`eval/accuracy` ± `eval/accuracy_se`), mean reward
margin (`eval/margin` ± `eval/margin_se`) and, on a gold-reward task, accuracy against the gold score on pairs whose
gold scores differ (`eval/gold_accuracy`, label noise removed), with standard errors clustered by prompt
(`eval/prompts` of them). `test_margins.jsonl` keeps each test pair's margin: the pairs stage calibrates its
label-quality estimate on it.
`prefopt run` stops at the gate (`min_eval_accuracy`) after this stage.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from collections import defaultdict
from pathlib import Path

from prefopt.runtime import faults
from prefopt.config import ConfigError
from prefopt.data.counts import note
from prefopt.data.loaders import load_preferences
from prefopt.data.templates import encode_many, render_prompt
from prefopt.models.loading import check_lora_mergeable, full_state_dict, load_reward_model, load_tokenizer, save_model
from prefopt.scoring.scorer import ClassifierScorer, reward_text
from prefopt.runtime.tracking import trainer_callback
from prefopt.training.checkpoints import last_checkpoint
from prefopt.training.trainer import hf_training_kwargs, throughput_callback
from prefopt.training.lora import lora_config
from prefopt.dist.process import seed_everything


MIN_PROMPTS = 2
"""Prompts each split holds at least: a standard error over prompts needs two."""


def prompt_key(row: dict) -> str:
    """What makes two rows the same prompt: its text (chat messages as their JSON)."""
    p = row["prompt"]
    return p if isinstance(p, str) else json.dumps(p, sort_keys=True, ensure_ascii=False)


def split(rows: list[dict], eval_fraction: float, seed: int,
          test_fraction: float = 0.0) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test) by prompt: the rows are grouped by prompt, the prompts shuffled with `seed`, and
    `test_fraction` then `eval_fraction` of the prompts held out with all their rows, so a file with several pairs
    per prompt never puts one prompt in two splits (its pairs would let the test split reward memorising the
    prompt). A split asked for (fraction > 0), and the train split, must hold at least MIN_PROMPTS prompts; else a
    ConfigError naming the split and what to change. With one row per prompt this is the row split it replaced
    (the same shuffle, the same parts)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(prompt_key(r), []).append(r)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    n = len(order)
    n_test = _prompts_in(n, test_fraction, "test", "test_fraction")
    n_val = _prompts_in(n, eval_fraction, "validation", "eval_fraction")
    if n - n_test - n_val < MIN_PROMPTS:
        raise ConfigError(
            f"reward.eval_fraction={eval_fraction:g} and reward.test_fraction={test_fraction:g} leave "
            f"{n - n_test - n_val} of {n} prompts in the train split, which needs at least {MIN_PROMPTS}: give more "
            "preference data or lower the fractions")

    def rows_of(parts: list[list[dict]]) -> list[dict]:
        return [r for part in parts for r in part]

    return rows_of(order[n_test + n_val:]), rows_of(order[n_test:n_test + n_val]), rows_of(order[:n_test])


def _prompts_in(n: int, fraction: float, part: str, key: str) -> int:
    """round(n * fraction) prompts for a split, refused when that is fewer than MIN_PROMPTS (fraction 0: none)."""
    if fraction <= 0:
        return 0
    k = round(n * fraction)
    if k >= MIN_PROMPTS:
        return k
    need = math.ceil(100 * MIN_PROMPTS / n) / 100  # round(n * need) >= MIN_PROMPTS
    fix = (f"reward.{key}={need:g} or more, or more preference data" if need < 0.5 else
           f"more preference data ({3 * MIN_PROMPTS} prompts hold {MIN_PROMPTS} in each of train, validation and "
           f"test)")
    raise ConfigError(f"reward.{key}={fraction:g} puts {k} of {n} distinct prompts in the {part} split, which needs "
                      f"at least {MIN_PROMPTS} (no prompt is split across parts; standard errors are over prompts): "
                      f"use {fix}, or reward.{key}=0 for no {part} split")


def classifier_rows(rows: list[dict], tok, max_length: int) -> list[dict]:
    """A classifier's train rows {"chosen_ids", "rejected_ids"}, for the loop (prefopt.preference.rewards) or TRL's
    RewardTrainer, tokenized here as the `score` stage tokenizes (`score_texts`): prompt + response + EOS through
    `encode` (one BOS, also for chat templates that write it) and cut to `max_length` from the end. Given ids, TRL
    tokenizes nothing again, and its filter, which would drop a pair longer than max_length without a word, finds
    none. The cut pairs are counted."""
    out, cut = [], 0
    sides = {k: encode_many([reward_text(r["prompt"], r[k], tok.eos_token) for r in rows], tok)
             for k in ("chosen", "rejected")}
    for chosen, rejected in zip(sides["chosen"], sides["rejected"]):
        ids = {"chosen_ids": chosen, "rejected_ids": rejected}
        if any(len(v) > max_length for v in ids.values()):
            cut += 1
            ids = {k: v[:max_length] for k, v in ids.items()}
        out.append(ids)
    note(f"reward pairs cut to max_length={max_length} tokens (the score stage cuts them the same way)", cut)
    return out


def reward_config(cfg, ctx):
    """TRL's RewardConfig from our section, every value TRL defaults differently set explicitly."""
    from trl import RewardConfig

    args = hf_training_kwargs(cfg, ctx.dir / "checkpoints", ctx.seed)
    args["disable_tqdm"] = not ctx.is_main
    args.update(cfg.trainer_args)  # passthrough keys from the YAML win
    return RewardConfig(**args)


def peft_config(lora):
    """The classifier's LoRA config: SEQ_CLS keeps the new score head trainable (modules_to_save)."""
    return lora_config(lora, "SEQ_CLS") if lora.enabled else None


def clustered_se(values: list[float], clusters: list) -> float:
    """Standard error of the mean of `values`, clustered by `clusters` (the prompt of each pair): pairs of one
    prompt are not independent, so the residuals are summed within each prompt before squaring. The cluster-robust
    (sandwich) variance of a mean (Liang & Zeger 1986) with the small-sample factor G / (G - 1) (CR1; Cameron &
    Miller 2015, "A Practitioner's Guide to Cluster-Robust Inference", J. Human Resources 50(2)):

        SE = sqrt(G / (G - 1) * sum_g (sum_{i in g} (x_i - mean))^2) / n,   G clusters, n values.

    With one value per cluster it is the ordinary s / sqrt(n) (s with n - 1); NaN with fewer than two clusters."""
    n = len(values)
    if n == 0:
        return math.nan
    mean = statistics.fmean(values)
    totals: dict = defaultdict(float)
    for x, g in zip(values, clusters, strict=True):
        totals[g] += x - mean
    g = len(totals)
    if g < 2:
        return math.nan
    return math.sqrt(g / (g - 1) * sum(t * t for t in totals.values())) / n


def pairwise_metrics(chosen: list[float], rejected: list[float], prompts: list | None = None) -> dict:
    """Held-out pairwise accuracy (r_chosen > r_rejected; a tie counts 1/2) and mean margin r_chosen - r_rejected,
    each with its standard error clustered by prompt (`clustered_se`; `prompts`: each pair's prompt, None: every
    pair its own), the number of prompts, and the mean Bradley-Terry loss -log sigmoid(margin)."""
    margins = [c - r for c, r in zip(chosen, rejected)]
    n = len(margins)
    clusters = list(range(n)) if prompts is None else prompts
    right = [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins]
    return {"accuracy": statistics.fmean(right), "accuracy_se": clustered_se(right, clusters),
            "margin": statistics.fmean(margins), "margin_se": clustered_se(margins, clusters),
            "loss": statistics.fmean(_softplus(-m) for m in margins), "pairs": n, "prompts": len(set(clusters))}


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def gold_accuracy(rows: list[dict], chosen: list[float], rejected: list[float], task) -> tuple[float, int] | None:
    """Accuracy against the gold score on pairs whose gold scores differ (ignores annotator noise), and how many
    pairs that is. None when the rows are not the task's (no task input in their metadata)."""
    hits = gold_hits(rows, chosen, rejected, task)
    return (statistics.fmean(h for h, _ in hits), len(hits)) if hits else None


def gold_hits(rows: list[dict], chosen: list[float], rejected: list[float], task) -> list[tuple[float, str]] | None:
    """(1.0 if the reward model orders the pair as the gold score does else 0.0, the pair's prompt) for each pair
    whose gold scores differ; None when the rows are not the task's."""
    from prefopt.gold import TaskError, example

    out = []
    for row, rc, rr in zip(rows, chosen, rejected):
        ex = example(row)
        if not isinstance(ex.get("input"), str):
            return None
        try:
            gc, gr = task.gold_score(ex, row["chosen"]), task.gold_score(ex, row["rejected"])
        except TaskError:
            return None
        if gc != gr:
            out.append((float((rc > rr) == (gc > gr)), prompt_key(row)))
    return out


class Selection:
    """Checkpoint selection on the validation split: `record(step, figures)` after each evaluation, the best step
    (best accuracy; on a tie the lower loss, then the earlier step) in `best()`, and whether to stop (after
    `patience` evaluations without a better one; 0: never). History in `history_path` (one JSON line per
    evaluation), reread on resume."""

    def __init__(self, history_path: Path, patience: int, is_main: bool):
        self.path, self.patience, self.is_main = history_path, patience, is_main
        self.history = []
        if history_path.exists():
            for line in history_path.read_text().splitlines():
                try:
                    self.history.append(json.loads(line))
                except ValueError:
                    continue  # a line cut by a kill: that evaluation is lost, nothing else

    def seen(self, step: int) -> bool:
        return any(h["step"] == step for h in self.history)

    def best(self) -> dict | None:
        return max(self.history, key=lambda h: (h["accuracy"], -h["loss"], -h["step"]), default=None)

    def figures(self) -> dict:
        """The summary's select/* entries: the best step, its validation accuracy, every evaluation."""
        best = self.best()
        return {"select/best_step": best["step"], "select/accuracy": best["accuracy"], "select/history": self.history}

    def record(self, step: int, m: dict) -> bool:
        """Add one evaluation; True when training should stop."""
        rec = {"step": step, "accuracy": m["accuracy"], "loss": m["loss"], "margin": m["margin"]}
        self.history.append(rec)
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        best = self.best()
        since = sum(h["step"] > best["step"] for h in self.history)
        if self.patience and since >= self.patience:
            print(f"[reward] early stop at step {step}: no better validation accuracy for {since} evaluations "
                  f"(best {best['accuracy']:.3f} at step {best['step']})", flush=True)
            return True
        return False


def selection_callback(scorer_of, val_rows: list[dict], cfg, selection: Selection):
    """A TrainerCallback that scores the validation split every `save_steps` (and at the last step), keeps the best
    step in `state.best_global_step` (so the Trainer's checkpoint rotation never deletes it) and stops training
    when `selection` says so. `scorer_of(model)` is the scorer the `score` stage would use for that model."""
    from transformers import TrainerCallback

    class SelectCallback(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = state.global_step
            if not (step % args.save_steps == 0 or step >= state.max_steps) or not val_rows or selection.seen(step):
                return
            was_training = model.training
            stop = selection.record(step, evaluate_pairs(scorer_of(model), val_rows, cfg))
            model.train(was_training)
            best = selection.best()
            state.best_global_step, state.best_metric = best["step"], best["accuracy"]
            if stop:
                control.should_training_stop = True
                control.should_save = True

    return SelectCallback()


# a preemption signal from here on stops training with a checkpoint; during the final save it lets it finish
@faults.handled(faults.StopSignals)
def run(ctx, stop: faults.StopSignals) -> dict:
    cfg = ctx.section
    model_path = ctx.resolve(cfg.model)
    tok = load_tokenizer(model_path, padding_side="right")
    data = load_preferences(cfg.dataset, cfg.template, resolve=ctx.resolve, tokenizer=tok)
    # Prompts are canonical (rendered strings, or chat messages rendered here by the tokenizer's chat template);
    # training on text keeps what the reward model sees identical to what the `score` stage feeds it.
    rows = [{**r, "prompt": render_prompt(r["prompt"], tok)} for r in data.rows]
    train_rows, val_rows, test_rows = split(rows, cfg.eval_fraction, ctx.seed, cfg.test_fraction)
    selection = Selection(ctx.dir / "selection.jsonl", cfg.early_stopping_patience, ctx.is_main)
    if cfg.kind == "likelihood" or cfg.backend == "prefopt":
        return run_loop(ctx, cfg, tok, data, train_rows, val_rows, test_rows, selection)
    return run_trl(ctx, stop, cfg, tok, data, train_rows, val_rows, test_rows, selection)


def run_trl(ctx, stop: faults.StopSignals, cfg, tok, data, train_rows, val_rows, test_rows,
            selection: Selection) -> dict:
    """`kind: classifier`, `backend: trl`: TRL's RewardTrainer, with the same selection and test report."""
    model_path = ctx.resolve(cfg.model)
    from datasets import Dataset  # here: the loop's kinds (the quickstart's) need neither (~3 s of imports)
    from trl import RewardTrainer

    train_ds = Dataset.from_list(classifier_rows(train_rows, tok, cfg.max_length))

    seed_everything(ctx.seed)  # the new score head is random: seed before it exists
    model = load_reward_model(model_path)
    model.config.pad_token_id = tok.pad_token_id
    args = reward_config(cfg, ctx)
    select = selection_callback(lambda m: ClassifierScorer(m, tok), val_rows, cfg, selection)
    preempt = faults.trainer_callback(stop)
    perf = throughput_callback(ctx.stage, cfg.peak_tflops)  # perf/*: tokens/s, padding, MFU
    trainer = RewardTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tok,
                            peft_config=peft_config(cfg.lora),
                            callbacks=[perf, trainer_callback(ctx.tracker), select, preempt])
    if cfg.lora.enabled:
        check_lora_mergeable(trainer.accelerator, "reward.lora.enabled")
    last = last_checkpoint(args.output_dir, ctx.stage)
    with faults.writing(args.output_dir):
        result = trainer.train(resume_from_checkpoint=last)
    faults.raise_if_stopped(preempt, ctx.stage, args.output_dir)

    summary = {"train/pairs": len(train_rows), "select/pairs": len(val_rows), "eval/pairs": len(test_rows),
               "train/loss": result.training_loss, "train/steps": trainer.state.global_step, "resumed_from": last,
               "skipped_rows": data.skipped, **perf.figures}
    best = selection.best()
    if best is not None:
        summary.update(selection.figures())
        if best["step"] != trainer.state.global_step:
            ckpt = Path(args.output_dir) / f"checkpoint-{best['step']}"
            if ckpt.is_dir():
                trainer._load_from_checkpoint(str(ckpt))  # model weights only (adapter for LoRA)
                print(f"[reward] kept step {best['step']} (validation accuracy {best['accuracy']:.3f}) of "
                      f"{trainer.state.global_step}", flush=True)
            else:
                summary["select/best_step"] = trainer.state.global_step
                print(f"[reward] best checkpoint {ckpt} is gone: keeping the last step", flush=True)
    model = trainer.model
    if cfg.lora.enabled:
        model = model.merge_and_unload()
    state = full_state_dict(trainer.accelerator, trainer.model_wrapped)  # collective under FSDP / ZeRO-3
    if ctx.is_main:
        with faults.writing(ctx.dir / "model"):
            save_model(model, tok, ctx.dir / "model", state_dict=state)
        if state is not None:  # this process holds a shard: the test figures are of the saved, whole model
            model = load_reward_model(str(ctx.dir / "model"))
        report_test(ClassifierScorer(model, tok), test_rows, cfg, ctx, summary, trainer.state.global_step)
    return summary


def report_test(scorer, test_rows: list[dict], cfg, ctx, summary: dict, step: int) -> None:
    """Test-split figures into `summary`, the tracker and one printed line."""
    summary["kind"] = scorer.kind
    if not test_rows:
        return
    summary.update(evaluate(scorer, test_rows, cfg, ctx))
    ctx.tracker.log({k: v for k, v in summary.items() if k.startswith("eval/")}, step=step)
    print(f"[reward] held-out (test) pairwise accuracy {summary['eval/accuracy']:.3f} ± "
          f"{summary['eval/accuracy_se']:.3f} over {len(test_rows)} pairs of {summary['eval/prompts']} prompts "
          f"(standard errors clustered by prompt), margin "
          f"{summary['eval/margin']:.3f} ± {summary['eval/margin_se']:.3f}"
          + (f", gold accuracy {summary['eval/gold_accuracy']:.3f}" if "eval/gold_accuracy" in summary else ""),
          flush=True)


def run_loop(ctx, cfg, tok, data, train_rows, val_rows, test_rows, selection: Selection) -> dict:
    """Bradley-Terry in the shared preference loop, on r = beta * mean log p(y|x) of the SFT model itself
    (`kind: likelihood`, scoring/likelihood.py) or on a new one-output head's value at the last token of prompt +
    response + EOS (`kind: classifier`); validation selection and test report as above."""
    import shutil

    from prefopt.models.loading import load_causal_lm
    from prefopt.preference.config import loop_fields
    from prefopt.preference.loop import train
    from prefopt.reward.loss import classifier_objective, likelihood_objective
    from prefopt.scoring.likelihood import LikelihoodScorer, write_meta

    likelihood = cfg.kind == "likelihood"

    def scorer_of(model):  # as the `score` stage scores this kind
        return LikelihoodScorer(model, tok, cfg.beta) if likelihood else ClassifierScorer(model, tok)

    def hook(step: int, model) -> bool:
        if not val_rows or selection.seen(step):
            return False
        return selection.record(step, evaluate_pairs(scorer_of(model), val_rows, cfg))

    # the loop's own fields for a pair stage: every checkpoint kept (the selected one must survive); the likelihood
    # model in the prefix-tree layout, long prompts cut from the left as the aligners do; the classifier padded
    sec = loop_fields(cfg, layout="prefix_tree" if likelihood else "padded", save_total_limit=0,
                      logps_chunk_size=0, long_prompts="truncate")
    if likelihood:
        out = train(ctx, likelihood_objective(cfg.beta), reference=None, rows=train_rows, section=sec, hook=hook)
    else:
        out = train(ctx, classifier_objective, reference=None, section=sec, hook=hook, classifier=True,
                    examples=classifier_rows(train_rows, tok, cfg.max_length))
    summary = {"train/pairs": len(train_rows), "select/pairs": len(val_rows), "eval/pairs": len(test_rows),
               "train/loss": out.get("loss"), "train/steps": out["steps"], "resumed_from": out["resumed_from"],
               "skipped_rows": data.skipped, **({"beta": cfg.beta} if likelihood else {}),
               **{k: v for k, v in out.items() if k.startswith("perf/")}}  # the loop's throughput and MFU
    model_dir = ctx.dir / "model"
    best = selection.best()
    if best is not None:
        summary.update(selection.figures())
        ckpt = ctx.dir / "checkpoints" / f"checkpoint-{best['step']}"
        if best["step"] != out["steps"] and ctx.is_main and ckpt.is_dir():
            shutil.rmtree(model_dir)
            shutil.copytree(ckpt, model_dir, ignore=shutil.ignore_patterns("state", "checkpoint_complete",
                                                                              "manifest.json", "train_state.json"))
            print(f"[reward] kept step {best['step']} (validation accuracy {best['accuracy']:.3f}) of "
                  f"{out['steps']}", flush=True)
    if ctx.is_main:  # the saved model, whole (a classifier's `reward_model.json` is written with it)
        if likelihood:
            write_meta(model_dir, cfg.beta)
            model = load_causal_lm(str(model_dir), dtype="float32").eval()
        else:
            model = load_reward_model(str(model_dir), complete=True).eval()
        report_test(scorer_of(model), test_rows, cfg, ctx, summary, out["steps"])
    return summary


def evaluate_pairs(scorer, rows: list[dict], cfg) -> dict:
    """Pairwise figures of a scorer on preference rows, scored as the `score` stage scores (eval mode)."""
    chosen, rejected = score_pairs(scorer, rows, cfg)
    return pairwise_metrics(chosen, rejected, [prompt_key(r) for r in rows])


def score_pairs(scorer, rows: list[dict], cfg) -> tuple[list[float], list[float]]:
    prompts = [r["prompt"] for _ in ("chosen", "rejected") for r in rows]
    responses = [r[side] for side in ("chosen", "rejected") for r in rows]
    scorer.model.eval()
    scores = scorer.score(prompts, responses, batch_size=cfg.per_device_train_batch_size * 2,
                          max_length=cfg.max_length)
    return scores[: len(rows)], scores[len(rows):]


def evaluate(scorer, rows: list[dict], cfg, ctx) -> dict:
    """Test-split figures with standard errors clustered by prompt (`eval/prompts` of them);
    each pair's margin goes to `test_margins.jsonl`."""
    from prefopt.io import write_jsonl

    chosen, rejected = score_pairs(scorer, rows, cfg)
    m = pairwise_metrics(chosen, rejected, [prompt_key(r) for r in rows])
    out = {f"eval/{k}": v for k, v in m.items()}
    gold_of = None
    from prefopt.gold import get_task, has_gold

    if has_gold(ctx.cfg.task):
        task = get_task(ctx.cfg.task)
        hits = gold_hits(rows, chosen, rejected, task)
        if hits:
            out["eval/gold_accuracy"] = statistics.fmean(h for h, _ in hits)
            out["eval/gold_pairs"] = len(hits)
            out["eval/gold_accuracy_se"] = clustered_se([h for h, _ in hits], [p for _, p in hits])
            gold_of = task
    margins = []
    for r, c, j in zip(rows, chosen, rejected):
        rec = {"margin": c - j}
        if gold_of is not None:
            from prefopt.gold import example

            ex = example(r)
            gc, gr = gold_of.gold_score(ex, r["chosen"]), gold_of.gold_score(ex, r["rejected"])
            rec["gold_order"] = 1 if gc > gr else -1 if gc < gr else 0  # +1: the labelled chosen is gold-better
        margins.append(rec)
    write_jsonl(ctx.dir / "test_margins.jsonl", margins)
    return out
