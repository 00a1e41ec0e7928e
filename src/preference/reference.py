"""Reference log-probs computed once and kept: one no-grad pass over the pairs, shared out by whole batches over
the processes of a launch (`compute`), stored under `<experiment>/cache/reference/<key>.pt` by the main process
and pointed to by `reference.json` in the stage folder.

The key is (reference weights hash, pairs file hash, tokenizer and template, max_length, token ids): a rerun, a
resumed run, a beta sweep, another objective or another stage with the same reference and pairs loads the file
instead of running the reference again (what TRL issue #3985 asks for). The file carries the SHA-256 of its
values, checked on load: a file that cannot be read, is partial, holds non-finite numbers or values that no longer
match that hash (overwritten in place, a bad disk) is recomputed with a line saying why, never used; a file whose
key differs from this run's is an error that names both (only possible when `reference_cache` names a file by
hand, or after a hash collision).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prefopt.preference.batching import collate, pair_logps
from prefopt.io import content_hash, weights_sha256


def file_sha256(path) -> str:
    """The pairs file's SHA-256; for pairs that are not one file (a dataset folder, a Hub id, a DatasetSpec), that of
    how they are named: the key's token ids pin their content."""
    if not isinstance(path, (str, Path)) or not Path(path).is_file():
        return content_hash(str(path))
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def cache_key(ref_path: str, pairs_file: str, tokenizer, template: str, max_length: int, examples: list[dict]) -> dict:
    """What the reference log-probs depend on, as a dict (stored in the file and compared on load)."""
    vocab = sorted(tokenizer.get_vocab().items())
    return {
        "reference_weights": weights_sha256(ref_path),
        "pairs_file": file_sha256(pairs_file),
        "tokenizer": content_hash(vocab, tokenizer.eos_token, tokenizer.bos_token, type(tokenizer).__name__),
        "template": template,
        "max_length": max_length,
        "token_ids": content_hash([[e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]] for e in examples]),
    }


def key_name(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def compute(model, examples: list[dict], pad_token_id: int, max_length: int, batch_size: int, layout: str,
            chunk_size: int = 0, device=None, accelerator=None) -> torch.Tensor:
    """(n, 2) float32: summed log-probs of chosen and rejected for every example, in order, without gradients.

    The batches are those of a one-process run (examples [i*batch_size, (i+1)*batch_size)). With an `accelerator`
    over several processes, batch i is computed by process i % world, so each batch has the same composition (and,
    on one kind of device, the same numbers) as on one process; the rows are gathered onto every process. Every
    process runs the same number of forward passes, because under FSDP, ZeRO-3 and DDP (which broadcasts buffers)
    each forward is collective: a process whose share ran out runs batch 0 again and drops the result."""
    if not examples:
        return torch.zeros((0, 2))
    world, rank = (accelerator.num_processes, accelerator.process_index) if accelerator is not None else (1, 0)
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
                     for k, v in collate(part, pad_token_id, max_length, layout).items()}
            sums, _ = pair_logps(model, batch, chunk_size)
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
        diff = {k: (stored.get(k), v) for k, v in key.items() if stored.get(k) != v}
        raise ValueError(f"reference cache {path} was made for another key: (stored, this run) differ in {diff}. "
                         f"Delete the file or point `reference_cache` elsewhere.")
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
    from prefopt.faults import writing

    with writing(tmp):
        torch.save({"key": key, "logps": logps, "sha256": values_sha256(logps)}, tmp)
    os.replace(tmp, path)  # atomic: a killed run leaves no half-written cache under the real name
