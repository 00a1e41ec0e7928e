"""PPO's resumable checkpoints: `checkpoints/iter-N/` written whole (a `.iter-N.partial/` folder, its files' SHA-256
in `manifest.json`, then renamed into place; the latest KEEP_CHECKPOINTS kept), found and verified on resume."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from prefopt.runtime import faults
from prefopt.training.checkpoints import decided_by_main, newest_verified, numbered_folders

KEEP_CHECKPOINTS = 2
TRAINER_STATE = "trainer_state.pt"


def complete_checkpoints(folder: Path) -> list[Path]:
    """The complete `iter-N` folders, oldest first (written under a temporary name and renamed, so complete if
    present; anything else named iter-* is neither resumed from nor pruned)."""
    if not folder.is_dir():
        return []
    done = [p for p in folder.glob("iter-*") if p.name[5:].isdigit() and (p / TRAINER_STATE).exists()]
    return sorted(done, key=lambda p: int(p.name[5:]))


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete `iter-N` folder (not verified: `resumable_checkpoint` hashes it)."""
    done = complete_checkpoints(folder)
    return done[-1] if done else None


def resumable_checkpoint(accelerator, folder: Path) -> Path | None:
    """The newest `iter-N` whose manifest verifies (the main process hashes, the others are told). A damaged one
    is removed with a line naming the bad file and the previous one is tried; with none left the stage starts
    over, with a line. Collective: every process calls it."""
    return decided_by_main(accelerator, lambda: _newest_valid(Path(folder)))


def _newest_valid(folder: Path) -> str | None:
    for tmp in folder.glob(".iter-*.partial") if folder.is_dir() else []:  # a save a kill cut short
        shutil.rmtree(tmp, ignore_errors=True)
    found = numbered_folders(folder, "iter-")
    return newest_verified(found, "ppo", folder, bool(found))


def save_checkpoint(accelerator, folder: Path, iteration: int, policy, kl_ctl, sampler, last_metrics: dict,
                    snapshot_tokenizer=None) -> Path:
    """A resumable checkpoint `iter-N`: `state/` is `accelerator.save_state` (policy, value, both optimizers and
    every process's RNG, sharded or gathered as the DDP / FSDP / DeepSpeed setup saves them), `trainer_state.pt`
    the loop's own state, `manifest.json` (every file's size and SHA-256) last, before the rename. With
    `snapshot_tokenizer`, also a loadable policy `../snapshots/iter-N`. Collective: every process calls it."""
    out, tmp = folder / f"iter-{iteration}", folder / f".iter-{iteration}.partial"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with faults.writing(tmp):
        _write_checkpoint(accelerator, folder, tmp, out, iteration, policy, kl_ctl, sampler, last_metrics,
                          snapshot_tokenizer)
    accelerator.wait_for_everyone()
    return out


def _write_checkpoint(accelerator, folder: Path, tmp: Path, out: Path, iteration: int, policy, kl_ctl, sampler,
                      last_metrics: dict, snapshot_tokenizer) -> None:
    from prefopt.preference.loop import save_policy

    accelerator.save_state(str(tmp / "state"))
    if snapshot_tokenizer is not None:
        snap = folder.parent / "snapshots" / f"iter-{iteration}"
        tmp_snap = snap.with_name(f".{snap.name}.partial")
        save_policy(accelerator, policy, snapshot_tokenizer, tmp_snap, lora=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save({"iteration": iteration, "kl_controller": kl_ctl.state_dict(), "sampler": sampler.state_dict(),
                    "last_metrics": last_metrics, "num_processes": accelerator.num_processes}, tmp / TRAINER_STATE)
        faults.write_manifest(tmp)  # after every process has written its part: what makes the folder trusted
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        for old in complete_checkpoints(folder)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old)
        if snapshot_tokenizer is not None:
            if snap.exists():
                shutil.rmtree(snap)
            os.replace(tmp_snap, snap)


def load_trainer_state(ckpt: Path) -> dict:
    # Our own file: the KL controller, the sampler's position and the last metrics (plain Python values).
    return torch.load(ckpt / TRAINER_STATE, weights_only=False)
