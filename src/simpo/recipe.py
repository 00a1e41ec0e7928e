"""The `simpo` stage: SimPO (Meng et al. 2024) in a plain accelerate loop (TRL's SimPO is only experimental).

    prefopt simpo experiments/quickstart.yaml
    accelerate launch --config_file experiments/accelerate/deepspeed_zero3.yaml -m prefopt simpo CONFIG

Setup: pairs tokenised as prompt + completion + EOS (prefopt.preference_data, the same tokens TRL's DPO sees), the
policy with dropout off, AdamW, a transformers scheduler. Loop: chosen and rejected in one forward pass, average
log-prob per completion token, simpo_loss; clip, step; log every `logging_steps`; checkpoint every `save_steps`
(model, optimizer, scheduler, RNG via accelerator.save_state into checkpoints/step-N). A killed run resumes from
its last complete checkpoint and replays the same batch order. Save: the final policy to `<stage>/model`.
"""

from __future__ import annotations

import math
import shutil
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from prefopt.logps import sequence_logps
from prefopt.models import load_causal_lm, load_tokenizer, save_model
from prefopt.preference_data import collate_pairs, load_pairs, tokenize_pairs
from prefopt.simpo.loss import simpo_loss
from prefopt.utils import seed_everything

DONE = "checkpoint_complete"  # written into a step-N folder after every process has saved its part


class EpochShuffle(Sampler):
    """A permutation drawn from (seed, epoch): every process and every resumed run sees the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n


def disable_dropout(model) -> None:
    """Dropout makes the chosen and rejected log-probs noisy in different ways; the objective assumes none."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(model.config, name, None), float):
            setattr(model.config, name, 0.0)


def pair_forward(model, batch) -> dict[str, torch.Tensor]:
    """Average completion log-prob of chosen and rejected (B,) each, and their lengths, from one (2B, T) pass."""
    sums, lengths = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    avg = sums / lengths.clamp(min=1)
    b = avg.shape[0] // 2
    return {"chosen": avg[:b], "rejected": avg[b:], "len_chosen": lengths[:b], "len_rejected": lengths[b:]}


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    found = [p for p in ckpt_dir.glob("step-*") if (p / DONE).exists() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def run(ctx) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from transformers import get_scheduler

    sec = ctx.section
    # cpu=True without CUDA: under `accelerate launch` on a CPU machine accelerate otherwise starts N independent
    # single-process runs instead of one gloo process group.
    accelerator = Accelerator(gradient_accumulation_steps=sec.gradient_accumulation_steps,
                              mixed_precision="bf16" if sec.bf16 else "no", cpu=not torch.cuda.is_available())
    model_path = ctx.resolve(sec.model)
    tokenizer = load_tokenizer(model_path)
    rows = load_pairs(ctx.resolve(sec.pairs, model=False), sec.template, tokenizer)
    examples = tokenize_pairs(rows, tokenizer, sec.max_length)

    seed_everything(ctx.seed)
    model = load_causal_lm(model_path, dtype="float32")  # fp32 master weights; bf16 only as autocast
    disable_dropout(model)
    if sec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    sampler = EpochShuffle(len(examples), ctx.seed)
    loader = DataLoader(examples, batch_size=sec.per_device_train_batch_size, sampler=sampler,
                        collate_fn=partial(collate_pairs, pad_token_id=tokenizer.pad_token_id,
                                           max_length=sec.max_length))
    optimizer = torch.optim.AdamW(model.parameters(), lr=sec.learning_rate, weight_decay=sec.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    # Lengths after prepare: per-process micro-batches. The scheduler is stepped by hand once per optimizer step
    # (accelerate's prepared scheduler would step num_processes times per call).
    steps_per_epoch = math.ceil(len(loader) / sec.gradient_accumulation_steps)
    total = sec.max_steps if sec.max_steps > 0 else math.ceil(sec.num_train_epochs * steps_per_epoch)
    scheduler = get_scheduler(sec.lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(sec.warmup_ratio * total),
                              num_training_steps=total)
    accelerator.register_for_checkpointing(scheduler)

    ckpt_dir = ctx.dir / "checkpoints"
    done = complete_checkpoints(ckpt_dir)
    step = 0
    if done:
        accelerator.load_state(str(done[-1]))
        step = int(done[-1].name[5:])
        accelerator.print(f"[prefopt] simpo: resumed from {done[-1]} (step {step})")

    window: dict[str, list[float]] = defaultdict(list)
    progress = tqdm(total=total, initial=step, desc="simpo", disable=not accelerator.is_main_process)
    model.train()
    while step < total:
        epoch = step // steps_per_epoch
        loader.set_epoch(epoch)
        skip = (step % steps_per_epoch) * sec.gradient_accumulation_steps  # micro-batches done before the kill
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in epoch_loader:
            with accelerator.accumulate(model):
                out = pair_forward(model, batch)
                loss, metrics = simpo_loss(out["chosen"], out["rejected"], sec.beta, sec.gamma_beta_ratio,
                                           sec.sft_weight, chosen_nll=-out["chosen"])
                accelerator.backward(loss)
                if accelerator.sync_gradients and sec.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), sec.max_grad_norm)
                    window["grad_norm"].append(float(grad_norm))
                optimizer.step()
                optimizer.zero_grad()
            values = {"loss": loss.detach(), **metrics, "length/chosen": out["len_chosen"].mean(),
                      "length/rejected": out["len_rejected"].mean()}
            gathered = accelerator.gather(torch.stack([v.float() for v in values.values()]).unsqueeze(0))
            for k, v in zip(values, gathered.mean(0).tolist()):
                window[k].append(v)
            if not accelerator.sync_gradients:
                continue
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            step += 1
            progress.update(1)
            if step % sec.logging_steps == 0 or step == total:
                row = {k: sum(v) / len(v) for k, v in window.items()}
                row.update(learning_rate=lr, epoch=step / steps_per_epoch)
                ctx.tracker.log(row, step=step)
                window.clear()
            if step % sec.save_steps == 0 or step == total:
                save_checkpoint(accelerator, ckpt_dir, step, sec.save_total_limit)
            if step >= total:
                break
    progress.close()

    out_dir = ctx.dir / "model"
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        state = accelerator.get_state_dict(model)  # collective: gathers ZeRO-3 shards
        unwrapped.save_pretrained(out_dir, is_main_process=accelerator.is_main_process, state_dict=state,
                                  save_function=accelerator.save, safe_serialization=True)
        if accelerator.is_main_process:
            tokenizer.save_pretrained(out_dir)
    elif accelerator.is_main_process:
        save_model(unwrapped, tokenizer, out_dir)
    accelerator.wait_for_everyone()
    return {"model": str(out_dir), "pairs": len(examples), "steps": step,
            "resumed_from": str(done[-1]) if done else None}


def save_checkpoint(accelerator, ckpt_dir: Path, step: int, keep: int) -> None:
    path = ckpt_dir / f"step-{step}"
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (path / DONE).write_text(str(step))
        for old in complete_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
