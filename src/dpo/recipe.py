"""The `dpo` stage: DPO / IPO / conservative DPO with TRL's DPOTrainer on the pairs file.

    prefopt dpo experiments/quickstart.yaml
    accelerate launch --config_file experiments/accelerate/deepspeed_zero3.yaml -m prefopt dpo CONFIG

Setup: pairs (prompts already rendered, passed to TRL as plain text so it applies no chat template and appends
EOS itself), the policy, the reference (loaded / precomputed / LoRA base), a DPOConfig built field by field from
our section. Train (resuming from the last checkpoint of a killed run). Save the policy (LoRA merged) to
`<stage>/model`. Why our defaults differ from TRL's: docs/methods.md, "DPO through TRL".
"""

from __future__ import annotations

import gc
from pathlib import Path

from prefopt.models import load_causal_lm, load_tokenizer, save_model
from prefopt.preference_data import load_pairs
from prefopt.tracking import trainer_callback
from prefopt.train_args import hf_training_kwargs, last_checkpoint
from prefopt.utils import seed_everything


def trl_loss(loss_type: str, label_smoothing: float, sft_weight: float = 0.0) -> dict:
    """Our loss_type (+ the RPO NLL term) -> DPOConfig fields.

    TRL 1.16's "sigmoid" ignores label_smoothing, so cDPO is built from two of its losses. With A = logsigma(bh),
    B = logsigma(-bh): sigmoid = -A and robust = (-(1-e)A + eB) / (1-2e), hence
    cDPO = -(1-e)A - eB = 2(1-e) * sigmoid - (1-2e) * robust (same value, same gradient; tests/test_losses.py).
    sft_weight > 0 adds TRL's "sft" loss (mean NLL of the chosen tokens) with that weight."""
    if loss_type == "cdpo":
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"cdpo needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
        e = label_smoothing
        out = {"loss_type": ["sigmoid", "robust"], "loss_weights": [2 * (1 - e), -(1 - 2 * e)], "label_smoothing": e}
    else:
        out = {"loss_type": [loss_type], "loss_weights": [1.0], "label_smoothing": 0.0}
    if sft_weight > 0:
        out["loss_type"] = out["loss_type"] + ["sft"]
        out["loss_weights"] = out["loss_weights"] + [sft_weight]
    if out["loss_weights"] == [1.0]:
        del out["loss_weights"]
    return out


def build_dpo_config(sec, out_dir: Path, seed: int):
    """DPOConfig with every field that matters set from our section (TRL's own defaults differ: see train_args)."""
    from trl import DPOConfig

    args = hf_training_kwargs(sec, out_dir, seed)
    args.update(
        beta=sec.beta,
        disable_dropout=True,
        precompute_ref_log_probs=sec.reference == "precomputed",
        **trl_loss(sec.loss_type, sec.label_smoothing, sec.sft_weight),
    )
    args.update(sec.trainer_args)  # explicit passthrough wins
    return DPOConfig(**args)


def run(ctx) -> dict:
    from datasets import Dataset
    from trl import DPOTrainer

    sec = ctx.section
    if sec.reference == "lora_base" and not sec.lora.enabled:
        raise ValueError("dpo.reference=lora_base needs dpo.lora.enabled=true")
    model_path = ctx.resolve(sec.model)
    ref_path = ctx.resolve(sec.ref_model) if sec.ref_model else model_path

    tokenizer = load_tokenizer(model_path)
    rows = load_pairs(ctx.resolve(sec.pairs, model=False), sec.template, tokenizer)
    dataset = Dataset.from_list(rows)

    seed_everything(ctx.seed)  # before the model exists (LoRA init draws random numbers)
    # fp32 weights: bf16 is autocast by the Trainer (`bf16`); pure-bf16 AdamW loses updates of lr ~1e-7 size.
    model = load_causal_lm(model_path, dtype="float32")
    ref_model = None
    # A separate reference is loaded only when one is needed: TRL precomputes from the policy itself when the
    # reference is the starting policy, and uses the adapter-disabled base for LoRA.
    if sec.reference == "loaded" or (sec.reference == "precomputed" and ref_path != model_path):
        ref_model = load_causal_lm(ref_path, dtype="float32")
    peft_config = None
    if sec.lora.enabled:
        from peft import LoraConfig

        targets = sec.lora.target_modules
        peft_config = LoraConfig(
            r=sec.lora.r, lora_alpha=sec.lora.alpha, lora_dropout=sec.lora.dropout, task_type="CAUSAL_LM",
            target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        )

    ckpt_dir = ctx.dir / "checkpoints"
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=build_dpo_config(sec, ckpt_dir, ctx.seed),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[trainer_callback(ctx.tracker)],
    )
    if sec.reference == "precomputed" and trainer.ref_model is not None:
        trainer.ref_model = None  # its log-probs are in the dataset now; free the memory before training
        del ref_model
        gc.collect()

    last = last_checkpoint(ckpt_dir)
    result = trainer.train(resume_from_checkpoint=last)

    out = ctx.dir / "model"
    if trainer.is_deepspeed_enabled:
        if sec.lora.enabled:
            raise ValueError("saving a merged LoRA policy under DeepSpeed is not supported; train without LoRA")
        trainer.save_model(str(out))  # collective under ZeRO-3: every rank gathers its shard
        if ctx.is_main:
            tokenizer.save_pretrained(out)
    elif ctx.is_main:
        policy = trainer.accelerator.unwrap_model(trainer.model)
        if sec.lora.enabled:
            policy = policy.merge_and_unload()
        save_model(policy, tokenizer, out)
    trainer.accelerator.wait_for_everyone()
    logs = [h for h in trainer.state.log_history if "rewards/margins" in h]
    final = logs[-1] if logs else {}
    return {
        "model": str(out),
        "pairs": len(dataset),
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "resumed_from": last,
        **{k: final[k] for k in ("rewards/margins", "rewards/accuracies") if k in final},
    }
