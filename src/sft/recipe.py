"""The `sft` stage: supervised fine-tuning, loss on completion tokens only, in prefopt's training loop.

    prefopt sft experiments/quickstart.yaml --sft.learning_rate=1e-3
    accelerate launch --config_file experiments/accelerate/fsdp.yaml -m prefopt sft experiments/alpaca/llama7b.yaml

Setup: load the instruction data into prompt/completion rows (Alpaca rows rendered with the Alpaca template, or
chat messages for the tokenizer's chat template) and tokenize them here with one BOS (`sft_example`): prompt ids,
and completion ids (the answer and the token that ends the family's turn / EOS: the tokens trained on).
Train: the loop every preference objective uses (prefopt.preference.loop), packed without padding by default, with
`sft_loss` (sft/loss.py: the NLL of the completion tokens over their count in the optimizer step, TRL's
normalisation). Save: the final model (LoRA merged) as an HF folder with safetensors in `<run>/sft/model`; the
loop's checkpoints, resume and preemption (a killed run resumes from its newest `checkpoints/checkpoint-N` whose
manifest verifies; SIGTERM, SIGINT or SIGUSR1 saves a checkpoint at the current step and stops).

`sft.backend: trl` trains with TRL's SFTTrainer instead (`completion_only_loss=True`, the same tokens), kept as the
loop's oracle: tests/test_sft_loop.py trains both and compares their loss curves.
"""

from __future__ import annotations

from pathlib import Path

import random

from prefopt.runtime import faults
from prefopt.data.counts import note
from prefopt.data.errors import DataError
from prefopt.data.loaders import load_sft
from prefopt.data.templates import encode_many, render_prompt
from prefopt.models.loading import check_lora_mergeable, full_state_dict, load_causal_lm, load_tokenizer, save_model
from prefopt.training.prefix_tree import common_prefix
from prefopt.training.checkpoints import last_checkpoint
from prefopt.training.trainer import hf_training_kwargs, throughput_callback
from prefopt.training.lora import lora_config
from prefopt.dist.process import is_main_process, seed_everything, world_size
from prefopt.sft.loss import sft_loss


def sft_example(prompt, completion: str, tokenizer) -> dict:
    """A canonical row -> TRL's tokenized form {"input_ids", "completion_mask"}, tokenized here with `encode`.

    Tokenized here, not by TRL, for one BOS in every stage: TRL renders chat messages with
    `apply_chat_template(tokenize=True)`, which adds no BOS of its own, so a template without one (ChatML) trained
    without the BOS that generation gives (`encode` adds the tokenizer's), while text prompts it tokenizes with
    special tokens on, which doubles a BOS the text already carries. A dataset holding `input_ids` is one TRL
    does not tokenize again; it still builds the labels from `completion_mask` and truncates to max_length.

    As TRL builds them: an Alpaca prompt is followed by the completion and EOS; a chat prompt takes the completion
    as an assistant message and the whole conversation is rendered by the chat template (which ends the turn).
    The completion starts where the tokenized prompt and prompt + completion part (TRL's common prefix)."""
    return sft_tokenized([{"prompt": prompt, "completion": completion}], tokenizer)[0]


def sft_tokenized(rows: list[dict], tokenizer) -> list[dict]:
    """`sft_example` of every row, the texts tokenized in one batch (`encode_many`)."""
    texts = [_texts(r["prompt"], r["completion"], tokenizer) for r in rows]
    prompts = encode_many([p for p, _ in texts], tokenizer)
    fulls = encode_many([f for _, f in texts], tokenizer)
    out = []
    for prompt_ids, ids in zip(prompts, fulls):
        n = common_prefix(prompt_ids, ids)
        out.append({"input_ids": ids, "completion_mask": [0] * n + [1] * (len(ids) - n)})
    return out


def _texts(prompt, completion: str, tokenizer) -> tuple[str, str]:
    """(prompt text, prompt + completion text) as TRL renders them (see `sft_example`)."""
    if isinstance(prompt, list):
        return render_prompt(prompt, tokenizer), tokenizer.apply_chat_template(
            prompt + [{"role": "assistant", "content": completion}], tokenize=False)
    eos = tokenizer.eos_token
    return prompt, prompt + (completion if completion.endswith(eos) else completion + eos)


def build_trainer(sec, model_path: str, rows: list[dict], output_dir: Path, seed: int, callbacks=(),
                  eval_fraction: float = 0.0, source: str = "sft.dataset"):
    """SFTTrainer for canonical rows, with every training argument set from the section, on the loop's examples
    (`sft_examples`: the same truncation, text windows and dropped rows); `trainer.prefopt_dropped` counts the rows
    whose prompt fills max_length."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = load_tokenizer(model_path)
    examples, dropped = sft_examples(rows, tokenizer, sec.max_length)
    if not examples:
        raise nothing_to_train(source, sec.max_length)
    dataset = Dataset.from_list([{"input_ids": e["prompt_ids"] + e["completion_ids"],
                                  "completion_mask": [0] * len(e["prompt_ids"]) + [1] * len(e["completion_ids"])}
                                 for e in examples])
    eval_dataset = None
    if eval_fraction > 0:
        split = dataset.train_test_split(test_size=eval_fraction, seed=seed)
        dataset, eval_dataset = split["train"], split["test"]
    seed_everything(seed)  # before the model exists: LoRA init draws random numbers
    model = load_causal_lm(model_path)
    args = SFTConfig(
        **hf_training_kwargs(sec, output_dir, seed),
        completion_only_loss=True,  # loss on completion tokens only (the prompt is masked)
        packing=False,
        eval_strategy="epoch" if eval_dataset is not None else "no",
        **sec.trainer_args,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(sec.lora, "CAUSAL_LM") if sec.lora.enabled else None,
        callbacks=list(callbacks),
    )
    trainer.prefopt_dropped = dropped
    return trainer


def sft_examples(rows: list[dict], tokenizer, max_length: int) -> tuple[list[dict], int]:
    """Rows -> the loop's examples {"prompt_ids", "completion_ids"} (`sft_example`'s tokens split where its mask
    starts), and how many rows were left out because the prompt alone fills max_length (no completion token to
    train on; TRL drops those too). A longer completion is cut to fit (keep the start, as TRL); language-model text
    (a `text` row: no prompt) is split into windows instead (`text_windows`), so none of it is lost."""
    out, dropped = [], 0
    for row, ex in zip(rows, sft_tokenized(rows, tokenizer)):
        ids = ex["input_ids"]
        n = len(ids) - sum(ex["completion_mask"])
        if row["prompt"] == "":
            out += text_windows(ids, max_length)
        elif n < max_length and n < len(ids):
            out.append({"prompt_ids": ids[:n], "completion_ids": ids[n:max_length]})
        else:
            dropped += 1
    return out, dropped


def nothing_to_train(source: str, max_length: int) -> DataError:
    return DataError(source, None, None, f"every example's prompt fills sft.max_length={max_length} tokens, so no "
                     "completion token is left to train on; raise sft.max_length")


def text_windows(ids: list[int], max_length: int) -> list[dict]:
    """A document of language-model text as examples of at most max_length tokens that together train every token
    but the first (its BOS, or its first token where the tokenizer adds none: nothing precedes it to predict it
    from): window k reads the token before its own as context. Each window's attention is its own (packed rows
    restart per example), as in document-masked pretraining."""
    step = max(1, max_length - 1)
    return [{"prompt_ids": ids[s - 1:s], "completion_ids": ids[s:s + step]} for s in range(1, len(ids), step)]


def objective(policy, _ref=None):
    return sft_loss(policy.sums, policy.tokens_per_share)


def eval_loss(model, examples: list[dict], sec, pad_token_id: int) -> float:
    """Token-mean completion NLL of held-out examples (TRL's eval_loss), in batches as training lays them out."""
    import torch

    from prefopt.preference.batching import collate
    from prefopt.training.forward import pair_logps

    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), sec.per_device_train_batch_size):
            batch = collate(examples[i:i + sec.per_device_train_batch_size], pad_token_id, sec.max_length,
                            sec.layout)
            sums, lengths = pair_logps(model, {k: v.to(model.device) for k, v in batch.items()},
                                       sec.logps_chunk_size)
            total, tokens = total - float(sums.sum()), tokens + int(lengths.sum())
    return total / max(tokens, 1)


def run(ctx) -> dict:
    if ctx.section.backend == "trl":
        # a preemption signal from here on stops training with a checkpoint; during the final save it lets it finish
        with faults.StopSignals(ctx.stage) as stop:
            return _run_trl(ctx, stop)
    return _run_loop(ctx)


def _load_data(ctx, tokenizer):
    """The section's instruction rows (chat turns checked against `tokenizer`'s template), the skipped-row count
    logged at step 0 (both backends)."""
    sec = ctx.section
    data = load_sft(sec.dataset, sec.template, resolve=lambda p: ctx.resolve(p, model=False), tokenizer=tokenizer)
    if data.skipped:
        ctx.tracker.log({"data/skipped_rows": data.skipped}, step=0)
    return data


def _run_loop(ctx) -> dict:
    from prefopt.preference.loop import train

    sec = ctx.section
    tokenizer = load_tokenizer(ctx.resolve(sec.model))
    data = _load_data(ctx, tokenizer)
    examples, dropped = sft_examples(data.rows, tokenizer, sec.max_length)
    if not examples:
        raise nothing_to_train(data.path, sec.max_length)
    note(f"examples dropped: the prompt fills max_length={sec.max_length} tokens", dropped)
    held_out: list[dict] = []
    if sec.eval_fraction > 0:  # a seeded split, the same on every process
        random.Random(ctx.seed).shuffle(examples)
        k = max(1, round(sec.eval_fraction * len(examples)))
        held_out, examples = examples[:k], examples[k:]
    out = train(ctx, objective, reference=None, examples=examples)
    evaluated = {}
    if held_out and is_main_process():  # the saved model, whole, on the main process (the summary's writer)
        import torch

        model = load_causal_lm(out["model"], dtype="float32").to("cuda" if torch.cuda.is_available() else "cpu")
        evaluated["eval_loss"] = eval_loss(model, held_out, sec, tokenizer.pad_token_id)
    summary = {
        "train_rows": len(examples),
        "eval_rows": len(held_out),
        "skipped_rows": data.skipped,
        "dropped_fully_truncated": dropped,  # prompts longer than max_length leave no completion
        "skipped_examples": data.skipped_reasons[:5],
        "dataset": data.stats(),  # rows kept; skipped, exact / near duplicates and other languages dropped
        "train_loss": out.get("loss"),  # the last logging window's token-mean NLL
        "processes": world_size(),
        "lora": sec.lora.enabled,
        **{k: v for k, v in out.items() if k not in ("examples", "loss")},
        **evaluated,
    }
    return summary


def _run_trl(ctx, stop: faults.StopSignals) -> dict:
    from prefopt.runtime.tracking import trainer_callback

    sec = ctx.section
    data = _load_data(ctx, load_tokenizer(ctx.resolve(sec.model)))
    preempt = faults.trainer_callback(stop)
    perf = throughput_callback(ctx.stage, sec.peak_tflops)  # perf/*: tokens/s, padding, MFU
    trainer = build_trainer(sec, ctx.resolve(sec.model), data.rows, Path(ctx.dir) / "checkpoints", ctx.seed,
                            callbacks=[perf, trainer_callback(ctx.tracker), preempt],
                            eval_fraction=sec.eval_fraction, source=data.path)
    note(f"examples dropped: the prompt fills max_length={sec.max_length} tokens", trainer.prefopt_dropped)
    if sec.lora.enabled:
        check_lora_mergeable(trainer.accelerator, "sft.lora.enabled")
    resume = last_checkpoint(trainer.args.output_dir, ctx.stage)
    with faults.writing(trainer.args.output_dir):
        result = trainer.train(resume_from_checkpoint=resume)
    faults.raise_if_stopped(preempt, ctx.stage, trainer.args.output_dir)
    summary = {
        "train_rows": len(trainer.train_dataset),
        "eval_rows": len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0,
        "skipped_rows": data.skipped,
        "dropped_fully_truncated": trainer.prefopt_dropped,  # prompts longer than max_length leave no completion
        "skipped_examples": data.skipped_reasons[:5],
        "dataset": data.stats(),  # rows kept; skipped, exact / near duplicates and other languages dropped
        "train_loss": result.training_loss,
        "steps": trainer.state.global_step,
        "processes": trainer.accelerator.num_processes,
        "resumed_from": resume,
        "lora": sec.lora.enabled,
        **perf.figures,
    }
    if trainer.eval_dataset is not None:
        summary["eval_loss"] = trainer.evaluate()["eval_loss"]
    # Under FSDP / ZeRO-3 every process holds a shard: all of them take part in gathering the whole weights.
    state = full_state_dict(trainer.accelerator, trainer.model_wrapped)
    if trainer.is_world_process_zero():
        final = trainer.model
        if sec.lora.enabled:
            final = final.merge_and_unload()  # later stages load a plain checkpoint
        with faults.writing(Path(ctx.dir) / "model"):
            save_model(final, trainer.processing_class, Path(ctx.dir) / "model", state_dict=state)
    summary["model"] = str(Path(ctx.dir) / "model")
    return summary
