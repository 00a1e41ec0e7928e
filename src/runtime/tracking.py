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


# The summary.json figures that say most about each stage: its end line on the console (`prefopt run`) and the
# first figures of its row in `prefopt report`'s stage table.
HEADLINE_FIGURES = {
    "task": ["num_sft", "num_prompts", "num_preferences"],
    "base": ["parameters", "vocab_size", "tokens_learned", "words_added", "held_out_token_ratio"],
    "sft": ["train_loss", "steps"],
    "generate": ["candidates", "finished_fraction", "tokens_per_second"],
    "reward": ["eval/accuracy", "eval/gold_accuracy", "train/steps"],
    "score": ["candidates", "score/mean", "score/std"],
    "pairs": ["pairs", "gold/chosen_better", "margin/mean"],
    "dpo": ["loss", "rewards/accuracies", "rewards/margins", "steps"],
    "simpo": ["loss", "rewards/accuracies", "rewards/margins", "steps"],
    "ppo": ["reward", "kl", "episodes"],
    "self_instruct": ["accepted", "candidates", "acceptance_rate", "rows_written"],
}


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


def offline_process(requested: str) -> None:
    """Make a command whose runs are offline (`wandb.mode: offline`, or `auto` with no credentials) offline for
    W&B as a whole process: WANDB_MODE=offline in its environment, which the stages it launches inherit (a mode
    the environment names wins, as in `wandb_mode`).

    Why: W&B 0.31 decides from its process-wide settings, not the run's, whether to start its OpenTelemetry
    analytics. An offline run still built their exporters and flushed them at exit, ~0.3 s a process (measured:
    1.37 s vs 1.04 s for a process that logs 50 steps), and their probe of the W&B server is a network call that
    an offline cluster does not want. Called by the CLI only, so a library caller's environment is left alone."""
    if wandb_mode(requested) == "offline":
        os.environ["WANDB_MODE"] = "offline"


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

            name = run_name(cfg.name, stage, round_, (extra or {}).get("replicate_seed"))
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
                config={**run_config(to_dict(cfg), stage), "_stage": stage, "_round": round_,
                        "_versions": record["versions"], **(extra or {})},
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

    def log_tables(self, tables: dict[str, tuple[list[str], list[list]]]) -> None:
        """{key: (columns, rows)} as W&B tables (each also a `run_table` artifact of the run)."""
        if self.run is None or not tables:
            return
        import wandb

        try:  # rows read back from JSON may mix types in a column (a curve's step: 25, 50, "final")
            logged = {key: wandb.Table(columns=cols, data=rows, allow_mixed_types=True)
                      for key, (cols, rows) in tables.items()}
            for key, x, y, title in PLOTS:
                if key in logged:
                    logged[f"{y}_vs_{x}"] = wandb.plot.line(logged[key], x, y, stroke="policy", title=title)
            self.run.log(logged)
        except Exception as e:  # noqa: BLE001 - the W&B page must never fail a finished stage
            print(f"WARNING: W&B tables {sorted(tables)} not logged ({type(e).__name__}: {e})", flush=True)

    def log_image(self, key: str, path: Path) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))})

    def finish(self, summary: dict[str, Any]) -> None:
        self._metrics.close()
        if self.run is not None:
            self.run.summary.update(_clean(flatten(summary)))
            run_path = Path(self.run.dir).parent
            self.run.finish()
            if self.mode == "offline":
                # a rerun over a finished result works in `.<stage>.next`, renamed to `<stage>` once finished
                final = re.sub(r"/\.([^/]+)\.next/", r"/\1/", str(run_path) + "/").rstrip("/")
                # untagged: under `prefopt run` it goes to the stage's log, and the run prints one line for all
                print(f"W&B offline run saved; upload later with: wandb sync {final}", flush=True)


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

    def log_tables(self, tables):
        pass

    def finish(self, summary):
        pass


def run_name(experiment: str, stage: str, round_: int = 1, seed: int | None = None) -> str:
    """`quickstart/dpo`, `quickstart/dpo/round2`, `quickstart/dpo/seed43`: the run's name on the W&B page, where the
    experiment's runs share a group and each stage is a job type."""
    return "/".join([experiment, stage] + ([f"round{round_}"] if round_ > 1 else [])
                    + ([f"seed{seed}"] if seed is not None else []))


def run_config(experiment: dict, stage: str) -> dict:
    """The W&B config of a stage's run: the experiment's own fields (name, seed, stages, iterations, launch, ...)
    and the stage's section, not the other stages' sections (config.yaml in the stage folder keeps the whole
    experiment)."""
    return {k: v for k, v in experiment.items() if not isinstance(v, dict) or k == stage or k in EXPERIMENT_SECTIONS}


# Sections of the experiment that are not a stage's: every stage's run carries them.
EXPERIMENT_SECTIONS = ("wandb", "launch")
TABLE_ROWS = 100  # rows of each W&B table: a sample to read, not the dataset (that is the stage's files)


def stage_tables(stage: str, d: Path, summary: dict, max_rows: int = TABLE_ROWS) -> dict[str, tuple[list, list]]:
    """The W&B tables a stage's run shows, from the files it wrote: `pairs` (the first `max_rows` pairs), and
    evaluate's `evaluation` (the final table: a row per policy, each figure and its standard error), `samples`
    (prompt, each policy's response beside the baseline's to the same prompt and sample, their reward-model scores
    and gold, `max_rows` per policy) and `curves` (gold and RM score against KL, drawn as PLOTS)."""
    d = Path(d)
    if stage == "pairs" and (d / "pairs.jsonl").exists():
        cols = ["prompt_id", "prompt", "chosen", "rejected", "chosen_score", "rejected_score", "chosen_len",
                "rejected_len"]
        return {"pairs": (cols, [[r.get(c) for c in cols] for r in _head_jsonl(d / "pairs.jsonl", max_rows)])}
    if stage != "evaluate" or not summary.get("policies"):
        return {}
    policies = summary["policies"]
    figures = sorted({k for figs in policies.values() for k, v in figs.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)})
    out = {"evaluation": (["policy"] + figures, [[name] + [figs.get(k) for k in figures]
                                                 for name, figs in policies.items()])}
    baseline = summary.get("baseline")
    base_path = d / f"samples_{baseline}.jsonl"
    base = {(r["prompt_id"], r.get("sample")): r for r in _head_jsonl(base_path, None)} if base_path.exists() else {}
    cols = ["policy", "prompt_id", "sample", "prompt", "response", "baseline_response", "rm", "baseline_rm", "gold",
            "baseline_gold"]
    rows = []
    for name in policies:
        path = d / f"samples_{name}.jsonl"
        if name == baseline or not path.exists():
            continue
        for r in _head_jsonl(path, max_rows):
            b = base.get((r.get("prompt_id"), r.get("sample")), {})
            rows.append([name, r.get("prompt_id"), r.get("sample"), r.get("prompt"), r.get("response"),
                         b.get("response"), r.get("rm"), b.get("rm"), r.get("gold"), b.get("gold")])
    if rows:
        out["samples"] = (cols, rows)
    # the over-optimisation curves: gold and RM score against KL to SFT for each aligner's checkpoints, and
    # best-of-n from the SFT policy (its step is n), as `prefopt report` draws them
    cols = ["policy", "step", "kl", "kl_se", "gold", "gold_se", "rm", "rm_se"]
    curves = [[name, p.get("step")] + [p.get(c) for c in cols[2:]]
              for name, points in (summary.get("curves") or {}).items() for p in points]
    curves += [["best_of_n", p.get("n")] + [p.get(c) for c in cols[2:]] for p in summary.get("best_of_n") or []]
    if curves:
        out["curves"] = (cols, curves)
    return out


# W&B line plots drawn from a table stage_tables makes: (table, x, y, title), one line per policy
PLOTS = [("curves", "kl", "gold", "gold score against KL to SFT (over-optimisation)"),
         ("curves", "kl", "rm", "reward-model score against KL to SFT")]


def _head_jsonl(path: Path, n: int | None) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if n is not None and len(out) >= n:
                break
            if line.strip():
                out.append(json.loads(line))
    return out


def read_offline_run(run_dir: Path, wait: float = 30.0) -> dict:
    """What an offline W&B run holds, read back from its `run-*.wandb` file (a LevelDB-log of wandb's protobuf
    records; wandb ships no reader): {"name", "group", "job_type", "config", "summary", "tables"}; `tables` maps a
    logged table's key to its {"columns", "data"} (from the run's files/media). For tests and for checking what
    `wandb sync` would upload. wandb's service process may still be writing the file when `run.finish()` has
    returned (seen on wandb 0.31: the header only, for a moment): up to `wait` seconds for the run's exit record."""
    run_dir = Path(run_dir)
    deadline = time.time() + wait
    records = _wandb_records(next(run_dir.glob("run-*.wandb")))
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.time() < deadline:
        time.sleep(0.1)
        records = _wandb_records(next(run_dir.glob("run-*.wandb")))
    out: dict = {"config": {}, "summary": {}, "tables": {}}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(name=rec.run.display_name, group=rec.run.run_group, job_type=rec.run.job_type)
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":  # a later update; a nested one (a chart's spec) keyed by its path, `a/b/c`
            out["config"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                  for i in rec.config.update})
        elif kind == "summary":
            for i in rec.summary.update:
                key = i.key or "/".join(i.nested_key)
                out["summary"][key] = json.loads(i.value_json)
    for f in sorted(run_dir.glob("files/media/table/**/*.table.json")):
        key = str(f.relative_to(run_dir / "files" / "media" / "table")).rsplit("_", 2)[0]
        out["tables"][key] = json.loads(f.read_text())
    return out


def _wandb_records(path: Path) -> list:
    """The protobuf records of a `.wandb` file: LevelDB's log format (32 KiB blocks of chunks, each
    crc32 | length | type; a record is one FULL chunk or FIRST, MIDDLE..., LAST) after a 7-byte file header."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    records, buf, pos, block = [], b"", 7, 32768  # 7: the file's own header (":W&B", magic, version)
    while pos + 7 <= len(data):
        left = block - pos % block
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (n == 0 and kind == 0):  # the rest of a block is padding
            pos += left
            continue
        if pos + 7 + n > len(data):  # a chunk still being written
            break
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a whole record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
            buf = b""
    return records


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a/b": 1}: the W&B run summary's naming (analysis.runs reads summaries with it too)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
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
