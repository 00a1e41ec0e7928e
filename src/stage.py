"""The stage contract: a folder per stage, a fingerprint, a completion marker written last, a summary.

A stage module exposes ``run(ctx: StageContext) -> dict`` (its summary). ``run_stage`` wraps it: makes the folder,
discards outputs left by a different config, starts the tracker, times it, writes ``summary.json`` and finally
``_DONE.json`` (atomically). A finished stage is skipped by the pipeline; an unfinished one resumes from its own
partial outputs (each stage knows how).

Content-addressed: the marker records the fingerprint (config section, seed, input stages' fingerprints), the
size, mtime and SHA-256 of every output the stage wrote, the output digest of each input stage it read, and the
hashes of the files outside the experiment it read (a dataset, a local model). `stage_status` checks all of them
(size + mtime first, the content hash only when those differ) and says which file changed or went missing. Before
a stage reads an input stage's outputs, `verify_inputs` hashes them in full against that stage's marker (a file
damaged in place keeps its size and mtime): a mismatch is a one-line error naming the file.

Inputs hashed when read: the input records the marker keeps are taken just before the stage runs (`read_inputs`),
not when it finishes; if an input changed meanwhile (another experiment rebuilding a folder this one reads), the
stage is not marked done (`check_inputs_unchanged`: a data error naming the file) and its partial outputs are
discarded by the rerun, so a marker never names inputs the stage did not see.

Never destroying finished work: a stage that already has a finished result works in a fresh folder beside it
(`.<stage>.next`) and replaces the finished one by renaming only once its own marker is written; a failure or a
kill leaves the last good result in place (and the rerun resumes in `.next`). A stage with no finished result
works in its own folder, as before, so its partial outputs resume there.
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
from prefopt.data import counts as data_counts
from prefopt.io import sha256_file  # noqa: F401 - also this module's name for it (tests import it here)
from prefopt.experiment import (
    ROUND_STAGES,
    STAGES,
    ExperimentConfig,
    input_stages,
    resolve,
    section,
    replicated_stage,
    stage_dir,
    stage_seed,
)

MARKER = "_DONE.json"
FINGERPRINT = "_FINGERPRINT"
# Not outputs: training checkpoints (resume state, large), W&B and rank notes, the tracker's records (they hold the
# command line and times, so a rerun giving the same outputs would look changed), and the summary (the pipeline
# adds experiment timings to evaluate's after the stage has finished).
UNHASHED = {"checkpoints", "wandb", "_ranks", MARKER, FINGERPRINT, "summary.json", "config.yaml", "metrics.jsonl"}


def atomic_write(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def fingerprint(cfg: ExperimentConfig, stage: str, round_: int = 1) -> str:
    """Hash of the stage's resolved section, its seed (a replicate's for a replicated stage), and its inputs'
    fingerprints."""
    payload = {
        "stage": stage,
        "round": round_,
        "seed": stage_seed(cfg, stage, round_),
        "section": to_dict(section(cfg, stage)),
        "inputs": {f"{n}@{r}": fingerprint(cfg, n, r) for n, r in input_stages(cfg, stage, round_)},
    }
    if stage == "base":
        payload["task"] = to_dict(cfg.task)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_done(cfg: ExperimentConfig, stage: str, round_: int = 1) -> bool:
    return stage_status(cfg, stage, round_)[0]


# ------------------------------------------------------------------------------------------- content hashes


def file_record(path: Path) -> list:
    """[size, mtime_ns, sha256]: the first two are the fast check, the hash the confirmation."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, sha256_file(path)]


def file_changed(path: Path, rec: list) -> str | None:
    """None when `path` still holds what `rec` recorded; else 'is missing' or 'changed'."""
    try:
        st = path.stat()
    except OSError:
        return "is missing"
    if not path.is_file():
        return "is missing"
    if [st.st_size, st.st_mtime_ns] == list(rec[:2]):
        return None
    return None if st.st_size == rec[0] and sha256_file(path) == rec[2] else "changed"


def output_files(d: Path) -> list[Path]:
    """The files a stage wrote into its folder, minus checkpoints, W&B and its own records."""
    out = []
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d)
        if rel.parts[0] in UNHASHED or any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        out.append(p)
    return out


def outputs_digest(outputs: dict[str, list]) -> str:
    return hashlib.sha256(json.dumps(sorted((k, v[2]) for k, v in outputs.items())).encode()).hexdigest()[:16]


def external_inputs(cfg: ExperimentConfig, stage: str) -> list[Path]:
    """Files outside the experiment that the stage's section names (datasets, local models): every file of a
    named folder. Hub ids and `stage:` references are not files here."""
    if stage == "base" and cfg.base.as_named and not Path(cfg.base.model).exists():
        return []
    files: list[Path] = []
    for value in _strings(section(cfg, stage)):
        if value.startswith("stage:") or not ("/" in value or "." in value):
            continue
        p = Path(value)
        try:
            if p.is_file():
                files.append(p.resolve())
            elif p.is_dir():  # hidden files are caches prefopt itself writes there (.weights_sha256), not inputs
                files += [f.resolve() for f in sorted(p.rglob("*"))
                          if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)]
        except OSError:
            continue
    return sorted(set(files))


def _strings(obj: Any) -> list[str]:
    import dataclasses

    if dataclasses.is_dataclass(obj):
        return [s for f in dataclasses.fields(obj) for s in _strings(getattr(obj, f.name))]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _strings(v)]
    return [obj] if isinstance(obj, str) and obj else []


def _fingerprint_file(d: Path) -> str | None:
    try:
        return (d / FINGERPRINT).read_text().strip()
    except OSError:
        return None


def read_marker(d: Path) -> dict | None:
    try:
        m = json.loads((d / MARKER).read_text())
        return m if isinstance(m, dict) and "fingerprint" in m else None
    except (OSError, ValueError):
        return None


def stage_status(cfg: ExperimentConfig, stage: str, round_: int = 1) -> tuple[bool, str]:
    """(done, why): done when the marker's fingerprint, outputs, input stages and input files all still hold;
    else the first thing that does not, in words ("output pairs.jsonl is missing")."""
    d = stage_dir(cfg, stage, round_)
    fp = fingerprint(cfg, stage, round_)
    if not (d / MARKER).exists():
        if not d.exists():
            return False, "not run yet"
        return False, "not finished" + (", resumes" if _fingerprint_file(d) == fp else "")
    m = read_marker(d)
    if m is None:
        return False, f"its marker {d / MARKER} is damaged"
    if m["fingerprint"] != fp:
        resumes = ", resumes its unfinished rerun" if _fingerprint_file(next_dir(d)) == fp else ""
        return False, f"its config (or an input stage's config) changed{resumes}"
    for path, rec in m.get("files_in", {}).items():
        why = file_changed(Path(path), rec)
        if why:
            return False, f"input file {path} {why} since the stage ran"
    for rel, rec in m.get("outputs", {}).items():
        why = file_changed(d / rel, rec)
        if why:
            return False, f"output {d / rel} {why} since the stage finished"
    for key, digest in m.get("stages_in", {}).items():
        name, _, r = key.partition("@")
        if name in cfg.stages:
            ok, why = stage_status(cfg, name, int(r))
            if not ok:
                return False, f"input stage {name} must rerun ({why})"
        up = read_marker(stage_dir(cfg, name, int(r)))
        if up is not None and up.get("outputs_digest", digest) != digest:
            return False, f"input stage {name} was rebuilt since this stage ran"
    return True, "finished, inputs and outputs unchanged"


def verify_inputs(cfg: ExperimentConfig, stage: str, round_: int) -> None:
    """Every output of every finished input stage against the SHA-256 its marker recorded, before `stage` uses it;
    a data error naming the file (and the stage to rerun) when one differs or is gone."""
    from prefopt.data.errors import DataError

    for name, r in input_stages(cfg, stage, round_):
        d = stage_dir(cfg, name, r)
        m = read_marker(d)
        if m is None:
            continue  # not one of this experiment's finished stages: check_inputs speaks for those
        for rel, rec in m.get("outputs", {}).items():
            p = d / rel
            if not p.is_file() or sha256_file(p) != rec[2]:
                how = f"prefopt run {cfg.config_path or 'CONFIG'} --from {name}"
                raise DataError(p, None, None, f"{'is missing' if not p.is_file() else 'does not match'} the "
                                f"SHA-256 that {d / MARKER} recorded when {name} finished (damaged or changed "
                                f"since); rerun {name}: {how}")


def stages_in_digests(cfg: ExperimentConfig, stage: str, round_: int) -> dict[str, str]:
    """{"name@round": outputs_digest} of the finished input stages this stage reads now."""
    out = {}
    for name, r in input_stages(cfg, stage, round_):
        up = read_marker(stage_dir(cfg, name, r))
        if up is not None and "outputs_digest" in up:
            out[f"{name}@{r}"] = up["outputs_digest"]
    return out


def read_inputs(cfg: ExperimentConfig, stage: str, round_: int) -> dict:
    """{"stages_in", "files_in"}: the input stages' output digests and the outside files' records as the stage is
    about to read them (taken before it runs: what the marker records)."""
    return {"stages_in": stages_in_digests(cfg, stage, round_),
            "files_in": {str(p): file_record(p) for p in external_inputs(cfg, stage)}}


def check_inputs_unchanged(cfg: ExperimentConfig, stage: str, round_: int, inputs: dict, d: Path) -> None:
    """Before the marker: every input still as `read_inputs` recorded it (size + mtime, the hash when those
    differ). Else a data error naming the input, and the working folder `d` loses its fingerprint file, so the rerun
    starts the stage over instead of resuming work done on the earlier inputs."""
    from prefopt.data.errors import DataError

    changed = None
    for path, rec in inputs["files_in"].items():
        why = file_changed(Path(path), rec)
        if why:
            changed = (path, f"{'was removed' if why == 'is missing' else 'changed'} while {stage} ran")
            break
    if changed is None:
        now = stages_in_digests(cfg, stage, round_)
        for key, digest in inputs["stages_in"].items():
            if now.get(key) != digest:
                name, _, r = key.partition("@")
                changed = (stage_dir(cfg, name, int(r)), f"input stage {name} was rebuilt while {stage} ran")
                break
    if changed is None:
        return
    (d / FINGERPRINT).unlink(missing_ok=True)
    raise DataError(changed[0], None, None, f"{changed[1]} (another experiment rebuilding it?): {stage} read the "
                    "earlier version, so it is not marked done; rerun once the input is final (the stage starts over)")


def completion_record(cfg: ExperimentConfig, stage: str, round_: int, d: Path, inputs: dict | None = None) -> dict:
    """The marker: fingerprint, output hashes, and the inputs as the stage read them (`read_inputs`; taken now
    when not given): the input stages' output digests, outside input files' hashes."""
    outputs = {str(p.relative_to(d)): file_record(p) for p in output_files(d)}
    inputs = inputs if inputs is not None else read_inputs(cfg, stage, round_)
    return {
        "fingerprint": fingerprint(cfg, stage, round_),
        "finished": time.time(),
        "outputs": outputs,
        "outputs_digest": outputs_digest(outputs),
        "stages_in": inputs["stages_in"],
        "files_in": inputs["files_in"],
    }


# ------------------------------------------------------------------------------------------- working folders


def next_dir(final: Path) -> Path:
    return final.with_name(f".{final.name}.next")


def _old_dir(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def _remove(p: Path) -> None:
    """Delete a folder, or only the link when it is a link (a sweep trial's link to its parent's stage)."""
    if p.is_symlink():
        p.unlink()
    elif p.exists():
        shutil.rmtree(p, ignore_errors=True)


def swap_in(work: Path, final: Path) -> None:
    """Replace the finished folder by the newly finished one: two renames (recover_swap completes a kill between)."""
    if work == final:
        return
    old = _old_dir(final)
    _remove(old)
    if final.exists() or final.is_symlink():
        os.rename(final, old)
    os.rename(work, final)
    _remove(old)


def recover_swap(final: Path) -> None:
    """Finish a swap that a kill interrupted: a completed `.next` wins; else put `.old` back."""
    nxt, old = next_dir(final), _old_dir(final)
    if (nxt / MARKER).exists():
        swap_in(nxt, final)
    elif not final.exists() and (old.exists() or old.is_symlink()):
        os.rename(old, final)
    if final.exists():
        _remove(old)


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
        return stage_seed(self.cfg, self.stage, self.round) + 1000 * (self.round - 1)

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


# Stages that resume file by file (a shard is either there, whole, or not): rerunning a finished one with the same
# config and the same inputs over a damaged result starts from links to its intact outputs, so one deleted shard
# costs one shard.
# Their writers replace files by rename (new inode), so a link never lets a rerun write into the finished result.
RESUMABLE_FILES = {"generate": "shard-*.jsonl", "score": "shard-*.jsonl"}


def _same_inputs(cfg: ExperimentConfig, stage: str, round_: int, m: dict) -> bool:
    """Whether the inputs the marker `m` recorded are still the ones the stage reads: the input stages' output
    digests and the outside files. Same fingerprint is not enough: an upstream stage rebuilt with the same config
    (an outside file it reads changed) gives new candidates that old score shards do not describe."""
    if m.get("stages_in", {}) != stages_in_digests(cfg, stage, round_):
        return False
    files_in = m.get("files_in", {})
    if set(files_in) != {str(p) for p in external_inputs(cfg, stage)}:
        return False
    return all(file_changed(Path(path), rec) is None for path, rec in files_in.items())


def _link_intact_outputs(cfg: ExperimentConfig, stage: str, round_: int, final: Path, work: Path, fp: str) -> None:
    m = read_marker(final)
    if stage not in RESUMABLE_FILES or m is None or m.get("fingerprint") != fp:
        return
    if not _same_inputs(cfg, stage, round_, m):
        return  # the finished shards were made from other inputs: every shard is redone
    for rel, rec in m.get("outputs", {}).items():
        src, dst = final / rel, work / rel
        if Path(rel).match(RESUMABLE_FILES[stage]) and not dst.exists() and file_changed(src, rec) is None:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, dst)


def prepare_dir(cfg: ExperimentConfig, stage: str, round_: int, is_main: bool = True, fresh: bool = False) -> Path:
    """The folder the stage works in: its own when it holds no finished result, else `.<stage>.next` beside it.
    A working folder with outputs of a different config is cleared (they cannot be resumed); a finished one never.
    Non-main ranks call it after the main one, and find the folder it chose by its fingerprint file. `fresh`
    (`prefopt run --from`): nothing is reused from the finished result."""
    final = stage_dir(cfg, stage, round_)
    fp = fingerprint(cfg, stage, round_)
    if not is_main:
        nxt = next_dir(final)
        fp_next = nxt / FINGERPRINT
        return nxt if fp_next.exists() and fp_next.read_text().strip() == fp else final
    recover_swap(final)
    d = next_dir(final) if (final / MARKER).exists() else final
    if d == final and next_dir(final).exists():
        shutil.rmtree(next_dir(final))  # left by a user who deleted the finished marker by hand
    fp_file = d / FINGERPRINT
    if d.exists() and (not fp_file.exists() or fp_file.read_text().strip() != fp):
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / MARKER).unlink(missing_ok=True)
    atomic_write(fp_file, fp + "\n")
    if d != final and not fresh:
        _link_intact_outputs(cfg, stage, round_, final, d, fp)
    return d


def run_stage(cfg: ExperimentConfig, stage: str, round_: int = 1, fresh: bool = False) -> dict:
    """Run one stage in this process (under `accelerate launch`, in every process) and record it. `fresh`: reuse
    nothing of a finished result (`prefopt run --from`)."""
    from prefopt.runtime.tracking import NullTracker, Tracker
    from prefopt.dist.process import dist_barrier, is_main_process, rank, world_size

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    if world_size() > 1:
        from accelerate import PartialState

        import torch

        # starts the process group now, so the barriers below hold across ranks; cpu=True without CUDA, else
        # accelerate makes every CPU process its own single-process run (DistributedType.NO)
        PartialState(cpu=not torch.cuda.is_available())
    main = is_main_process()
    if main:
        verify_inputs(cfg, stage, round_)  # the other ranks wait at the barrier below (and stop if this raises)
    d = prepare_dir(cfg, stage, round_, True, fresh) if main else None
    dist_barrier()
    if not main:  # after the main rank chose (and made) the working folder
        d = prepare_dir(cfg, stage, round_, False)
    extra = {"world_size": world_size()}
    if cfg.replicate_seed is not None and replicated_stage(cfg, stage, round_):
        extra["replicate_seed"] = cfg.replicate_seed  # in config.yaml, the W&B config and the summary
    sec = section(cfg, stage)
    if hasattr(sec, "global_batch"):
        extra["global_batch_size"] = sec.global_batch(extra["world_size"])
    tracker = Tracker.start(cfg, stage, d, round_, extra) if main else NullTracker()
    ctx = StageContext(cfg=cfg, stage=stage, round=round_, dir=d, tracker=tracker, is_main=main)
    module = importlib.import_module(STAGES[stage][0])
    # every process leaves a note, so a multi-process run shows that each rank took part
    (d / "_ranks").mkdir(exist_ok=True)
    write_json(d / "_ranks" / f"rank-{rank()}.json", {"rank": rank(), "pid": os.getpid(), "world_size": extra["world_size"]})
    t0 = time.time()
    inputs = read_inputs(cfg, stage, round_) if main else None  # the inputs as the stage reads them
    data_counts.take()  # counts noted from here on are this stage's
    summary = module.run(ctx) or {}
    summary = {"stage": stage, "round": round_, **summary, "wall_seconds": round(time.time() - t0, 2), **extra}
    counts = data_counts.take()
    if counts:
        summary["counts"] = counts
        if main:
            print(f"[prefopt] {stage}: {data_counts.describe(counts)}", flush=True)
    final = stage_dir(cfg, stage, round_)
    if d != final:  # paths in the summary name where the outputs will be, not the working folder
        summary = json.loads(json.dumps(summary, default=str).replace(json.dumps(str(d))[1:-1],
                                                                      json.dumps(str(final))[1:-1]))
    if main:
        check_inputs_unchanged(cfg, stage, round_, inputs, d)
        write_json(d / "summary.json", summary)
        from prefopt.runtime.tracking import stage_tables

        tracker.log_tables(stage_tables(stage, d, summary))  # pairs, evaluate's table and samples on the W&B page
        tracker.finish(summary)
        write_json(d / MARKER, completion_record(cfg, stage, round_, d, inputs))  # last: the stage is finished
        swap_in(d, final)
    dist_barrier()
    return summary
