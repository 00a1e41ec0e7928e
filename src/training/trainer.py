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


def throughput_callback(stage: str, peak_tflops: float = 0.0):
    """A TrainerCallback that meters a Trainer stage's passes as the preference loop's are metered
    (prefopt.training.throughput): a forward pre-hook on the model counts every batch's positions (input_ids) and
    real tokens (the attention mask's sum), training forwards as phase `train` (timed from each optimizer step's
    begin to its end: forward, backward, clipping, the optimizer; not saves, logs or evaluation) and evaluation
    forwards as phase `forward` (each forward timed). At the end of training the perf/* figures, summed over
    processes, are printed in one line and kept in `.figures` for the stage's summary (which the tracker sends to
    W&B's run summary). Each log the Trainer writes gets the window's figures (`Meter.window`); listed before the
    callback that records the logs, it adds them to what that one records."""
    import time

    import torch
    from transformers import TrainerCallback

    from prefopt.training import throughput

    class ThroughputCallback(TrainerCallback):
        figures: dict = {}

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            device = args.device
            self.meter = throughput.start(peak_tflops, device, torch.bfloat16 if args.bf16 else torch.float32,
                                          args.world_size)
            self.n = throughput.param_counts(model)
            self.attention = throughput.attention_shape(model)
            self.hooks = [model.register_forward_pre_hook(self._count, with_kwargs=True),
                          model.register_forward_hook(self._timed_eval)]
            self._t0 = None
            self.gather = _gather(device)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is not None:  # every process logs (the gather is a collective); the main one records
                logs.update(self.meter.window(self.gather))

        def _count(self, module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if not isinstance(ids, torch.Tensor):
                return
            batch = {"input_ids": ids, "attention_mask": kwargs.get("attention_mask"),
                     "position_ids": kwargs.get("position_ids")}
            if module.training:
                self.meter.count("train", batch, *self.n, self.attention)
            else:
                self.meter.count("forward", batch, self.n[0], attention=self.attention)
                self._t0 = time.perf_counter()

        def _timed_eval(self, module, args, output):
            if not module.training and self._t0 is not None:
                if self.meter.sync is not None:
                    self.meter.sync()
                self.meter.phases["forward"].seconds += time.perf_counter() - self._t0
                self._t0 = None

        def on_step_begin(self, args, state, control, **kwargs):
            self._step = self.meter.timed("train")
            self._step.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            self._step.__exit__(None, None, None)

        def on_train_end(self, args, state, control, **kwargs):
            for h in self.hooks:
                h.remove()
            self.figures = self.meter.gathered_summary(self.gather)
            if state.is_world_process_zero:  # the stage's summary takes .figures (W&B's run summary too)
                print(f"[prefopt] {stage}: {throughput.describe(self.figures)}", flush=True)

    return ThroughputCallback()


def _gather(device):
    """`Meter.window`'s and `gathered_summary`'s gather over a torch.distributed group (the Trainer's): every
    process's row; None alone."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None

    def gather(t):
        rows = [torch.empty_like(t, device=device) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, t.to(device))
        return torch.cat(rows).cpu()

    return gather
