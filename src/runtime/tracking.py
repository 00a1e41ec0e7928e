"""One W&B run per stage, plus a local record in the stage folder that notebooks and tests read.

Local record (always written, by the main process only):
  config.yaml    the resolved experiment config, package versions, global batch size
  metrics.jsonl  one JSON object per logged step: {"step": ..., "<metric>": ...}
  summary.json   the stage's final figures (written by the stage runner)

W&B: project from the config, group = `wandb.group` or the experiment name, job_type = stage. Without an API key
the run is offline and the path to `wandb sync` is printed. Other processes get a tracker that does nothing, so
stage code never branches on rank or on whether W&B is on.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import platform
import re
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from prefopt.config import to_dict

PACKAGES = ["prefopt", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "wandb", "tokenizers", "vllm"]


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def wandb_mode(requested: str) -> str:
    """`auto` -> online with credentials (WANDB_API_KEY or a netrc entry), offline without. WANDB_MODE wins."""
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled", "dryrun"):
        return "offline" if env == "dryrun" else env
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        rc = netrc.netrc()
        if any("wandb" in host for host in rc.hosts):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
    return out


class Tracker:
    """Logs to W&B and to the local record. Create with `Tracker.start(...)`; `NullTracker` on other ranks."""

    active = True

    def __init__(self, run_dir: Path, run, mode: str):
        self.dir = run_dir
        self.run = run
        self.mode = mode
        self._metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")

    @classmethod
    def start(cls, cfg, stage: str, run_dir: Path, round_: int = 1, extra: dict | None = None) -> "Tracker":
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "experiment": to_dict(cfg),
            "stage": stage,
            "round": round_,
            "versions": package_versions(),
            "command": " ".join(sys.argv),
            **(extra or {}),
        }
        (run_dir / "config.yaml").write_text(yaml.safe_dump(record, sort_keys=False, allow_unicode=True))
        mode = wandb_mode(cfg.wandb.mode)
        run = None
        if mode != "disabled":
            import wandb

            name = f"{cfg.name}-{stage}" + (f"-r{round_}" if round_ > 1 else "")
            # Under `wandb agent` the trial process inherits the sweep's run id: only the final evaluate stage
            # (whose summary holds the sweep metric) reports to it; every other stage gets a run of its own.
            agent_run_id = None
            if os.environ.get("WANDB_SWEEP_ID") and stage != "evaluate":
                agent_run_id = os.environ.pop("WANDB_RUN_ID", None)
            run = wandb.init(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity,
                group=cfg.wandb.group or cfg.name,
                job_type=stage,
                name=name,
                tags=list(cfg.wandb.tags) + ([f"round{round_}"] if round_ > 1 else []),
                dir=str(run_dir),
                config={**to_dict(cfg), "_stage": stage, "_round": round_, "_versions": record["versions"],
                        **(extra or {})},
                mode=mode,
                reinit="create_new",
                settings={"silent": True, "console": "off"},
            )
            if agent_run_id is not None:
                os.environ["WANDB_RUN_ID"] = agent_run_id
        return cls(run_dir, run, mode)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        metrics = _clean(metrics)
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_artifact(self, path, name: str, type_: str) -> None:
        """A file, a folder, or a list of files as one W&B artifact (a dataset the stage produced)."""
        if self.run is None:
            return
        import wandb

        art = wandb.Artifact(name=name, type=type_)
        for p in (path if isinstance(path, (list, tuple)) else [path]):
            if Path(p).is_dir():
                art.add_dir(str(p))
            else:
                art.add_file(str(p))
        self.run.log_artifact(art)

    def log_image(self, key: str, path: Path) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))})

    def finish(self, summary: dict[str, Any]) -> None:
        self._metrics.close()
        if self.run is not None:
            self.run.summary.update(_clean(_flatten(summary)))
            run_path = Path(self.run.dir).parent
            self.run.finish()
            if self.mode == "offline":
                # a rerun over a finished result works in `.<stage>.next`, renamed to `<stage>` once finished
                final = re.sub(r"/\.([^/]+)\.next/", r"/\1/", str(run_path) + "/").rstrip("/")
                print(f"[prefopt] W&B offline run saved; upload later with: wandb sync {final}", flush=True)


class NullTracker:
    """What every process but the main one gets: the same calls, no effect."""

    active = False
    run = None

    def log(self, metrics, step=None):
        pass

    def log_artifact(self, path, name, type_):
        pass

    def log_image(self, key, path):
        pass

    def finish(self, summary):
        pass


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trainer_callback(tracker):
    """A transformers TrainerCallback that sends the Trainer's logs to our tracker (one W&B run per stage)."""
    from transformers import TrainerCallback

    class RecordCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                # eval_loss -> eval/loss; everything else keeps TRL's name (loss, rewards/margins, ...)
                tracker.log({("eval/" + k[5:] if k.startswith("eval_") else k): v for k, v in logs.items()},
                            step=state.global_step)

    return RecordCallback()
