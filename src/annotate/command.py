"""`prefopt annotate`: resolve what to serve and where labels go, read and check it all, then serve the page.

    prefopt annotate experiments/quickstart.yaml [--round K] [--annotate.source=candidates]
    prefopt annotate --pairs runs/quickstart/pairs/pairs.jsonl --out labels/prefs.jsonl [--annotator alice]
    prefopt annotate --candidates runs/quickstart/generate --out labels/prefs.jsonl --port 0

Everything that can fail on bad input (the pairs file, the shards, an existing label file) is read before the
server starts: a bad file is a one-line DataError naming file, row and field, and exit code 3. Labels written
into an experiment folder hold its lock while the page serves (exit code 4 while another command holds it).

Like every command, a W&B run (job_type `annotate`; offline without an API key, `wandb.mode` from the experiment
config, none when it is `disabled`) with its local record (config.yaml, metrics.jsonl) in `<run>/annotate/`, or
without a config in `<out stem>.run/` beside the label file. It logs the label counts as labels arrive (see
session.py) and ends with them in its summary when the page stops (Ctrl-C).
"""

from __future__ import annotations

import socket
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

from prefopt.annotate.config import AnnotateConfig
from prefopt.annotate.items import load_candidates, load_pair_file
from prefopt.annotate.session import Session
from prefopt.annotate.store import LabelStore
from prefopt.config import ConfigError
from prefopt.experiment import WandbConfig

# command-line flag -> key of the annotate section it overrides
FLAGS = ("pairs", "candidates", "out", "annotator", "host", "port", "seed", "limit")


@dataclass
class Standalone:
    """What the tracker reads of an experiment config, for `prefopt annotate --pairs FILE --out FILE` without one:
    named after the label file, W&B settings at their defaults (`auto`: offline without an API key)."""

    name: str
    annotate: AnnotateConfig
    wandb: WandbConfig = field(default_factory=WandbConfig)


def resolve_section(args, rest: list[str]) -> AnnotateConfig:
    """The annotate section with its `stage:` paths resolved: from the experiment config when one is given (with
    its --annotate.KEY=VALUE overrides), else from the flags alone; flags win over both."""
    return resolve_target(args, rest)[0]


def resolve_target(args, rest: list[str]) -> tuple[AnnotateConfig, Path | None, object]:
    """The resolved section; the experiment folder labels are written into (whose lock `main` takes): the
    config's run folder when `out` lies in it; without a config, the folder above `out` that holds an experiment
    lock file; else None; and the experiment config (a `Standalone` without one) with the W&B settings."""
    flags = {k: getattr(args, k) for k in FLAGS if getattr(args, k, None) is not None}
    if args.candidates is not None:
        flags["source"] = "candidates"
    if args.config:
        from prefopt.experiment import load_config
        from prefopt.experiment import resolve

        cfg = load_config(args.config, rest)
        sec = replace(cfg.annotate, **flags)
        if not sec.out:
            sec.out = str(cfg.root / "annotate" / "preferences.jsonl")
        sec = replace(sec, pairs=resolve(cfg, sec.pairs, args.round, model=False),
                      candidates=resolve(cfg, sec.candidates, args.round, model=False),
                      out=resolve(cfg, sec.out, args.round, model=False))
        root = cfg.root.resolve()
        return sec, root if root in Path(sec.out).resolve().parents else None, cfg
    if rest:
        raise ConfigError(f"unrecognised arguments {rest}: --annotate.KEY=VALUE overrides need an experiment config")
    if "pairs" not in flags and "candidates" not in flags:
        raise ConfigError("give an experiment config, or --pairs FILE (or --candidates DIR) with --out FILE")
    if not flags.get("out"):
        raise ConfigError("--out FILE is needed without an experiment config (the preference JSONL to append to)")
    # `.lock` is left in every experiment folder a prefopt command has written into
    root = next((d for d in Path(flags["out"]).resolve().parents if (d / ".lock").is_file()), None)
    sec = AnnotateConfig(**flags)
    return sec, root, Standalone(name=_stem(sec.out), annotate=sec)


def _stem(out: str) -> str:
    name = Path(out).name
    return name[: -len(".jsonl")] if name.endswith(".jsonl") else name


def run_dir(sec: AnnotateConfig, cfg) -> Path:
    """Where the W&B run and its local record go: `<run>/annotate/` with an experiment config, else
    `<out stem>.run/` beside the label file (never a stage's folder, whose config.yaml it would replace)."""
    if isinstance(cfg, Standalone):
        return Path(sec.out).with_name(_stem(sec.out) + ".run")
    return cfg.root / "annotate"


def start_tracker(sec: AnnotateConfig, cfg, session: Session):
    """The command's W&B run, with the label counts already in the files logged at its first step."""
    from prefopt.runtime.tracking import Tracker

    tracker = Tracker.start(cfg, "annotate", run_dir(sec, cfg),
                            extra={"pairs_served": len(session.pairs), "labels_out": str(session.store.out)})
    session.tracker = tracker
    session.log_counts()
    return tracker


def prepare(sec: AnnotateConfig) -> Session:
    """Read and check the pairs and the existing labels; a Session ready to serve."""
    source = sec.pairs if sec.source == "pairs" else sec.candidates
    if Path(sec.out).resolve() == Path(source).resolve():
        raise ConfigError(f"annotate.out is the file being served ({sec.out}); give another file")
    if sec.source == "pairs":
        pairs, skipped = load_pair_file(sec.pairs, sec.template, sec.limit)
    else:
        pairs, skipped = load_candidates(sec.candidates, sec.seed, sec.limit)
    store = LabelStore(sec.out)  # reads (and checks) the labels already there: resume
    print(f"[prefopt] annotate: {len(pairs)} pairs from {source}"
          + (f" ({skipped} skipped: an empty answer or two identical ones)" if skipped else "")
          + f"; labels -> {store.out}, ties and skips -> {store.side}", flush=True)
    return Session(pairs, store, sec.seed)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def main(args, rest: list[str]) -> int:
    from prefopt.pipeline import experiment_lock

    sec, root, cfg = resolve_target(args, rest)
    # labels written into an experiment folder take its lock, as `run` and the stage commands do: a stage reading
    # the file (reward on human labels) must not see it change under it
    with experiment_lock(root) if root is not None else nullcontext():
        session = prepare(sec)
        try:
            from prefopt.annotate.page import serve
        except ImportError as e:
            raise ConfigError(f"the feedback page needs gradio ({e}): pip install 'prefopt[annotate]'") from None
        port = sec.port or free_port(sec.host)
        tracker = start_tracker(sec, cfg, session)
        print(f"[prefopt] annotate: serving on http://{sec.host}:{port} (Ctrl-C to stop)", flush=True)
        try:
            serve(session, sec.host, port, sec.annotator)
        finally:
            tracker.finish(session.summary())
    return 0
