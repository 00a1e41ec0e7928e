"""The training loop of every paired-preference objective (the `dpo` and `simpo` stages) and of SFT: plain accelerate.

SFT examples (one prompt and one completion each, the `sft` stage's) take the same path as pairs: batching lays
them out (padded or packed), pair_logps sums each sequence's completion log-probs, and the objective (sft/loss.py)
gets them with the step's completion-token count (`step_token_shares`), the normaliser TRL's SFTTrainer uses.
The reward stage's classifier (`classifier=True`) takes whole texts instead: a sequence classifier's rewards of the
chosen and rejected texts (prefopt.preference.rewards, padded only) go to its Bradley-Terry objective.

    setup   pairs tokenised as TRL does (prefopt.preference.data); the policy in fp32 with dropout off (LoRA via
            PEFT if asked); the reference: precomputed once and cached (reference.py), a frozen copy in memory
            (`loaded`), or the LoRA base with the adapter disabled (`lora_base`); AdamW; a transformers scheduler.
            The precomputed reference runs after `prepare` (each process its share of the batches through the
            prepared, possibly sharded model) and before a resume loads its checkpoint
    loop    per micro-batch: one forward of chosen and rejected (training.forward.pair_logps), the objective (a pure
            function from dpo/loss.py or simpo/loss.py), backward; per optimizer step: clip, step, schedule; log
            every `logging_steps` (ctx.tracker: W&B + metrics.jsonl); every `save_steps` a checkpoint
    save    `checkpoints/checkpoint-<step>/`: a loadable HF model + tokenizer (LoRA merged) for the evaluate stage,
            and in `state/` what a resume needs (weights, optimizer, scheduler, RNG). Each is written in
            `.tmp-checkpoint-<step>/`, its files' SHA-256 recorded in `manifest.json`, then renamed into place; the
            newest two keep their `state/`. A killed run resumes from its newest checkpoint whose manifest verifies
            (an older one, with a line naming the bad file, if the newest is damaged; the stage starts over, with a
            line, if none is) and replays the same batch order. The final policy goes to `model/`.
    stop    SIGTERM / SIGINT / SIGUSR1 (prefopt.runtime.faults): the step in progress finishes, every process agrees on
            the signal at the step's end, a checkpoint of that step is saved, and PreemptedError ends the stage

The batch order is a permutation drawn from (seed, epoch), consecutive slices of which go to the processes, so 2
processes with batch b see what 1 process with batch 2b sees.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from prefopt.runtime import faults
from prefopt.models.loading import (check_lora_mergeable, full_state_dict, load_causal_lm, load_reward_model,
                                    load_tokenizer, place_frozen, save_model)
from prefopt.preference import reference as refcache
from prefopt.models import varlen
from prefopt.preference.batching import collate, num_targets
from prefopt.training.forward import (LayoutError, attention_implementation, check_layout, pair_logps,
                                     reads_position_ids)
from prefopt.preference.data import load_pairs, pairs_path, tokenize_pairs
from prefopt.preference.rewards import PairRewards, collate_texts, pair_rewards
from prefopt.training.checkpoints import decided_by_main, newest_verified, numbered_folders
from prefopt.training import throughput
from prefopt.training.lora import lora_config
from prefopt.dist.process import seed_everything

DONE = "checkpoint_complete"  # written into checkpoint-N after every process has saved its part
TRAIN_STATE = "train_state.json"  # the last logged metrics, so a resumed run's summary still has them
KEEP_STATES = 2  # checkpoints that keep `state/`: the newest, and the one a resume falls back to if it is damaged
REFERENCE_MODES = ("precomputed", "loaded", "lora_base")


@dataclass
class PairLogps:
    """Summed completion log-probs and completion lengths of a batch's chosen and rejected responses, (B,) each."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor

    @classmethod
    def split(cls, sums: torch.Tensor, lengths: torch.Tensor) -> "PairLogps":
        c, r = sums.chunk(2)
        lc, lr = lengths.chunk(2)
        return cls(c, r, lc, lr)


@dataclass
class SequenceLogps:
    """Summed completion log-probs and completion lengths of a batch's SFT sequences, (B,) each, and the completion
    tokens of the whole optimizer step over (processes x accumulation steps): what a token-mean loss divides by."""

    sums: torch.Tensor
    lengths: torch.Tensor
    tokens_per_share: torch.Tensor


# objective(policy, reference or None) -> (loss, metrics); built by each recipe from its pure loss function
Objective = Callable[["PairLogps | SequenceLogps | PairRewards", "PairLogps | None"],
                     "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


def step_token_shares(accelerator, loader, examples, max_length: int, accumulation: int) -> list[torch.Tensor]:
    """For each of this process's micro-batches of the epoch, in order: the completion tokens of its optimizer step
    (all its micro-batches, all processes) / (processes x accumulation steps). transformers' `num_items_in_batch`
    without reading ahead: the epoch's batch indices come from the loader's batch sampler (no collation), and one
    sum over the processes per epoch. Accumulation, not the micro-batches a short last step has, divides: that is
    what `accelerator.backward` divides each micro-batch's loss by."""
    local = [sum(num_targets(examples[j], max_length) for j in idx) for idx in loader.batch_sampler]
    total = accelerator.reduce(torch.tensor(local, dtype=torch.long, device=accelerator.device), "sum").cpu()
    steps = [total[k:k + accumulation].sum() for k in range(0, len(total), accumulation)]
    share = accelerator.num_processes * accumulation
    return [(steps[k // accumulation] / share).float().to(accelerator.device) for k in range(len(total))]


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
    """Dropout makes the chosen and rejected log-probs noisy in different ways; the objectives assume none."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(model.config, name, None), float):
            setattr(model.config, name, 0.0)


def checkpoint_folders(ckpt_dir: Path) -> list[Path]:
    return numbered_folders(ckpt_dir, "checkpoint-")


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    return [p for p in checkpoint_folders(ckpt_dir) if (p / DONE).exists()]


def resumable_checkpoint(accelerator, ckpt_dir: Path, stage: str) -> Path | None:
    """The newest checkpoint whose manifest verifies, model and `state/` (the main process hashes, the others are
    told). A damaged one is removed with a line naming the bad file, and the next older one is tried; with none
    left the stage starts over, with a line, and the unusable folders are removed."""
    return decided_by_main(accelerator, lambda: _newest_valid(ckpt_dir, stage))


def _newest_valid(ckpt_dir: Path, stage: str) -> str | None:
    for tmp in ckpt_dir.glob(".tmp-checkpoint-*"):  # a save a kill cut short
        shutil.rmtree(tmp, ignore_errors=True)
    found = checkpoint_folders(ckpt_dir)
    resumable = [p for p in found if (p / "state").is_dir()]  # older ones keep only their model, by design
    chosen = newest_verified(resumable, stage, ckpt_dir, bool(found))
    if chosen is None:
        for ck in checkpoint_folders(ckpt_dir):
            shutil.rmtree(ck, ignore_errors=True)
    return chosen


def _lora(model, spec, task: str = "CAUSAL_LM"):
    from peft import get_peft_model

    return get_peft_model(model, lora_config(spec, task))


def _precompute_reference(ctx, sec, accelerator, policy, model_path: str, ref_path: str, tokenizer, examples,
                          pairs_file: str, meter=None) -> dict:
    """Reference log-probs for every example, from the cache or computed and cached.

    Called after `prepare` and before `load_state`: `policy` is the prepared model with its starting weights. Every
    process takes its share of the batches through the prepared model (the policy itself when the reference is its
    starting weights; else `ref_model` placed as `_frozen_reference` says), the shares are gathered, and the main
    process writes the file. On a resume the cache is loaded; if it is gone, it is recomputed from the starting
    weights, which are still the policy's here (the checkpoint is loaded after this)."""
    own = ref_path == model_path
    # the attention implementation of the model that would run the pass: the policy's own, or the one `ref_model`
    # would be loaded with (read without loading it: a cache hit never loads the reference)
    attention = refcache.attention_implementation(accelerator.unwrap_model(policy) if own else ref_path)
    key = refcache.cache_key(ref_path, pairs_file, tokenizer, sec.template, sec.max_length, examples,
                             precision=accelerator.mixed_precision, layout=sec.layout,
                             batch_size=sec.per_device_train_batch_size, chunk_size=sec.logps_chunk_size,
                             attention=attention)
    path = Path(getattr(sec, "reference_cache", "") or ctx.cfg.root / "cache" / "reference" /
                f"{refcache.key_name(key)}.pt")
    logps = refcache.load(path, key, len(examples))
    # the pass is collective: it runs unless every process read the file
    found = accelerator.gather(torch.tensor([int(logps is not None)], device=accelerator.device))
    reused = bool(found.all())
    if not reused:
        ref = policy if own else _frozen_reference(accelerator, ref_path, f"{ctx.stage}.ref_model", sec.layout)
        # a LoRA policy's reference is its base: the adapter is off (it starts at zero, so this is exact either way)
        base = accelerator.unwrap_model(policy).disable_adapter() if own and sec.lora.enabled else nullcontext()
        with base, accelerator.autocast():
            logps = refcache.compute(ref, examples, tokenizer.pad_token_id, sec.max_length,
                                     sec.per_device_train_batch_size, sec.layout, sec.logps_chunk_size,
                                     accelerator.device, accelerator=accelerator, meter=meter)
        if accelerator.is_main_process:
            refcache.save(path, key, logps)
        del ref
    accelerator.wait_for_everyone()
    for ex, (c, r) in zip(examples, logps.tolist()):
        ex["ref_logps"] = [c, r]
    info = {"file": str(path), "key": key, "reused": reused}
    if accelerator.is_main_process:
        (ctx.dir / "reference.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _frozen_reference(accelerator, ref_path: str, key: str, layout: str):
    """A `ref_model` other than the policy, for the reference pass, placed as the policy is
    (`models.place_frozen`: sharded under FSDP2 and ZeRO-3, a whole copy otherwise)."""
    ref = load_causal_lm(ref_path, dtype="float32").eval().requires_grad_(False)
    disable_dropout(ref)
    packed_varlen(ref, layout)
    return place_frozen(accelerator, ref, True, key)


def packed_varlen(model, layout: str) -> None:
    """The packed layouts' attention: each sequence of the packed row on its own, a shared prompt's rejected answer
    with its prompt (prefopt.models.varlen), when the model runs SDPA or eager attention; flash attention does the
    packed layout itself from the position ids (and cannot take the shared prompt: check_layout)."""
    if layout in ("packed", "shared_prompt", "prefix_tree") and attention_implementation(model) in varlen.SUPPORTED:
        varlen.use_varlen(model)


def check_same_tokenizer(model_path: str, ref_path: str, tokenizer) -> None:
    if ref_path != model_path and load_tokenizer(ref_path).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"reference {ref_path} does not use the policy's tokenizer ({model_path}): the log-ratios "
                         f"would compare different token sequences")


def train(ctx, objective: Objective, reference: str | None = None, ref_model: str = "", rows: list[dict] | None = None,
          section=None, hook: Callable | None = None, examples: list[dict] | None = None,
          classifier: bool = False) -> dict:
    """Train ctx.section's policy on its pairs with `objective`; reference: None (reference-free) or a mode.

    The reward stage's likelihood reward model reuses this loop with its own `section` (the pair-stage fields),
    `rows` (its train split: rendered prompt, chosen, rejected) and `hook(step, model) -> stop`, called on every
    process after each checkpoint and at the last step (validation selection and early stopping).
    The sft stage passes its tokenized `examples` ({"prompt_ids", "completion_ids"} each) instead of pairs; the
    reward stage's classifier (`classifier=True`) its whole texts ({"chosen_ids", "rejected_ids"}), and the model is
    then a one-output sequence classifier (a new head on the start model) whose objective gets PairRewards.

    From here to the final save, SIGTERM, SIGINT and SIGUSR1 stop training at the end of the current step with a
    checkpoint (prefopt.runtime.faults.PreemptedError); a signal during the final save lets the save finish."""
    with faults.StopSignals(ctx.stage) as signals:
        return _train(ctx, objective, reference, ref_model, rows, section, hook, signals, examples, classifier)


def _train(ctx, objective: Objective, reference: str | None, ref_model: str, rows: list[dict] | None, section,
           hook: Callable | None, signals: faults.StopSignals, examples: list[dict] | None = None,
           classifier: bool = False) -> dict:
    from accelerate import Accelerator

    from transformers import get_scheduler

    sec = section if section is not None else ctx.section
    if reference is not None and reference not in REFERENCE_MODES:
        raise ValueError(f"unknown reference mode {reference!r}; expected one of {', '.join(REFERENCE_MODES)}")
    if reference == "lora_base" and not sec.lora.enabled:
        raise ValueError("reference=lora_base needs lora.enabled=true")
    # cpu=True without CUDA: under `accelerate launch` on a CPU machine accelerate otherwise starts N independent
    # single-process runs instead of one gloo process group.
    accelerator = Accelerator(gradient_accumulation_steps=sec.gradient_accumulation_steps,
                              mixed_precision="bf16" if sec.bf16 else "no", cpu=not torch.cuda.is_available())
    model_path = ctx.resolve(sec.model)
    ref_path = ctx.resolve(ref_model) if ref_model else model_path
    tokenizer = load_tokenizer(model_path)
    if examples is None:
        pairs_file = (pairs_path(sec.pairs, lambda p: ctx.resolve(p, model=False)) if rows is None
                      else "the reward stage's train split")
        if rows is None:
            rows = load_pairs(pairs_file, sec.template, tokenizer)
        examples = tokenize_pairs(rows, tokenizer, sec.max_length, sec.long_prompts)
    else:
        pairs_file = f"the {ctx.stage} stage's examples"
    sequences = bool(examples) and "completion_ids" in examples[0]  # SFT: one completion each, a token-mean loss
    if not examples:
        raise ValueError(f"no usable pairs in {pairs_file} (every prompt fills max_length={sec.max_length}?)")

    seed_everything(ctx.seed)  # before the model exists (LoRA init and a classifier's new head draw random numbers)
    if classifier:  # the head is read at the last token that is not the pad id: the tokenizer's, as scoring pads
        if sec.layout != "padded":
            raise LayoutError(f"{ctx.stage}.layout={sec.layout}: a classifier trains padded only (its head reads "
                              f"one last token per row)")
        model = load_reward_model(model_path, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = load_causal_lm(model_path, dtype="float32")  # fp32 master weights; bf16 only as autocast
    disable_dropout(model)
    # a layout the attention implementation cannot compute exactly is a config error (a family the conformance
    # suite has not checked is a warning, from load_causal_lm)
    check_layout(model, sec.layout, f"{ctx.stage}.layout")
    packed_varlen(model, sec.layout)
    ref_info, frozen_ref = {}, None
    if reference is not None:
        check_same_tokenizer(model_path, ref_path, tokenizer)
    if reference == "loaded":
        frozen_ref = load_causal_lm(ref_path, dtype="float32").eval().requires_grad_(False)
        disable_dropout(frozen_ref)
        packed_varlen(frozen_ref, sec.layout)
        frozen_ref.to(accelerator.device)
    if sec.lora.enabled:
        check_lora_mergeable(accelerator, f"{ctx.stage}.lora.enabled")
        model = _lora(model, sec.lora, "SEQ_CLS" if classifier else "CAUSAL_LM")  # SEQ_CLS: the new head trains
    if sec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        if sec.lora.enabled:
            model.enable_input_require_grads()

    n_params = throughput.param_counts(model)  # (non-embedding, trainable): the FLOPs of a token (throughput.py)
    attention = throughput.attention_shape(model)  # and of its attention's products
    meter = throughput.start(getattr(sec, "peak_tflops", 0.0), accelerator.device,
                             torch.bfloat16 if sec.bf16 else torch.float32, accelerator.num_processes)
    sampler = EpochShuffle(len(examples), ctx.seed)
    collate_fn = (partial(collate_texts, pad_token_id=tokenizer.pad_token_id) if classifier else
                  partial(collate, pad_token_id=tokenizer.pad_token_id, max_length=sec.max_length, layout=sec.layout,
                          masks=not reads_position_ids(model)))
    loader = DataLoader(examples, batch_size=sec.per_device_train_batch_size, sampler=sampler, collate_fn=collate_fn)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: transformers' default (adamw_torch_fused); on CPU torch's default per-tensor loop took 1.7 s a step for
    # 19M parameters (bench/bench_sft.py), as long as the forward and backward
    optimizer = torch.optim.AdamW(params, lr=sec.learning_rate, weight_decay=sec.weight_decay, fused=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if reference == "precomputed":  # here: every process can run the prepared model, and it is still the start
        ref_info = _precompute_reference(ctx, sec, accelerator, model, model_path, ref_path, tokenizer, examples,
                                         pairs_file, meter)

    # Lengths after prepare: per-process micro-batches. The scheduler is stepped by hand once per optimizer step
    # (accelerate's prepared scheduler would step num_processes times per call).
    steps_per_epoch = math.ceil(len(loader) / sec.gradient_accumulation_steps)
    total = sec.max_steps if sec.max_steps > 0 else math.ceil(sec.num_train_epochs * steps_per_epoch)
    scheduler = get_scheduler(sec.lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(sec.warmup_ratio * total),
                              num_training_steps=total)
    accelerator.register_for_checkpointing(scheduler)

    ckpt_dir = ctx.dir / "checkpoints"
    resumed = resumable_checkpoint(accelerator, ckpt_dir, ctx.stage)
    step, last_row = 0, {}
    if resumed is not None:
        accelerator.load_state(str(resumed / "state"))
        step = int(resumed.name[11:])
        last_row = json.loads((resumed / TRAIN_STATE).read_text()).get("last_row", {})
        accelerator.print(f"[prefopt] {ctx.stage}: resumed from {resumed} (step {step})")
    signum = signals.agreed(accelerator.device)
    if signum:  # a signal while loading: nothing new to save
        raise faults.PreemptedError(ctx.stage, step, signum, str(resumed) if resumed is not None else None)

    def reference_logps(batch) -> PairLogps | None:
        if reference is None:
            return None
        if reference == "precomputed":
            c, r = batch["ref_logps"].unbind(1)
            return PairLogps(c, r, None, None)
        with torch.no_grad():
            if reference == "loaded":
                sums, lengths = pair_logps(frozen_ref, batch, sec.logps_chunk_size)
            else:  # the LoRA base: the same weights with the adapter switched off
                inner = accelerator.unwrap_model(model)
                with inner.disable_adapter():
                    sums, lengths = pair_logps(inner, batch, sec.logps_chunk_size)
        return PairLogps.split(sums.detach(), lengths)

    window: dict[str, list[float]] = defaultdict(list)
    gather = throughput.accelerator_gather(accelerator)  # the rows' throughput windows, over every process
    saved_at = step if resumed is not None else -1

    def save(at: int) -> Path:
        nonlocal saved_at
        saved_at = at
        return save_checkpoint(accelerator, model, tokenizer, ckpt_dir, at, sec.save_total_limit, sec.lora.enabled,
                               {"step": at, "last_row": last_row})

    progress = tqdm(total=total, initial=step, desc=ctx.stage, disable=not accelerator.is_main_process)
    model.train()
    meter.mark()  # the metrics rows' throughput windows start with training (not the reference pass)
    while step < total:
        epoch = step // steps_per_epoch
        loader.set_epoch(epoch)
        skip = (step % steps_per_epoch) * sec.gradient_accumulation_steps  # micro-batches done before the kill
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        shares = (step_token_shares(accelerator, loader, examples, sec.max_length, sec.gradient_accumulation_steps)
                  if sequences else None)
        for micro, batch in enumerate(epoch_loader, start=skip):
            with accelerator.accumulate(model), meter.timed("train"):
                with accelerator.autocast():
                    if classifier:
                        policy = pair_rewards(model, batch)
                    else:
                        sums, lengths = pair_logps(model, batch, sec.logps_chunk_size)
                        policy = (SequenceLogps(sums, lengths, shares[micro]) if sequences
                                  else PairLogps.split(sums, lengths))
                    ref = reference_logps(batch)
                loss, metrics = objective(policy, ref)
                accelerator.backward(loss)
                if accelerator.sync_gradients and sec.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), sec.max_grad_norm)
                    window["grad_norm"].append(float(grad_norm))
                optimizer.step()
                optimizer.zero_grad()
            meter.count("train", batch, *n_params, attention)
            if reference in ("loaded", "lora_base"):  # the live reference's forward, in this phase's time
                meter.count_flops("train", batch, frozen_ref if frozen_ref is not None else model)
            values = {"loss": loss.detach(), **metrics}
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
                last_row = {k: sum(v) / len(v) for k, v in window.items()}
                last_row.update(learning_rate=lr, epoch=step / steps_per_epoch)
                ctx.tracker.log({**last_row, **meter.window(gather)}, step=step)  # the window's throughput too
                window.clear()
            if step % sec.save_steps == 0 and step < total:
                save(step)
            if hook is not None and (step % sec.save_steps == 0 or step >= total):
                inner = accelerator.unwrap_model(model)
                counting = inner.register_forward_pre_hook(partial(_count_forward, meter, n_params[0], attention),
                                                           with_kwargs=True)
                with meter.timed("forward"):  # the hook's passes (validation) as phase `forward`
                    stop = hook(step, inner)
                counting.remove()
                inner.train()
                if stop:
                    total = step  # ends both loops; the last checkpoint below is this step's
            if step >= total:
                break
            signum = signals.agreed(accelerator.device)  # every process, once per step: all stop at the same step
            if signum:
                path = save(step) if saved_at != step else ckpt_dir / f"checkpoint-{step}"
                progress.close()
                raise faults.PreemptedError(ctx.stage, step, signum, str(path))
    progress.close()
    # the last step is always saved: a checkpoint for the evaluate stage, and a finished run resumes to no-op
    if saved_at != step:
        save(step)

    perf = meter.gathered_summary(gather)  # into summary.json, and W&B's run summary through the tracker
    accelerator.print(f"[prefopt] {ctx.stage}: {throughput.describe(perf)}", flush=True)
    out_dir = ctx.dir / "model"
    with faults.writing(out_dir):
        save_policy(accelerator, model, tokenizer, out_dir, sec.lora.enabled)
    accelerator.wait_for_everyone()
    counts = ({"examples": len(examples)} if sequences else
              {"pairs": len(examples), "pairs_in": getattr(examples, "stats", {}).get("pairs_in", len(examples))})
    return {**perf, "model": str(out_dir), **counts, "steps": step,
            "resumed_from": str(resumed) if resumed is not None else None,
            **({"reference": reference} if reference else {}),
            **({"reference_cache": ref_info["file"], "reference_reused": ref_info["reused"]} if ref_info else {}),
            **{k: last_row[k] for k in ("loss", "rewards/margins", "rewards/accuracies") if k in last_row}}


def _count_forward(meter, n: int, attention, _module, args, kwargs) -> None:
    """A forward pre-hook: the batch of a forward pass the hook runs, counted as phase `forward`."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(ids, torch.Tensor):
        meter.count("forward", {"input_ids": ids, "attention_mask": kwargs.get("attention_mask"),
                                "position_ids": kwargs.get("position_ids")}, n, attention=attention)


def save_policy(accelerator, model, tokenizer, out_dir: Path, lora: bool) -> None:
    """A loadable HF checkpoint (config + safetensors + tokenizer) of the policy, LoRA merged. Collective under
    DeepSpeed ZeRO-3 and FSDP (every rank gathers its shard), so every process calls it."""
    state = full_state_dict(accelerator, model)
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    if state is not None:
        if lora:  # refused before training (check_lora_mergeable): kept for a caller that did not check
            raise ValueError("saving a merged LoRA policy under DeepSpeed ZeRO-3/FSDP is not supported")
        save_model(unwrapped, tokenizer, out_dir, state_dict=state)
    else:
        save_model(copy.deepcopy(unwrapped).merge_and_unload() if lora else unwrapped, tokenizer, out_dir)


def save_checkpoint(accelerator, model, tokenizer, ckpt_dir: Path, step: int, keep: int, lora: bool,
                    record: dict | None = None) -> Path:
    """checkpoint-<step>/, written as `.tmp-checkpoint-<step>/` and renamed into place once whole: the policy as an
    HF model, `state/` for resuming, `train_state.json` (`record`), the completion marker, and last `manifest.json`
    (every file's size and SHA-256, read back from disk). A kill at any moment leaves the previous checkpoints as
    they were. The newest KEEP_STATES checkpoints keep `state/` (a damaged newest one has a fallback); at most
    `keep` checkpoints stay (0: all), never fewer than KEEP_STATES."""
    path, tmp = ckpt_dir / f"checkpoint-{step}", ckpt_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with faults.writing(tmp):
        save_policy(accelerator, model, tokenizer, tmp, lora)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "state"))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / TRAIN_STATE).write_text(json.dumps(record or {"step": step}) + "\n")
            (tmp / DONE).write_text(str(step))
            faults.write_manifest(tmp)
            if path.exists():  # a damaged or older save of this step (a resume from an earlier one)
                shutil.rmtree(path)
            os.rename(tmp, path)
            complete = complete_checkpoints(ckpt_dir)
            for old in complete[:-KEEP_STATES]:  # a resume needs the newest state, or the one before; models stay
                shutil.rmtree(old / "state", ignore_errors=True)
            for old in complete[:-max(keep, KEEP_STATES)] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path
