"""Finding the checkpoint a TRL Trainer stage resumes from: the newest one whose manifest verifies."""

from __future__ import annotations

import shutil
from pathlib import Path


def last_checkpoint(output_dir, stage: str = "") -> str | None:
    """The newest `checkpoint-N` a stopped Trainer run left whose manifest verifies, or None.

    The Trainer writes checkpoint-N in place; `prefopt.runtime.faults.trainer_callback` records every file's SHA-256 in its
    `manifest.json` after the Trainer has finished it. A checkpoint without one (a kill during the save), or with
    a file that no longer matches it (truncated, overwritten), is removed with a line naming the bad file and the
    previous one is tried (the Trainer keeps `save_total_limit` whole checkpoints, optimizer state included); with
    none left the stage starts over, with a line. The main process decides, the others are told."""
    import torch.distributed as dist

    choice = [None]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        choice[0] = _newest_valid(output_dir, stage)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(choice, src=0)
    return choice[0]


def _newest_valid(output_dir, stage: str) -> str | None:
    ckpts = numbered_folders(Path(output_dir), "checkpoint-")
    return newest_verified(ckpts, stage, Path(output_dir), bool(ckpts))


def numbered_folders(folder: Path, prefix: str) -> list[Path]:
    """The `<prefix>N` folders under `folder`, oldest first."""
    if not folder.is_dir():
        return []
    n = len(prefix)
    return sorted((p for p in folder.glob(prefix + "*") if p.is_dir() and p.name[n:].isdigit()),
                  key=lambda p: int(p.name[n:]))


def newest_verified(candidates: list[Path], stage: str, folder: Path, any_found: bool) -> str | None:
    """The newest of `candidates` whose manifest verifies (`faults.verify_manifest`). A damaged one is removed with
    a line naming the bad file and the previous one is tried; with none left (and `any_found`), a line says the
    stage starts over. Every training stage's resume goes through here."""
    from prefopt.runtime.faults import verify_manifest

    for ck in reversed(candidates):
        bad = verify_manifest(ck)
        if bad is None:
            return str(ck)
        print(f"[prefopt] {stage}: checkpoint {ck} cannot be resumed: {bad}; removed, trying the previous one",
              flush=True)
        shutil.rmtree(ck, ignore_errors=True)
    if any_found:
        print(f"[prefopt] {stage}: no valid checkpoint to resume from in {folder}: starting the stage over", flush=True)
    return None


def decided_by_main(accelerator, pick) -> Path | None:
    """`pick()` on the main process (it may remove folders), its answer broadcast to the others. Collective."""
    choice = [None]
    if accelerator.is_main_process:
        choice[0] = pick()
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(choice)
    return Path(choice[0]) if choice[0] else None
