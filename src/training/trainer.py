"""The TrainingArguments the TRL Trainer stages (sft, the classifier reward model) set explicitly."""

from __future__ import annotations

from prefopt.training.fields import TrainFields


def hf_training_kwargs(sec: TrainFields, output_dir, seed: int) -> dict:
    """The transformers/TRL TrainingArguments every training stage sets explicitly (TRL's own defaults differ:
    gradient checkpointing on, bf16 on, max_length 1024, report_to wandb in some versions)."""
    import dataclasses

    import torch
    import transformers

    names = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    # transformers 5.18+ dropped `warmup_ratio`; a float in [0, 1) for `warmup_steps` is the ratio there.
    warmup = {"warmup_ratio": sec.warmup_ratio} if "warmup_ratio" in names else {"warmup_steps": sec.warmup_ratio}
    # ...and renamed gradient_checkpointing to activation_checkpointing (the old name warns).
    ckpt = ({"activation_checkpointing": sec.gradient_checkpointing} if "activation_checkpointing" in names
            else {"gradient_checkpointing": sec.gradient_checkpointing})
    return dict(
        **warmup,
        **ckpt,
        output_dir=str(output_dir),
        learning_rate=sec.learning_rate,
        num_train_epochs=sec.num_train_epochs,
        max_steps=sec.max_steps,
        per_device_train_batch_size=sec.per_device_train_batch_size,
        per_device_eval_batch_size=sec.per_device_train_batch_size,
        gradient_accumulation_steps=sec.gradient_accumulation_steps,
        lr_scheduler_type=sec.lr_scheduler_type,
        weight_decay=sec.weight_decay,
        max_grad_norm=sec.max_grad_norm,
        max_length=sec.max_length,
        bf16=sec.bf16,
        logging_steps=sec.logging_steps,
        save_strategy="steps",
        save_steps=sec.save_steps,
        save_total_limit=sec.save_total_limit,
        seed=seed,
        data_seed=seed,
        report_to="none",  # prefopt's tracker is the one W&B run of the stage (tracking.trainer_callback)
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
        dataloader_num_workers=0,
    )
