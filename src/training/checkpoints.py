"""Finding the checkpoint a TRL Trainer stage resumes from: the newest one whose manifest verifies."""

from __future__ import annotations


def last_checkpoint(output_dir, stage: str = "") -> str | None:
    """The newest `checkpoint-N` a stopped Trainer run left whose manifest verifies, or None.

    The Trainer writes checkpoint-N in place; `prefopt.faults.trainer_callback` records every file's SHA-256 in its
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
    import shutil
    from pathlib import Path

    from prefopt.faults import verify_manifest

    d = Path(output_dir)
    if not d.is_dir():
        return None
    ckpts = sorted((p for p in d.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    for ck in reversed(ckpts):
        bad = verify_manifest(ck)
        if bad is None:
            return str(ck)
        print(f"[prefopt] {stage}: checkpoint {ck} cannot be resumed: {bad}; removed, trying the previous one",
              flush=True)
        shutil.rmtree(ck, ignore_errors=True)
    if ckpts:
        print(f"[prefopt] {stage}: no valid checkpoint to resume from in {d}: starting the stage over", flush=True)
    return None
