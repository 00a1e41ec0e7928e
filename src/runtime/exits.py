"""What an error means for `prefopt`'s exit code and its one console line: the CLI and the sweep (which runs each
trial's pipeline itself) report through `run_reported`, so a trial fails exactly as `prefopt run` would.

Exit codes (the CLI's docstring lists them): 2 config, 3 data, 4 locked, 5 reward-model gate, 6 resource fault,
130 interrupted, 143 preempted, 1 a crash (traceback, then the advice to rerun).
"""

from __future__ import annotations

import json
import os
import re
import traceback
from pathlib import Path
from typing import Callable

from prefopt.config import ConfigError
from prefopt.data.errors import DataError
from prefopt.runtime.faults import error_line
from prefopt.dist.process import is_main_process



class Reported(RuntimeError):
    """An error whose message is its whole line and that carries its exit code: a launched stage that failed (its
    own error was printed by it already), the reward gate. `run_reported` prints `prefopt: <message>` and exits."""

    def __init__(self, exit_code: int, message: str = ""):
        self.exit_code = exit_code
        super().__init__(message)


class StageFailed(Reported):
    """A launched stage process failed; `exit_code` is its own (a user error's code passes through accelerate)."""


def run_reported(command: str, body: Callable[[], int], log_path: Callable[[], Path]) -> int:
    """`body()`'s return code, or the code of what it raised, reported as one line (`log_path()`: where a resource
    fault's traceback goes)."""
    try:
        return body()
    except ConfigError as e:
        return user_error("config error", e, 2)
    except Reported as e:  # a launched stage's own failure, the reward gate: the message is the whole line
        if str(e):
            error_line(f"prefopt: {e}")
        return e.exit_code
    except DataError as e:
        return user_error("data error", e, 3)
    except KeyboardInterrupt:
        return user_error("interrupted", "finished stages are kept; rerun the same command to resume", 130)
    except Exception as e:  # noqa: BLE001
        from prefopt.runtime import faults

        fault = faults.describe(e)  # a full disk, out of memory, a lost peer: one line, the traceback to a log
        if fault is not None:
            log = faults.log_traceback(log_path(), command)
            return user_error("resource error", fault + (f" (traceback in {log})" if log else ""),
                              faults.RESOURCE_EXIT)
        code = getattr(e, "exit_code", None)
        if isinstance(code, int):  # LockedError, PreemptedError and other errors that carry their own code and kind
            return user_error(getattr(e, "kind", "error"), e, code)
        traceback.print_exc()
        advice = "the traceback above"
        if command not in ("check", "report", "sweep", "annotate"):  # a rerun resumes a stage, not these
            advice = ("fix the cause above, then rerun the same command: finished stages are kept and the "
                      "unfinished one resumes")
        error_line(f"prefopt: {command} crashed ({type(e).__name__}); {advice}")
        return 1
    finally:
        from prefopt.runtime import faults

        faults.reported()  # a training stage's error is reported: signals act as before it again


def log_file(cfg, command: str):
    root = Path(cfg.root) if cfg is not None else Path.cwd()
    return root / "logs" / f"{command}.log"


def _close_progress_bars() -> None:
    """A training stage's progress bar left open by the error ends its line, so the error starts a line of its own
    (and `prefopt run`, which relays a launched stage's stderr, finds it)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot close must not hide the error
            pass


def user_error(kind: str, error, code: int) -> int:
    """Print `prefopt: KIND: MESSAGE` (no kind: `prefopt: MESSAGE`) as one line; a stage launched by `prefopt run`
    also leaves the code for it."""
    msg = re.sub(r"\s*\n\s*", " ", str(error)).strip()
    _close_progress_bars()
    error_line(f"prefopt: {kind}: {msg}" if kind else f"prefopt: {msg}")
    exit_file = os.environ.get("PREFOPT_EXIT_FILE")
    if exit_file and is_main_process():
        try:
            with open(exit_file, "w") as f:
                json.dump({"code": code, "message": msg}, f)
        except OSError:
            pass
    return code
