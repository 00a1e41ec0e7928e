"""The stage contract: a folder per stage, a fingerprint, a completion marker written last, a summary.

A stage module exposes ``run(ctx: StageContext) -> dict`` (its summary). ``run_stage`` wraps it: makes the folder,
discards outputs left by a different config, starts the tracker, times it, writes ``summary.json`` and finally
``_DONE.json`` (atomically) with the fingerprint. A finished stage whose fingerprint is unchanged is skipped by
the pipeline; an unfinished one resumes from its own partial outputs (each stage knows how).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefopt.config import to_dict
from prefopt.experiment import (
    ROUND_STAGES,
    STAGES,
    ExperimentConfig,
    resolve,
    section,
    stage_dir,
    stage_inputs,
)

MARKER = "_DONE.json"
FINGERPRINT = "_FINGERPRINT"


def atomic_write(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def input_stages(cfg: ExperimentConfig, stage: str, round_: int) -> list[tuple[str, int]]:
    """(stage, round) pairs this stage reads; round k > 1 generation reads round k-1's aligned policy."""
    out = []
    for name in stage_inputs(cfg, stage):
        r = round_ if name in ROUND_STAGES else 1
        if round_ > 1 and stage in ROUND_STAGES and stage != "evaluate" and name == "sft":
            name, r = cfg.iterate_policy, round_ - 1
        out.append((name, r))
    return out


def fingerprint(cfg: ExperimentConfig, stage: str, round_: int = 1) -> str:
    """Hash of the stage's resolved section, the experiment seed, and its inputs' fingerprints."""
    payload = {
        "stage": stage,
        "round": round_,
        "seed": cfg.seed,
        "section": to_dict(section(cfg, stage)),
        "inputs": {f"{n}@{r}": fingerprint(cfg, n, r) for n, r in input_stages(cfg, stage, round_)},
    }
    if stage == "base":
        payload["task"] = to_dict(cfg.task)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_done(cfg: ExperimentConfig, stage: str, round_: int = 1) -> bool:
    marker = stage_dir(cfg, stage, round_) / MARKER
    if not marker.exists():
        return False
    try:
        return json.loads(marker.read_text())["fingerprint"] == fingerprint(cfg, stage, round_)
    except (ValueError, KeyError):
        return False


@dataclass
class StageContext:
    cfg: ExperimentConfig
    stage: str
    round: int
    dir: Path
    tracker: Any
    is_main: bool = True

    @property
    def section(self):
        return section(self.cfg, self.stage)

    @property
    def seed(self) -> int:
        return self.cfg.seed + 1000 * (self.round - 1)

    def resolve(self, value: str, model: bool = True) -> str:
        """A config value -> path. In round k > 1 the loop's starting policy (`stage:sft`) becomes round k-1's
        aligned policy for generation and the aligners; evaluation keeps the real SFT as its baseline."""
        if not isinstance(value, str) or not value.startswith("stage:"):
            return value
        name = value[len("stage:"):].split("/", 1)[0]
        if self.round > 1 and self.stage in ROUND_STAGES and self.stage != "evaluate" and value == "stage:sft":
            return resolve(self.cfg, f"stage:{self.cfg.iterate_policy}", self.round - 1, model=model)
        r = self.round if name in ROUND_STAGES else 1
        return resolve(self.cfg, value, r, model=model)


def prepare_dir(cfg: ExperimentConfig, stage: str, round_: int, is_main: bool = True) -> Path:
    """Make the stage folder; if it holds outputs of a different config, clear it (they cannot be resumed)."""
    d = stage_dir(cfg, stage, round_)
    fp = fingerprint(cfg, stage, round_)
    if is_main:
        fp_file = d / FINGERPRINT
        if d.exists() and (not fp_file.exists() or fp_file.read_text().strip() != fp):
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        (d / MARKER).unlink(missing_ok=True)
        atomic_write(fp_file, fp + "\n")
    return d


def run_stage(cfg: ExperimentConfig, stage: str, round_: int = 1) -> dict:
    """Run one stage in this process (under `accelerate launch`, in every process) and record it."""
    from prefopt.tracking import NullTracker, Tracker
    from prefopt.utils import dist_barrier, is_main_process

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        import torch

        # starts the process group now, so the barriers below hold across ranks; cpu=True without CUDA, else
        # accelerate makes every CPU process its own single-process run (DistributedType.NO)
        PartialState(cpu=not torch.cuda.is_available())
    main = is_main_process()
    d = prepare_dir(cfg, stage, round_, main)
    dist_barrier()
    extra = {"world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    sec = section(cfg, stage)
    if hasattr(sec, "global_batch"):
        extra["global_batch_size"] = sec.global_batch(extra["world_size"])
    tracker = Tracker.start(cfg, stage, d, round_, extra) if main else NullTracker()
    ctx = StageContext(cfg=cfg, stage=stage, round=round_, dir=d, tracker=tracker, is_main=main)
    module = importlib.import_module(STAGES[stage][0])
    # every process leaves a note, so a multi-process run shows that each rank took part
    rank = int(os.environ.get("RANK", "0"))
    (d / "_ranks").mkdir(exist_ok=True)
    write_json(d / "_ranks" / f"rank-{rank}.json", {"rank": rank, "pid": os.getpid(), "world_size": extra["world_size"]})
    t0 = time.time()
    summary = module.run(ctx) or {}
    summary = {"stage": stage, "round": round_, **summary, "wall_seconds": round(time.time() - t0, 2), **extra}
    if main:
        write_json(d / "summary.json", summary)
        tracker.finish(summary)
        write_json(d / MARKER, {"fingerprint": fingerprint(cfg, stage, round_), "finished": time.time()})
    dist_barrier()
    return summary
