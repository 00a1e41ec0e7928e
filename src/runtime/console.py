"""What `prefopt run` prints while a stage runs: its own `[prefopt] ...` lines, warnings and errors; everything else
(the Trainer's `{'loss': ...}` dictionaries, per-batch progress bars, library warnings) goes to the stage's log file.

`StageOutput(log, verbose)` is a context manager around one stage, in-process or launched: it points this process's
file descriptors 1 and 2 (and `sys.stdout` / `sys.stderr`) at two pipes, so a launched `accelerate` child and any
library writing to the descriptors directly are caught too. A reader thread per pipe appends every byte to the log
and copies to the console the lines tagged for it (`CONSOLE_LINE`), each on the stream it came on. When the stage
fails without having printed its own one-line error (`prefopt: ...`), the log's last lines and its path follow on
stderr, so a crash's traceback still reaches the console. `verbose` (`prefopt run --verbose`, `PREFOPT_VERBOSE=1`)
does nothing: everything prints as it comes, as before.
"""

from __future__ import annotations

import collections
import os
import re
import sys
import threading
import time
from pathlib import Path

VERBOSE_ENV = "PREFOPT_VERBOSE"
# Lines the console keeps: prefopt's own notes, warnings in words (`WARNING: ...`, `[pairs] WARNING: ...`), and a
# stage's one-line error (`prefopt: data error: ...`).
CONSOLE_LINE = re.compile(rb"\[prefopt\]|prefopt:|WARNING|\[[\w-]+\] WARNING")
TAIL_LINES = 20  # of the log, on stderr after a crash
# A tqdm bar's count and times: "sft:  12%|#2  | 246/2000 [00:23<15:25,  1.90it/s]"
PROGRESS = re.compile(rb"(\d+)/(\d+) \[([\d:]+)<([\d:?]+)")
PROGRESS_EVERY = 0.5  # seconds between redraws of the stage's one progress line


def verbose(flag: bool = False) -> bool:
    """`--verbose` or PREFOPT_VERBOSE set to anything but empty / 0 / false / no."""
    return flag or os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def stage_log_path(stage_dir: Path) -> Path:
    """`<experiment>/logs/<stage>.log` (a round's and a replicate's beside their folders: `round2/logs/dpo.log`).
    Not inside the stage's folder: the stage clears that folder when its config changed, and a rerun over a
    finished result works in `.<stage>.next` and renames it, which would lose (or hash) a log written there."""
    return stage_dir.parent / "logs" / f"{stage_dir.name}.log"


class _Tee(threading.Thread):
    """Reads one pipe: every byte to the log, the tagged lines to `echo`."""

    def __init__(self, fd: int, log, lock: threading.Lock, echo, owner: "StageOutput"):
        super().__init__(daemon=True)
        self.fd, self.log, self.lock, self.echo, self.owner = fd, log, lock, echo, owner

    def run(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                break
            with self.lock:
                try:
                    self.log.write(chunk)
                    self.log.flush()
                except ValueError:  # closed: a process the stage left running wrote after the stage ended
                    pass
            pending += chunk
            *lines, pending = _split(pending)
            for line in lines:
                self._line(line)
        if pending:
            self._line(pending)
        os.close(self.fd)

    def _line(self, line: bytes) -> None:
        if line.strip():
            self.owner.tail.append(line.decode("utf-8", errors="replace"))
        if CONSOLE_LINE.match(line):
            if line.startswith(b"prefopt:"):
                self.owner.error_shown = True
            self.owner.clear_progress()
            self.echo(line + b"\n")
        elif self.owner.show_progress:
            m = PROGRESS.search(line)
            if m:
                self.owner.progress(*(g.decode() for g in m.groups()))


def _split(data: bytes) -> list[bytes]:
    """Lines ended by \\n or \\r (a progress bar redraws with \\r); the last item is the unfinished rest."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")


class StageOutput:
    """See the module docstring. `.error_shown`: the stage printed its own `prefopt:` line."""

    def __init__(self, log: Path, verbose: bool = False, header: str = "", progress: bool | None = None):
        """`progress`: redraw one line on the console (\\r, no newline) from the stage's progress bars, whatever
        phase they count, with its count, elapsed time and ETA; None: when the console's stderr is a terminal (a
        log or a pipe gets no redrawn lines)."""
        self.log_path, self.verbose, self.header = Path(log), verbose, header
        self.label = header.split(" (")[0]
        self._progress_wanted, self.show_progress = progress, False
        self._progress_shown, self._progress_at = False, 0.0
        self.error_shown = False
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    def __enter__(self) -> "StageOutput":
        if self.verbose:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {self.header}\n".encode())
        self._log.flush()
        for s in (sys.stdout, sys.stderr):
            s.flush()
        self._streams = (sys.stdout, sys.stderr)
        self._saved = (os.dup(1), os.dup(2))
        lock = threading.Lock()
        self.show_progress = (self._progress_wanted if self._progress_wanted is not None
                              else os.isatty(self._saved[1]))
        self._progress_echo = _echo_to(sys.stderr, 2, self._saved[1])
        self._threads = []
        for fd, stream, saved in ((1, sys.stdout, self._saved[0]), (2, sys.stderr, self._saved[1])):
            r, w = os.pipe()
            os.dup2(w, fd)
            os.close(w)
            t = _Tee(r, self._log, lock, _echo_to(stream, fd, saved), self)
            t.start()
            self._threads.append(t)
        sys.stdout = open(1, "w", encoding="utf-8", errors="replace", buffering=1, closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", errors="replace", buffering=1, closefd=False)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.verbose:
            return
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except (OSError, ValueError):
                pass
        sys.stdout, sys.stderr = self._streams
        os.dup2(self._saved[0], 1)  # closes the pipes' write ends held by fds 1 and 2: the readers see EOF
        os.dup2(self._saved[1], 2)
        for t in self._threads:
            t.join(timeout=5)  # a child the stage left running may keep a pipe open: do not wait on it
        if not any(t.is_alive() for t in self._threads):
            for fd in self._saved:  # (a reader still alive may echo through them: left open, never reused)
                os.close(fd)
        with self._threads[0].lock:
            self._log.close()
        self.clear_progress()
        if exc is not None and self.crashed(exc):
            err = sys.stderr
            if self.tail:
                err.write(f"[prefopt] the stage's last lines ({self.log_path}):\n")
                err.writelines("    " + line + "\n" for line in self.tail)
            err.write(f"[prefopt] its whole output: {self.log_path}\n")
            err.flush()

    def progress(self, done: str, total: str, elapsed: str, eta: str) -> None:
        """Redraw the stage's one progress line (at most every PROGRESS_EVERY seconds, and at 100%)."""
        now = time.monotonic()
        if now - self._progress_at < PROGRESS_EVERY and done != total:
            return
        self._progress_at = now
        pct = 100 * int(done) // max(int(total), 1)
        text = f"\r[prefopt] {self.label}: {done}/{total} ({pct}%), {elapsed} elapsed, ETA {eta}\x1b[K"
        self._progress_echo(text.encode())
        self._progress_shown = True

    def clear_progress(self) -> None:
        """Wipe the progress line before a line that stays (and when the stage ends)."""
        if self._progress_shown:
            self._progress_shown = False
            self._progress_echo(b"\r\x1b[K")

    def crashed(self, exc: BaseException) -> bool:
        """A failure the console has not explained in one line: not a user error (config, data, lock, gate,
        preemption, interrupt: each prints its own line), and no `prefopt:` line from the stage."""
        if self.error_shown or isinstance(exc, KeyboardInterrupt) or not isinstance(exc, Exception):
            return False
        from prefopt.config import ConfigError
        from prefopt.data.errors import DataError
        from prefopt.runtime import faults

        if isinstance(exc, (ConfigError, DataError)) or faults.describe(exc) is not None:
            return False
        return getattr(exc, "exit_code", 1) == 1


def _echo_to(stream, fd: int, saved: int):
    """Where a tagged line goes: the console stream this process had before the capture. One on descriptor 1 or 2
    is written to the saved copy of that descriptor (the descriptor itself now feeds the pipe); any other stream (a
    test's StringIO) gets the text."""
    try:
        on_fd = stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        on_fd = False
    if on_fd:
        return lambda data: os.write(saved, data)

    def write(data: bytes) -> None:
        stream.write(data.decode("utf-8", errors="replace"))
        stream.flush()

    return write
