"""Faults a cluster run meets, each ended in one line: preemption, a full disk, out of memory, a lost peer process.

Preemption. Slurm sends SIGTERM (or, with `--signal`, USR1) and SIGKILL after its grace time (KillWait, 30 s by
default). A training stage holds `StopSignals` while it trains: a signal only sets a flag, the current optimizer
step finishes, every process of the launch agrees on the flag (`agreed`, an all-reduce of the signal number each
step, so a signal that reached one process stops them all at the same step), a complete checkpoint is written and
the stage raises `PreemptedError` (exit code 143): `prefopt: dpo preempted at step 7 (signal SIGTERM);
checkpoint-7 saved; rerun the same command to resume`. At most one step is lost.

Work in shards (generation): `ShardSignals` lets a signal abandon the shard being sampled at once (`ShardDropped`;
shards are written by rename, so nothing of it is on disk) or, between shards, stop before the next; the stage
raises `ShardsPreempted` (exit code 143): `prefopt: generate preempted (signal SIGTERM); 3 of 8 shards written, the
one in progress dropped; rerun the same command to resume at shard 3`. Its worker processes get the signal too.
Scoring does the same with the shard being scored. A stage that keeps no partial results (evaluation) is one piece
of work: a signal drops it at once and the stage raises `StagePreempted` (exit code 143); the rerun starts it over.

Checkpoints that prove themselves (`write_manifest`, `verify_manifest`): a checkpoint folder records the SHA-256 of
each of its files in `manifest.json`, written last; a resume verifies it and falls back to an older one.

Resources (`ResourceError`, exit code 6): a full disk (`writing` names the path being written), host or GPU out of
memory and a lost peer process (`describe`) are one line naming the cause and what to do; the traceback goes to
the stage's log file (`log_traceback`), not the console.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from prefopt.io import sha256_file
from prefopt.dist.process import rank as dist_rank, world_size

PREEMPTED_EXIT = 143  # 128 + SIGTERM: what a shell reports for a process SIGTERM ended; here, after a checkpoint
RESOURCE_EXIT = 6
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
MANIFEST = "manifest.json"


class PreemptedError(Exception):
    """A signal stopped a training stage after it saved a checkpoint (or before its first step)."""

    exit_code = PREEMPTED_EXIT
    kind = ""  # the message is the whole line

    def __init__(self, stage: str, step: int | None, signum: int, checkpoint: str | None):
        self.stage, self.step, self.signum, self.checkpoint = stage, step, signum, checkpoint
        if step is None:  # `prefopt run` between stages: `stage` had just finished
            super().__init__(f"run preempted after {stage} finished (signal {signal_name(signum)}); rerun the same "
                             "command to continue with the next stage")
            return
        saved = (f"{Path(checkpoint).name} saved; rerun the same command to resume" if checkpoint else
                 "no step done yet, nothing to save; rerun the same command to start it")
        super().__init__(f"{stage} preempted at step {step} (signal {signal_name(signum)}); {saved}")


class ShardsPreempted(PreemptedError):
    """A signal stopped a stage that works in shards; the shards written are kept, a rerun does the others."""

    def __init__(self, stage: str, signum: int, written: int, total: int, dropped: bool, next_shard: int | None):
        self.stage, self.step, self.signum, self.checkpoint = stage, None, signum, None
        self.written, self.total = written, total
        lost = ", the one in progress dropped" if dropped else ""
        where = f" at shard {next_shard}" if next_shard is not None else ""
        Exception.__init__(self, f"{stage} preempted (signal {signal_name(signum)}); {written} of {total} shards "
                                 f"written{lost}; rerun the same command to resume{where}")


class StagePreempted(PreemptedError):
    """A signal stopped a stage that keeps no partial results (evaluate): it is not marked done, the rerun starts
    it over."""

    def __init__(self, stage: str, signum: int):
        self.stage, self.step, self.signum, self.checkpoint = stage, None, signum, None
        Exception.__init__(self, f"{stage} preempted (signal {signal_name(signum)}); it keeps no partial results, so "
                                 "it is not marked done; rerun the same command to start it over")


class ShardDropped(BaseException):
    """Raised by `ShardSignals` where a shard was being sampled: that shard is abandoned. A BaseException, as
    KeyboardInterrupt is, so that no `except Exception` on the way (a loader's fallback, a reward function's error
    report) takes it for an error of its own and carries on or reports something else."""


class ResourceError(Exception):
    """Out of disk, memory or a peer process: one line with what to do."""

    exit_code = RESOURCE_EXIT
    kind = "resource error"


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def error_line(text: str) -> None:
    """`text` and its newline to stderr in one write. Every rank of a launch reports its error (and a signal's
    notice) into one pipe; torchrun starts the ranks with `python -u`, where `print` writes the text and the newline
    in two calls, and two ranks' lines interleaved into one ("...resumeprefopt: ...", seen in CI). One write of
    under PIPE_BUF bytes reaches the pipe whole."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


class StopSignals:
    """While held (`with StopSignals(): ...`), SIGTERM, SIGINT and SIGUSR1 set `signum` instead of ending the
    process; the previous handlers come back on exit. A second SIGINT more than 2 s after the first is a
    KeyboardInterrupt (a user who presses Ctrl-C twice means it); repeated SIGTERMs are not (Slurm, the launcher and
    `prefopt run` may each pass the same one on)."""

    notice = "finishing this step, then saving a checkpoint"

    def __init__(self, stage: str = ""):
        self.stage, self.signum, self.t, self._old = stage, 0, 0.0, {}

    def _handle(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT and time.monotonic() - self.t > 2:
            raise KeyboardInterrupt
        if not self.signum:
            self.signum, self.t = signum, time.monotonic()
            error_line(f"\n[prefopt] {self.stage}: {signal_name(signum)} received: {self.notice}")

    def __enter__(self) -> "StopSignals":
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On the way out with an error (a lost peer, a full disk, this preemption), a signal must not cut the
        # one-line report short: torchrun's agent SIGTERMs the survivors of a dead worker at about the moment they
        # fail. For REPORT_GRACE seconds, or until the CLI has reported (`reported`), signals wait; then the old
        # handlers come back (a caller in the same process, a test, gets them back by itself).
        if exc_type is not None:
            _held.update(self._old)  # nested: the outermost exits last, so its (the original) handlers stay
            _held_since[0] = time.monotonic()
        for s, old in self._old.items():
            signal.signal(s, _after_error if exc_type is not None else old)
        self._old = {}

    def agreed(self, device=None) -> int:
        """The signal number every process of the launch now acts on (0: none): the largest any process holds.
        Collective when a process group is up: every process calls it at the same point of each step."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.signum
        import torch

        t = torch.tensor([self.signum], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


def handled(signals: type[StopSignals]):
    """A stage's `run(ctx, signals)` as the stage runner calls it, `run(ctx)`, with `signals` (StopSignals: stop at
    a step's end with a checkpoint; ShardSignals: drop the shard in progress) held from its first line to its
    return: a signal during the final save lets the save finish.

        @faults.handled(faults.ShardSignals)
        def run(ctx, signals) -> dict: ..."""
    import functools

    def wrap(run):
        @functools.wraps(run)
        def staged(ctx):
            with signals(ctx.stage) as held:
                return run(ctx, held)
        return staged
    return wrap


class ShardSignals(StopSignals):
    """StopSignals for work in shards. Inside `sampling()` a signal raises ShardDropped at once: the shard being
    sampled is abandoned (a shard is only ever written whole, by rename, after sampling). Elsewhere (writing a
    shard, between shards) it only sets `signum`; the stage checks it before each shard. The signal is passed on
    to this process's children (data-parallel workers), which stop the same way."""

    notice = "dropping the shard in progress, keeping those written"

    def __init__(self, stage: str = "", notice: str = ""):
        super().__init__(stage)
        self._sampling = False
        self.notice = notice or self.notice  # what the console is told the stage does about the signal

    def _handle(self, signum, frame) -> None:
        first = not self.signum
        super()._handle(signum, frame)
        if first:
            signal_all(_children(os.getpid()), signum)
        if self._sampling:
            self._sampling = False
            raise ShardDropped(signal_name(signum))

    @contextmanager
    def sampling(self):
        if self.signum:
            raise ShardDropped(signal_name(self.signum))
        self._sampling = True
        try:
            yield
        finally:
            self._sampling = False


def _live_processes(field: int, value: int) -> list[int]:
    """Live (not zombie) processes whose /proc stat field `field` equals `value`: 1 the parent pid, 2 the group."""
    out = []
    for d in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[field]) == value and fields[0] != "Z":
            out.append(int(d.name))
    return out


def signal_all(pids, signum: int) -> None:
    """Send `signum` to each process of `pids`; one that has already exited is passed over."""
    for pid in pids:
        try:
            os.kill(pid, signum)
        except OSError:
            pass


def _children(pid: int) -> list[int]:
    """Live child processes of `pid`."""
    return _live_processes(1, pid)


_held: dict = {}  # the handlers StopSignals replaced, while an error it let through is reported
_held_since = [0.0]
REPORT_GRACE = 10.0


def _after_error(signum, frame) -> None:
    if time.monotonic() - _held_since[0] < REPORT_GRACE:
        return  # the error is being reported: it exits in a moment anyway
    reported()
    os.kill(os.getpid(), signum)  # too late for the report: act as the handler before the stage would


def reported() -> None:
    """The CLI has printed its line: signals act as they did before the stage again."""
    for s, old in _held.items():
        signal.signal(s, old)
    _held.clear()


def trainer_callback(stop: StopSignals):
    """For a transformers Trainer: on an agreed signal, save a checkpoint at this step and end training; the
    stage then raises `PreemptedError` for `callback.stopped_at` (see `raise_if_stopped`)."""
    from transformers import TrainerCallback

    class PreemptCallback(TrainerCallback):
        stopped_at: int | None = None
        signum = 0

        def on_step_end(self, args, state, control, **kwargs):
            if state.max_steps and state.global_step >= state.max_steps:
                return  # the last step: the Trainer saves and finishes anyway (every process skips the same one)
            signum = stop.agreed(_device(args))
            if signum and self.stopped_at is None:
                self.stopped_at, self.signum = state.global_step, signum
                control.should_save = True
                control.should_training_stop = True

        def on_save(self, args, state, control, **kwargs):
            # the Trainer writes checkpoint-N in place, trainer_state.json last: the manifest, after every process
            # has written its part, is what makes the folder one a resume trusts (training.checkpoints.last_checkpoint)
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    with writing(ckpt):
                        write_manifest(ckpt)

    return PreemptCallback()


def _device(args):
    try:
        return args.device
    except Exception:  # noqa: BLE001 - a TrainingArguments without a device (never under a Trainer)
        return None


def raise_if_stopped(callback, stage: str, output_dir) -> None:
    if callback.stopped_at is not None:
        raise PreemptedError(stage, callback.stopped_at, callback.signum,
                             str(Path(output_dir) / f"checkpoint-{callback.stopped_at}"))


# ------------------------------------------------------------------------------------------- checkpoint manifests


def write_manifest(folder: Path) -> None:
    """`manifest.json`: {relative path: [size, sha256]} of every file under `folder`, written atomically, last."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): [p.stat().st_size, sha256_file(p)] for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
    tmp = folder / f".{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"files": files}, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST)


def verify_manifest(folder: Path, skip: tuple[str, ...] = ()) -> str | None:
    """None when every file the manifest lists is there with its size and hash; else what is wrong, naming the
    file. Files under a top-level folder in `skip` are not checked (a pruned `state/`)."""
    folder = Path(folder)
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{folder / MANIFEST} is missing or unreadable (the save did not finish)"
    for rel, (size, digest) in files.items():
        if rel.split("/", 1)[0] in skip:
            continue
        p = folder / rel
        try:
            st = p.stat()
        except OSError:
            return f"{p} is missing"
        if st.st_size != size:
            return f"{p} is {st.st_size} bytes, its manifest says {size} (truncated or overwritten)"
        if sha256_file(p) != digest:
            return f"{p} does not match the SHA-256 in its manifest (damaged)"
    return None


# ------------------------------------------------------------------------------------------- resources


def _free(path: Path) -> str:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return ""
    return f" ({free / 2**30:.2f} GiB free there)" if free >= 2**30 else f" ({free / 2**20:.1f} MiB free there)"


def _is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch.save's zip writer reports a short write as "[enforce fail at inline_container.cc] . unexpected pos"
    # or "PytorchStreamWriter failed writing file", with no errno
    return isinstance(e, RuntimeError) and any(s in str(e) for s in ("unexpected pos", "PytorchStreamWriter failed",
                                                                     "No space left on device"))


def disk_full_message(path, e: BaseException | None = None) -> str:
    name = getattr(e, "filename", None) or path
    quota = " (disk quota exceeded)" if isinstance(e, OSError) and e.errno == errno.EDQUOT else ""
    return (f"No space left on device{quota} while writing {name}{_free(Path(name))}: free space on that disk or "
            "set output_dir to a larger one, then rerun the same command (it resumes from the last complete "
            "checkpoint)")


@contextmanager
def writing(path):
    """A full disk (ENOSPC, EDQUOT, or torch's zip writer's short write) while saving to `path` becomes a
    ResourceError naming "No space left on device", the path, the free space and what to do."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if _is_disk_full(e):
            raise ResourceError(disk_full_message(path, e)) from e
        raise


_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "ProcessGroupGloo",
              "NCCL communicator was aborted", "remote process exited", "ProcessGroupNCCL", "Socket Timeout",
              "DistBackendError", "heartbeat")


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def describe(e: BaseException) -> str | None:
    """One line for an exception that is a resource fault (anywhere in its chain), or None."""
    for x in _chain(e):
        if isinstance(x, ResourceError):
            return str(x)
        if _is_disk_full(x):
            return disk_full_message(getattr(x, "filename", None) or "the experiment folder", x)
    import torch

    for x in _chain(e):
        if isinstance(x, torch.OutOfMemoryError):
            return ("out of GPU memory: lower per_device_train_batch_size (raise gradient_accumulation_steps to keep "
                    "the global batch), set gradient_checkpointing: true or a smaller max_length; `prefopt check` "
                    "prints a memory plan; rerun the same command to resume from the last checkpoint")
        if isinstance(x, MemoryError):
            return ("out of host memory (RAM): give the job more memory or run fewer processes per node; rerun the "
                    "same command to resume from the last checkpoint")
    for x in _chain(e):
        dist_error = getattr(getattr(torch, "distributed", None), "DistError", ())
        if isinstance(x, dist_error) or (isinstance(x, RuntimeError) and any(s in str(x) for s in _PEER_LOST)):
            rank, world = dist_rank(), world_size()
            return (f"lost a peer process: rank {rank} of {world} lost its connection to another process of the "
                    f"launch ({type(x).__name__}: {_first_line(x)}); that process died first (out of memory? "
                    "killed?): its own line, the kernel log (`dmesg`) or the scheduler says why; rerun the same "
                    "command to resume from the last checkpoint")
    return None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else "")[:160]


def log_traceback(log_file: Path, command: str) -> Path | None:
    """Append the current exception's traceback to `log_file`; its path, or None when it cannot be written."""
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} prefopt {command} (rank "
                    f"{os.environ.get('RANK', '0')}, pid {os.getpid()})\n{traceback.format_exc()}\n")
        return log_file
    except OSError:  # the disk is full: the traceback cannot go there
        return None


# ------------------------------------------------------------------------------------------- `prefopt run`


@contextmanager
def forward_signals(proc):
    """While `prefopt run` waits for a launched stage, pass SIGTERM / SIGINT / SIGUSR1 on to the stage's processes
    and remember it (`.signum`). `proc` was started in its own session. One process: the stage leads its group (started
    directly, `pipeline.simple_launch`), or shares it with accelerate's launcher, and the signal goes to the stage
    only (the launcher would die of it, or turn a SIGINT into a traceback). Several: torchrun starts each worker in a session of its own and passes a signal on to
    them itself (then SIGKILL after 30 s), as `srun` does across nodes: the signal goes to the launcher."""
    stop = StopSignals()

    def handle(signum, frame):
        stop.signum = stop.signum or signum
        targets = [p for p in _group(proc.pid) if p != proc.pid] or [proc.pid]
        signal_all(targets, signum)

    old = {s: signal.signal(s, handle) for s in SIGNALS}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _group(pgid: int) -> list[int]:
    """Live processes whose process group is `pgid`."""
    return _live_processes(2, pgid)

