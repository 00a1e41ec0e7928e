"""One-process launched stages started from a process that has already imported torch, transformers, accelerate,
peft and wandb: Python's multiprocessing forkserver (stdlib), started once per `prefopt run`.

A launched stage is a fresh `python -m prefopt STAGE ...` (the command accelerate's simple launcher runs,
`pipeline.simple_launch`). Before its own clock starts it spends ~4 s on 2 CPU cores importing the same libraries
every other stage imports (torch 1.3 s; transformers, accelerate, peft, wandb the rest): ~18 s of the quickstart's
270 s. The forkserver imports them once, in the background while the first stages run, and forks each stage from
that state: a new process (its own pid, session, memory, stdout and stderr, signal handlers, exit code), with the
stage's command line, environment and working directory, that starts with the imports done.

Why it is safe to fork there: the server only imports, it never runs a tensor operation, so no OpenMP thread pool,
no CUDA context, no W&B run exists to be copied (CUDA and OpenMP do not survive a fork; a fork of the pipeline
process itself, which runs the in-process stages, would not be safe). Every random generator is seeded by the stage.

Linux CPU machines only (`pipeline.start_forkserver`, `available`): on a GPU machine any import that asks torch for
the device count initialises the CUDA driver in the server, and a forked child cannot use it; there each stage
starts fresh (its 4 s are nothing against a GPU stage's load and compile). macOS's system frameworks are not safe
to fork either.

Signals: the stage leads its own session, as `Popen(start_new_session=True)` made it, and `prefopt run` passes
SIGTERM / SIGINT / SIGUSR1 on to it (faults.forward_signals). The server ignores them: Slurm signals every process
of a job, and the server is what reports a stage's exit status.

What the environment can change: the stage gets exactly its own environment (`os.environ` replaced before it
runs), but the libraries read a few variables when they are imported (OMP_NUM_THREADS when torch's OpenMP loads,
HF_HOME and the offline flags in huggingface_hub's constants). The server is started with the first stage's
environment, and a stage whose environment differs from the server's in anything but the variables read when used
(`PER_STAGE`: accelerate's, prefopt's, W&B's) is started the ordinary way (`Popen`) instead. `launch.preload: false`
turns it off.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import signal
import sys
import time
import traceback
import types
from multiprocessing.reduction import DupFd

PRELOAD = ["torch", "transformers", "accelerate", "peft", "wandb", "safetensors.torch",
           "transformers.modeling_utils", "transformers.models.auto.modeling_auto", "prefopt.cli", "prefopt.stage",
           "prefopt.preference.loop", "prefopt.models.loading", "pandas", "wandb.sdk.launch.inputs.internal"]
"""Imported once in the server: what every launched stage imports before its clock starts (prefopt's own modules
import the model, loop and tracking code; a model family's modeling file is still imported by the stage)."""

PER_STAGE = ("ACCELERATE_", "PREFOPT_", "WANDB_", "_WANDB_", "TORCHINDUCTOR_CACHE_DIR")
"""Variables a stage may have that the server's imports did not read: accelerate reads its own when the
Accelerator is built, prefopt reads its own (the exit file, the lock token) when it writes, W&B when a run starts;
torch sets TORCHINDUCTOR_CACHE_DIR in the pipeline process the first time an in-process stage asks for inductor's
cache folder, and reads it when it compiles."""

_server_env: dict[str, str] | None = None


def available() -> bool:
    """Linux only: macOS's system frameworks (which torch loads) are not safe to fork, Windows cannot fork."""
    return sys.platform.startswith("linux") and "forkserver" in multiprocessing.get_all_start_methods()


def start(env: dict[str, str], log: str = os.devnull) -> None:
    """Start the server (if this process has none) with `env` as its environment and its own output (what its
    imports print) in `log`; its imports run in the background. Later stages whose environment matches it (`fits`)
    start from it."""
    global _server_env
    if _server_env is not None or not available():
        return
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    saved_env, saved_fds = dict(os.environ), [os.dup(1), os.dup(2)]
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    # Slurm's preemption signals every process of the job: the server must outlive it, or the stages it forked
    # (which save a checkpoint on that signal) would be reported as exit 255 before they finish. An ignored
    # signal stays ignored across exec; the stages set their own handlers. The server ignores SIGINT itself.
    try:
        saved_signals = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    except ValueError:  # not the main thread, whose signals these are: the server dies with the others
        saved_signals = {}
    with open(log, "ab") as out:
        os.environ.clear()
        os.environ.update(env)  # the server inherits this process's environment and descriptors when spawned
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        try:
            forkserver.ensure_running()
        finally:
            for sig, handler in saved_signals.items():
                signal.signal(sig, handler)
            for fd, target in zip(saved_fds, (1, 2)):
                os.dup2(fd, target)
                os.close(fd)
            os.environ.clear()
            os.environ.update(saved_env)
    _server_env = dict(env)


def fits(env: dict[str, str]) -> bool:
    """Whether a stage with this environment can start from the server: they differ only in `PER_STAGE`."""
    if _server_env is None:
        return False
    keys = set(env) | set(_server_env)
    return all(env.get(k) == _server_env.get(k) for k in keys if not k.startswith(PER_STAGE))


class Stage:
    """A stage forked from the server, for the pipeline as a `subprocess.Popen` is: `pid` (the leader of its own
    session), `stderr` (a pipe to read), `wait()` and `returncode` (negative: killed by that signal)."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: str | None = None):
        if cmd[0] != sys.executable or len(cmd) < 3 or cmd[1] != "-m":
            raise ValueError(f"the forkserver starts `{sys.executable} -m MODULE ...` only, not {cmd[:3]}")
        read, write = os.pipe()
        self._process = multiprocessing.get_context("forkserver").Process(
            target=_run_stage, args=(cmd[2:], env, cwd or os.getcwd(), DupFd(1), DupFd(write)),
            name=f"prefopt {cmd[3] if len(cmd) > 3 else ''}")
        main = sys.modules["__main__"]
        # multiprocessing would have the child run this process's main script again (as `__mp_main__`, to find
        # pickled functions defined there): a user's script calling the pipeline, without a main guard, would
        # start the experiment again inside the stage. A main with no file and no spec is not run.
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            self._process.start()
        finally:
            sys.modules["__main__"] = main
            os.close(write)  # the child holds its copy: the pipe ends when the stage does
        self.pid = self._process.pid
        self.stderr = os.fdopen(read, "rb", buffering=0)
        self.returncode: int | None = None

    def wait(self) -> int:
        self._process.join()
        self.returncode = self._process.exitcode
        # The server reports the exit status; were it killed (SIGKILL, the OOM killer), multiprocessing says 255
        # at once, while the stage may still be writing its checkpoint: wait for the stage itself to end (its
        # exit file then says how). Normally it has been reaped before the status arrives.
        while _running(self.pid):
            time.sleep(0.1)
        self.stderr.close()
        return self.returncode


def _running(pid: int) -> bool:
    """Whether the process exists and is not a zombie (an orphan's parent may be slow to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _run_stage(argv: list[str], env: dict[str, str], cwd: str, out: DupFd, err: DupFd) -> None:
    """In the forked child: become what `Popen([python, -m, MODULE, ...], env=env, cwd=cwd, start_new_session=True)`
    starts (stdin at /dev/null, as multiprocessing leaves it), run the module as `__main__`, exit with its code."""
    os.setsid()
    for target, fd in ((1, out.detach()), (2, err.detach())):
        os.dup2(fd, target)
        os.close(fd)
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.path[0] = cwd  # what `python -m` puts first
    sys.argv = list(argv)
    code = 0
    try:
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:  # the interpreter prints it and dies of SIGINT
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()  # multiprocessing's children skip them; a python process runs them at exit
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed stream: nothing left to write
                pass
        if code < 0:
            signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
        os._exit(code)
