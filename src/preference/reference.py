"""Reference log-probs computed once and kept: one no-grad pass over the pairs, shared out by whole batches over
the processes of a launch (`compute`), stored under `<experiment>/cache/reference/<key>.pt` by the main process
and pointed to by `reference.json` in the stage folder.

The key is everything the numbers depend on: the reference's weights (their hash; for a hub id, the id and its
revision: the commit the local Hugging Face cache resolves it to, else the revision asked for), the pairs file,
tokenizer and template, max_length, the token ids, and what changes their float rounding: the precision (the
accelerator's mixed precision: on the tests' tiny Llama a bf16 and an fp32 pass differ by 2e-3 in summed log-probs
of about -46), the batching layout (layout, batch size, logps_chunk_size) and the attention implementation. A
rerun, a resumed run, a beta sweep, another objective or another stage with the same reference, pairs and settings
loads the file instead of running the reference again (what TRL issue #3985 asks for); a run that differs in any
of them gets its own file (the name is the key's hash). The file carries the SHA-256 of its values, checked on
load: a file that cannot be read, is partial, holds non-finite numbers or values that no longer match that hash
(overwritten in place, a bad disk) is recomputed with a line saying why, never used; a file whose key differs from
this run's is an error that names the fields that differ (only possible when `reference_cache` names a file by
hand, or after a hash collision; a file written by an older prefopt, whose key lacks the newer fields, is refused
the same way).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prefopt.io import content_hash, sha256_file, weights_sha256
from prefopt.preference.batching import collate
from prefopt.training.forward import pair_logps, reads_position_ids


def file_sha256(path) -> str:
    """The pairs file's SHA-256; for pairs that are not one file (a dataset folder, a Hub id, a DatasetSpec), that of
    how they are named: the key's token ids pin their content."""
    if not isinstance(path, (str, Path)) or not Path(path).is_file():
        return content_hash(str(path))
    return sha256_file(path)[:16]


def cache_key(ref_path: str, pairs_file: str, tokenizer, template: str, max_length: int, examples: list[dict], *,
              precision: str, layout: str, batch_size: int, chunk_size: int, attention: str | None) -> dict:
    """What the reference log-probs depend on, as a dict (stored in the file and compared on load).

    precision: the accelerator's mixed precision (`no` is fp32); layout, batch_size, chunk_size: the batches
    `compute` runs (the one-process batches, whatever the number of processes); attention: the reference model's
    attention implementation (`attention_implementation`)."""
    vocab = sorted(tokenizer.get_vocab().items())
    return {
        "reference_weights": weights_sha256(ref_path),
        "revision": hub_revision(ref_path),
        "pairs_file": file_sha256(pairs_file),
        "tokenizer": content_hash(vocab, tokenizer.eos_token, tokenizer.bos_token, type(tokenizer).__name__),
        "template": template,
        "max_length": max_length,
        "token_ids": content_hash([[e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]] for e in examples]),
        "precision": "fp32" if precision in ("no", None) else str(precision),
        "layout": layout,
        "batch_size": batch_size,
        "logps_chunk_size": chunk_size,
        "attention": attention,
    }


def hub_revision(ref_path: str, requested: str = "main") -> str | None:
    """The revision of a hub id: the commit the local Hugging Face cache resolves `requested` to, else `requested`
    (prefopt loads a hub model at its default revision). None for a local folder, whose weights the key hashes."""
    if Path(str(ref_path)).expanduser().is_dir():
        return None
    if re.fullmatch(r"[0-9a-f]{40}", requested):
        return requested
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.file_download import repo_folder_name

    ref = Path(HF_HUB_CACHE) / repo_folder_name(repo_id=str(ref_path), repo_type="model") / "refs" / requested
    try:
        commit = ref.read_text().strip()
    except OSError:
        return requested
    return commit if re.fullmatch(r"[0-9a-f]{40}", commit) else requested


def attention_implementation(model_or_path) -> str | None:
    """The attention implementation a model runs with: a loaded model's own, or, for a path or hub id, the one
    prefopt's loader (models.load_causal_lm) would give it, read from the model built on the meta device (no
    weights are read). None when its config cannot be read here (the reference's loading then says why)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from prefopt.models.loading import attention_kwargs
    from prefopt.training.forward import attention_implementation as implementation_of

    if not isinstance(model_or_path, (str, Path)):
        return implementation_of(model_or_path)
    try:
        config = AutoConfig.from_pretrained(str(model_or_path))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                     **attention_kwargs(str(model_or_path)))
    except Exception:  # noqa: BLE001 - loading the reference reports an unreadable model itself
        return None
    return implementation_of(model)


def key_name(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def compute(model, examples: list[dict], pad_token_id: int, max_length: int, batch_size: int, layout: str,
            chunk_size: int = 0, device=None, accelerator=None, meter=None) -> torch.Tensor:
    """(n, 2) float32: summed log-probs of chosen and rejected for every example, in order, without gradients.

    The batches are those of a one-process run (examples [i*batch_size, (i+1)*batch_size)). With an `accelerator`
    over several processes, batch i is computed by process i % world, so each batch has the same composition (and,
    on one kind of device, the same numbers) as on one process; the rows are gathered onto every process. Every
    process runs the same number of forward passes, because under FSDP, ZeRO-3 and DDP (which broadcasts buffers)
    each forward is collective: a process whose share ran out runs batch 0 again and drops the result. `meter`
    (prefopt.training.throughput.Meter): the pass is timed and counted as its `forward` phase."""
    if not examples:
        return torch.zeros((0, 2))
    world, rank = (accelerator.num_processes, accelerator.process_index) if accelerator is not None else (1, 0)
    masks = not reads_position_ids(model)
    batches = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    rounds = math.ceil(len(batches) / world)
    mine = torch.full((rounds, batch_size, 2), float("nan"))  # this process's batches, rows past a short one NaN
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for r in tqdm(range(rounds), desc="reference log-probs", disable=rank != 0 or rounds < 2):
            b = r * world + rank
            part = [{k: v for k, v in e.items() if k != "ref_logps"} for e in batches[b if b < len(batches) else 0]]
            batch = {k: v.to(device) if device is not None else v
                     for k, v in collate(part, pad_token_id, max_length, layout, masks=masks).items()}
            with meter.timed("forward") if meter is not None else nullcontext():
                sums, _ = pair_logps(model, batch, chunk_size)
            if meter is not None:
                meter.count("forward", batch, meter.params(model)[0], attention=meter.attention(model))
            if b < len(batches):
                mine[r, :len(part)] = torch.stack(sums.float().cpu().chunk(2), dim=1)
    model.train(was_training)
    if world > 1:  # (world * rounds, batch_size, 2): process p's rounds at [p * rounds, (p + 1) * rounds)
        mine = accelerator.gather(mine.to(accelerator.device)).cpu()
    return torch.cat([mine[(b % world) * rounds + b // world, :len(batches[b])] for b in range(len(batches))])


def values_sha256(logps: torch.Tensor) -> str:
    """SHA-256 of the values (float32, row-major) and their shape."""
    t = logps.detach().to(torch.float32).contiguous().cpu()
    return hashlib.sha256(repr(tuple(t.shape)).encode() + t.numpy().tobytes()).hexdigest()


def load(path: Path, key: dict, n: int) -> torch.Tensor | None:
    """The cached (n, 2) tensor, or None when the file is missing, unreadable, partial, not finite or its values
    do not match the hash stored beside them."""
    if not path.exists():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        logps, stored, digest = data["logps"], data["key"], data.get("sha256")
    except Exception as e:  # noqa: BLE001 - any unreadable file is recomputed
        print(f"[prefopt] reference cache {path} unreadable ({type(e).__name__}: {e}); recomputing")
        return None
    if stored != key:
        diff = {k: (stored.get(k), key.get(k)) for k in sorted(set(key) | set(stored)) if stored.get(k) != key.get(k)}
        older = " (a file written by an older prefopt, whose key lacks the newer fields)" if set(key) - set(stored) \
            else ""
        raise ValueError(f"reference cache {path} was made for another key{older}: (stored, this run) differ in "
                         f"{diff}. Delete the file or point `reference_cache` elsewhere.")
    if not isinstance(logps, torch.Tensor) or tuple(logps.shape) != (n, 2) or not torch.isfinite(logps).all():
        print(f"[prefopt] reference cache {path} is partial or corrupt; recomputing")
        return None
    if digest != values_sha256(logps):
        why = "has no content hash (written by an older prefopt)" if digest is None else \
            "holds values that do not match its content hash (changed since it was written)"
        print(f"[prefopt] reference cache {path} {why}; recomputing", flush=True)
        return None
    return logps


def save(path: Path, key: dict, logps: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    from prefopt.runtime.faults import writing

    with writing(tmp):
        torch.save({"key": key, "logps": logps, "sha256": values_sha256(logps)}, tmp)
    os.replace(tmp, path)  # atomic: a killed run leaves no half-written cache under the real name
